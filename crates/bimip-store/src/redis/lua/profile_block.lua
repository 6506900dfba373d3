-- set_block: user.blocks and other.blocked_by at once (see profile_contacts.lua on Redis
-- Cluster). KEYS[1] = {user}:blocks, KEYS[2] = {other}:blocked_by, KEYS[3] = users;
-- ARGV[1] = user, ARGV[2] = other, ARGV[3] = blocked (0/1). Returns 1 when user's list changed.
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
  local changed = redis.call('SADD', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[3], ARGV[1], ARGV[2])
  return changed
end
local changed = redis.call('SREM', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[1])
return changed
