-- enqueue_append. KEYS: the user's 15 queue keys, the users set, the compaction-due zset.
-- ARGV: user, retention ms, max items, the item (8 values, see read_item).
-- Returns { offset, timestamp, duplicate, dropped, dropped_unacked }.
local k = user_keys(0, ARGV[1])
local cfg = { retention = tonumber(ARGV[2]), max = tonumber(ARGV[3]) }
local last = precheck(k)
if last == nil then
  return redis.error_reply('bimip: the queue of ' .. k.user .. ' is ahead of its sequence')
end
local now = now_ms()
local r = append_item(k, read_item(4), last, now, cfg, KEYS[NKEYS + 1], KEYS[NKEYS + 2])
if r[3] == 0 then
  local c = limit_queue(k, now, cfg, KEYS[NKEYS + 2])
  r[4], r[5] = c[1], c[2]
else
  r[4], r[5] = 0, 0
end
return r
