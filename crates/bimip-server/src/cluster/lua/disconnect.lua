-- A connection leaves the cluster registry (closed, or its node died and is being reaped).
-- KEYS[1] the user's presence hash  KEYS[2] the node's connection index  KEYS[3] offline_due
-- ARGV[1] node incarnation  ARGV[2] connection id  ARGV[3] user  ARGV[4] grace ms
-- Returns {connections left (-1: it was not registered), now}. When none are left the user's
-- last seen is set and, if it was announced ONLINE, it becomes due for OFFLINE after the grace.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HDEL', KEYS[1], 'c:' .. ARGV[1] .. ':' .. ARGV[2]) == 0 then
  return {-1, now}
end
local n = redis.call('HINCRBY', KEYS[1], 'n', -1)
if n <= 0 then
  n = 0
  redis.call('HSET', KEYS[1], 'n', 0, 'ls', now)
  if redis.call('HGET', KEYS[1], 'a') == '1' then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
  end
end
return {n, now}
