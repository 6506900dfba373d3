-- Claims the OFFLINE announcement of a user whose grace period ended: exactly one caller gets
-- its last seen; nil when it came back, is not due yet, or someone else announced it.
-- KEYS[1] the user's presence hash  KEYS[2] offline_due   ARGV[1] user
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if n > 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
if due and tonumber(due) > now then
  return false
end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HDEL', KEYS[1], 'a') == 0 then
  return false
end
return tonumber(redis.call('HGET', KEYS[1], 'ls') or '0')
