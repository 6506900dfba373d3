-- put_device_token, as a compare-and-set on what the caller read: the device's entry and the
-- token's holder must still be what they were, else nothing is written and 0 is returned (the
-- caller reads again). The token leaves its previous holder (another user or device), the
-- device's previous token leaves the index, the index names the device. On a single Redis every
-- key is declared in KEYS; Redis Cluster would need the index and the tokens in two steps.
-- KEYS: 1 {user}:tokens, 2 the token index, 3 {holder}:tokens (= KEYS[1] when none), 4 users.
-- ARGV: 1 device, 2 the encoded token, 3 its index field, 4 'user\ndevice', 5 the device's entry
-- as read ('' = none), 6 the holder as read ('' = none), 7 the holder's device, 8 the index field
-- of the device's previous token ('' = none or the same), 9 user.
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[5] then return 0 end
local holder = redis.call('HGET', KEYS[2], ARGV[3]) or ''
if holder ~= ARGV[6] then return 0 end
if holder ~= '' and holder ~= ARGV[4] then
  redis.call('HDEL', KEYS[3], ARGV[7])
end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[2], ARGV[8]) == ARGV[4] then
  redis.call('HDEL', KEYS[2], ARGV[8])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[9])
return 1
