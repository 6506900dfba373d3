-- A connection joins the cluster registry.
-- KEYS[1] the user's presence hash  KEYS[2] the node's connection index  KEYS[3] offline_due
-- ARGV[1] node incarnation  ARGV[2] connection id  ARGV[3] device  ARGV[4] user
-- Returns 1 when the user was not announced ONLINE yet (the caller broadcasts it), else 0.
local f = 'c:' .. ARGV[1] .. ':' .. ARGV[2]
if redis.call('HSET', KEYS[1], f, ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'n', 1)
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
if redis.call('HGET', KEYS[1], 'a') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'a', '1')
return 1
