-- note_pushed: replaces the device's entry only if it is still the one read (advisory).
-- KEYS: 1 {user}:tokens. ARGV: 1 device, 2 the entry as read, 3 the new entry.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
