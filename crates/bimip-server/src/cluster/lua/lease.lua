-- Takes (ARGV[3] = '1') or renews a node's lease. Renewing a lease that is gone (the node was
-- reaped while it could not reach Redis, or was paused) returns -1: the node must register
-- again under a new incarnation.
-- KEYS[1] node leases   ARGV[1] incarnation  ARGV[2] lease ms  ARGV[3] '1' to take
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return -1
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
