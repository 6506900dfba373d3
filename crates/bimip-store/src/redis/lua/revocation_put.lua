-- put_revocation: keeps the later not_before. KEYS: 1 revocations. ARGV: 1 user, 2 not_before.
-- Returns the value kept.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and int_cmp(cur, ARGV[2]) >= 0 then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
