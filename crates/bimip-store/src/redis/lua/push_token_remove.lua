-- remove_device_token, as a compare-and-delete on the entry the caller read (0: it changed, read
-- again). The index entry goes too if it still names the device.
-- KEYS: 1 {user}:tokens, 2 the token index. ARGV: 1 device, 2 the entry as read, 3 its index
-- field, 4 'user\ndevice'.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[4] then
  redis.call('HDEL', KEYS[2], ARGV[3])
end
return 1
