-- enqueue_append_with_copy: the item into the first user's queue, then (unless it is a
-- duplicate) the copy into the second user's queue with peer offset = the item's offset, in one
-- script. Both users' keys in one script: fine on a standalone Redis; Redis Cluster would need
-- two calls (the users' hash tags differ).
-- KEYS: the first user's 15 queue keys, the second user's 15, the users set, the
-- compaction-due zset. ARGV: user, copy user, retention ms, max items, the item (8 values),
-- the copy (8 values).
-- Returns { item result, copy result } (each as append.lua's).
local a = user_keys(0, ARGV[1])
local b = user_keys(NKEYS, ARGV[2])
local cfg = { retention = tonumber(ARGV[3]), max = tonumber(ARGV[4]) }
local users, due = KEYS[2 * NKEYS + 1], KEYS[2 * NKEYS + 2]
local last_a = precheck(a)
local last_b = precheck(b)
if last_a == nil then
  return redis.error_reply('bimip: the queue of ' .. a.user .. ' is ahead of its sequence')
end
if last_b == nil then
  return redis.error_reply('bimip: the queue of ' .. b.user .. ' is ahead of its sequence')
end
local now = now_ms()
local first = append_item(a, read_item(5), last_a, now, cfg, users, due)
if first[3] == 1 then
  first[4], first[5] = 0, 0
  return { first, { 0, first[2], 1, 0, 0 } }
end
local copy = read_item(13)
copy.po = first[1]
if a.user == b.user then
  -- The same queue: the first append changed what precheck saw.
  last_b = precheck(b)
end
local second = append_item(b, copy, last_b, now, cfg, users, due)
-- The queue limit once both are in (as the file store applies it after a write batch).
local c = limit_queue(a, now, cfg, due)
first[4], first[5] = c[1], c[2]
second[4], second[5] = 0, 0
if a.user ~= b.user then
  c = limit_queue(b, now, cfg, due)
  second[4], second[5] = c[1], c[2]
end
return { first, second }
