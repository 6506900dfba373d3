-- compact_user. KEYS: the user's 15 queue keys, the compaction-due zset.
-- ARGV: user, retention ms, max items. Returns { dropped, dropped_unacked, kept }.
local k = user_keys(0, ARGV[1])
local cfg = { retention = tonumber(ARGV[2]), max = tonumber(ARGV[3]) }
return compact(k, now_ms(), cfg, KEYS[NKEYS + 1])
