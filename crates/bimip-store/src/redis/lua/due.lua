-- compact_due: users whose retention may be due now (Redis's clock). KEYS: the compaction-due
-- zset. ARGV: most users. Returns the users.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now_ms()), 'LIMIT', '0', ARGV[1])
