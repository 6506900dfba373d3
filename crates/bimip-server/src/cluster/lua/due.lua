-- What is due now: node incarnations whose lease ran out, and users whose OFFLINE grace ended.
-- KEYS[1] node leases  KEYS[2] offline_due   ARGV[1] most users
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 100)
local users = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
return {dead, users}
