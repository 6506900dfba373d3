-- acknowledge. KEYS: the user's 15 queue keys, the compaction-due zset.
-- ARGV: user, retention ms, device, partition, peer ('' = every sender; required for chat),
-- receipt kind, up to offset.
-- Returns { next offset, { offset, message id }... } (the covered items in offset order).
local k = user_keys(0, ARGV[1])
local retention = tonumber(ARGV[2])
local device, p, from, kind = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local due = KEYS[NKEYS + 1]
local up = math.min(tonumber(ARGV[7]), num(redis.call('GET', k.seq)))

-- Marks items of p from `from` ('' = every sender) up to `up` acknowledged; returns the newly
-- acknowledged offsets in order.
local function mark_acked()
  local all = num(redis.call('HGET', k.ack, p .. '|'))
  local offs
  if from == '' then
    offs = tonumbers(redis.call('ZRANGEBYSCORE', k.un[p], '-inf', fmt(up)))
    if #offs > 0 then
      redis.call('ZREMRANGEBYSCORE', k.un[p], '-inf', fmt(up))
    end
    if up > all then
      redis.call('HSET', k.ack, p .. '|', fmt(up))
    end
  else
    local w = math.max(num(redis.call('HGET', k.ack, p .. '|' .. from)), all)
    if up <= w then
      return {}
    end
    offs = lex_range(k.ix[p], lp(from), w + 1, up, 0, false)
    if p ~= CHAT then
      for _, o in ipairs(offs) do
        redis.call('ZREM', k.un[p], fmt(o))
      end
    end
    redis.call('HSET', k.ack, p .. '|' .. from, fmt(up))
  end
  if retention > 0 and #offs > 0 then
    local e = entry(k, offs[1])
    if e then
      redis.call('ZADD', due, 'LT', fmt(e.ts + retention), k.user)
    end
  end
  return offs
end

local out = { 0 }
if p == CHAT then
  local furthest = num(redis.call('HGET', k.cur, 'k|' .. p .. '|' .. kind .. '|' .. from))
  if furthest == 0 then
    furthest = 1
  end
  local new_cursor = up + 1
  for _, o in ipairs(lex_range(k.ix[CHAT], lp(from), furthest, new_cursor - 1, 0, false)) do
    local e = entry(k, o)
    if e then
      out[#out + 1] = { o, e.m }
    end
  end
  out[1] = move_cursor(k, device, p, from, kind, new_cursor)
  if up > 0 then
    mark_acked()
  end
else
  if up > 0 then
    for _, o in ipairs(mark_acked()) do
      local e = entry(k, o)
      if e then
        out[#out + 1] = { o, e.m }
      end
    end
  end
  out[1] = move_cursor(k, device, p, from, kind, up + 1)
end
return out
