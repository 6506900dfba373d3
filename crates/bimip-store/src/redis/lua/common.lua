-- Shared by every queue script: each script is this file followed by its own file (see
-- `redis/queue.rs`). Every key comes from KEYS: a user's queue keys are 15 consecutive entries
-- (`user_keys`), in the order `queue_keys` in queue.rs passes them.
--
-- Numbers handed to redis.call are always formatted with `fmt` (Lua would otherwise print large
-- ones in exponent notation). Offsets stay below 2^53 (exact in Lua's doubles).

local CHAT = 1
local MAXOFF = 9007199254740991
-- Offsets fetched from one index at a time.
local SCAN = 512

local function fmt(n)
  return string.format('%d', n)
end

-- Offsets in lexicographic members: fixed width, so string order is offset order.
local function pad(n)
  return string.format('%016d', n)
end

-- A length-prefixed name: no member or field built from it is a prefix of another one's.
local function lp(s)
  return string.len(s) .. ':' .. s
end

-- A number from a reply that may be missing (false).
local function num(v)
  return tonumber(v) or 0
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function user_keys(base, user)
  return {
    user = user,
    seq = KEYS[base + 1],
    q = KEYS[base + 2],
    ids = KEYS[base + 3],
    ack = KEYS[base + 4],
    cur = KEYS[base + 5],
    sent = KEYS[base + 6],
    snd = KEYS[base + 7],
    ix = { KEYS[base + 8], KEYS[base + 9], KEYS[base + 10] },
    po = { KEYS[base + 11], KEYS[base + 12], KEYS[base + 13] },
    un = { [2] = KEYS[base + 14], [3] = KEYS[base + 15] },
    -- watermarks read so far (scripts read them before they change them)
    wm = {},
  }
end
local NKEYS = 15

local function sid(off)
  return fmt(off) .. '-0'
end

-- A stream entry as a table: off, p, ts (numbers), f, t, b, m, d, po (strings).
local function parse(raw)
  local fields = raw[2]
  local e = {}
  for i = 1, #fields, 2 do
    e[fields[i]] = fields[i + 1]
  end
  e.off = tonumber(string.match(raw[1], '^(%d+)'))
  e.p = tonumber(e.p)
  e.ts = tonumber(e.ts)
  return e
end

local function entry(k, off)
  local r = redis.call('XRANGE', k.q, sid(off), sid(off))
  if r[1] then
    return parse(r[1])
  end
  return nil
end

-- Items of partition p from `from` are acknowledged up to this offset: the sender's own mark or
-- the one for every sender, whichever is further.
local function watermark(k, p, from)
  local key = p .. '|' .. from
  local w = k.wm[key]
  if w == nil then
    w = math.max(num(redis.call('HGET', k.ack, key)), num(redis.call('HGET', k.ack, p .. '|')))
    k.wm[key] = w
  end
  return w
end

local function acked(k, e)
  return e.off <= watermark(k, e.p, e.f)
end

-- What retention may drop once old enough: acknowledged items and the user's own copies.
local function droppable(k, e)
  return e.f == k.user or acked(k, e)
end

local function item_reply(k, e)
  local a = 0
  if acked(k, e) then
    a = 1
  end
  return { e.off, e.p, e.f, e.t, e.b, e.ts, e.m, e.d, num(e.po), a }
end

-- Offsets in [lo, hi] of the lexicographic index `key` for `prefix` (an `lp` name), ascending
-- or (desc) descending, at most n of them (0 = all).
local function lex_range(key, prefix, lo, hi, n, desc)
  if lo > hi then
    return {}
  end
  local a, b = '[' .. prefix .. pad(lo), '[' .. prefix .. pad(hi)
  local r
  if desc then
    if n > 0 then
      r = redis.call('ZREVRANGEBYLEX', key, b, a, 'LIMIT', '0', fmt(n))
    else
      r = redis.call('ZREVRANGEBYLEX', key, b, a)
    end
  else
    if n > 0 then
      r = redis.call('ZRANGEBYLEX', key, a, b, 'LIMIT', '0', fmt(n))
    else
      r = redis.call('ZRANGEBYLEX', key, a, b)
    end
  end
  local out = {}
  local skip = string.len(prefix)
  for i, m in ipairs(r) do
    out[i] = tonumber(string.sub(m, skip + 1))
  end
  return out
end

local function lex_count(key, prefix, lo, hi)
  return redis.call('ZLEXCOUNT', key, '[' .. prefix .. pad(lo), '[' .. prefix .. pad(hi))
end

local function tonumbers(list)
  local out = {}
  for i, v in ipairs(list) do
    out[i] = tonumber(v)
  end
  return out
end

-- Cursor fields (see keys.rs): the cursor itself and three maxima kept next to it.
local function cursor_field(p, from, device, kind)
  return 'c|' .. p .. '|' .. kind .. '|' .. lp(from) .. device
end

-- Where a device reads from by default: its furthest cursor of any kind, else the furthest
-- cursor of any device, else 1.
local function read_cursor(k, device, p, from)
  local own = redis.call('HGET', k.cur, 'd|' .. p .. '|' .. lp(from) .. device)
  local v
  if own then
    v = tonumber(own)
  else
    v = num(redis.call('HGET', k.cur, 'a|' .. p .. '|' .. from))
  end
  return math.max(v, 1)
end

local function raise(field, key, to)
  if to > num(redis.call('HGET', key, field)) then
    redis.call('HSET', key, field, fmt(to))
  end
end

-- Moves the cursor forward (never back); returns where it is afterwards.
local function move_cursor(k, device, p, from, kind, to)
  local f = cursor_field(p, from, device, kind)
  local cur = num(redis.call('HGET', k.cur, f))
  if cur == 0 then
    cur = 1
  end
  if to <= cur then
    return cur
  end
  redis.call('HSET', k.cur, f, fmt(to))
  raise('d|' .. p .. '|' .. lp(from) .. device, k.cur, to)
  raise('k|' .. p .. '|' .. kind .. '|' .. from, k.cur, to)
  raise('a|' .. p .. '|' .. from, k.cur, to)
  return to
end

-- The smallest offset after e's of a kept item with e's sender and message id.
local function next_same(k, e)
  local best = nil
  local prefix = lp(e.f)
  for p = 1, 3 do
    for _, o in ipairs(lex_range(k.ix[p], prefix, e.off + 1, MAXOFF, 0, false)) do
      if best and o > best then
        break
      end
      local c = entry(k, o)
      if c and c.m == e.m then
        best = o
        break
      end
    end
  end
  return best
end

-- Removals are collected per key and sent a few hundred members per command (`flush`).
local function new_batch()
  return { q = {}, ix = { {}, {}, {} }, po = { {}, {}, {} }, un = { {}, {}, {} }, sent = {} }
end

local function flush(k)
  local b = k.batch
  local function rem(cmd, key, list)
    for i = 1, #list, 256 do
      redis.call(cmd, key, unpack(list, i, math.min(i + 255, #list)))
    end
  end
  rem('XDEL', k.q, b.q)
  for p = 1, 3 do
    rem('ZREM', k.ix[p], b.ix[p])
    rem('ZREM', k.po[p], b.po[p])
    if p ~= CHAT then
      rem('ZREM', k.un[p], b.un[p])
    end
  end
  rem('ZREM', k.sent, b.sent)
  k.batch = new_batch()
end

-- Removes one item and its index entries (collected in k.batch until `flush`); its dedupe id
-- goes too at once (or moves to the next kept item with the same id). Cursors and
-- acknowledgement marks stay.
local function drop(k, e, touched)
  local b = k.batch
  local prefix = lp(e.f)
  b.q[#b.q + 1] = sid(e.off)
  b.ix[e.p][#b.ix[e.p] + 1] = prefix .. pad(e.off)
  b.po[e.p][#b.po[e.p] + 1] = fmt(e.off)
  if e.p == CHAT then
    touched[e.f] = true
    if e.f == k.user and e.t ~= '' then
      b.sent[#b.sent + 1] = lp(e.t) .. pad(e.off)
    end
  else
    b.un[e.p][#b.un[e.p] + 1] = fmt(e.off)
  end
  if e.m ~= '' then
    local idf = prefix .. e.m
    local xf = '#' .. idf
    local v = redis.call('HMGET', k.ids, idf, xf)
    local extra = num(v[2])
    if num(v[1]) == e.off then
      local nxt = nil
      if extra > 0 then
        -- The indexes must not list what was dropped before.
        flush(k)
        nxt = next_same(k, e)
      end
      if nxt then
        redis.call('HSET', k.ids, idf, fmt(nxt))
      else
        redis.call('HDEL', k.ids, idf)
      end
    end
    if extra > 1 then
      redis.call('HSET', k.ids, xf, fmt(extra - 1))
    elseif extra == 1 then
      redis.call('HDEL', k.ids, xf)
    end
  end
end

-- Where the droppable items are, as ranges of indexes: the user's own items (its key in every
-- partition), and per acknowledgement mark the items it covers (a sender's range up to its mark,
-- or every item of the partition up to the mark for every sender). Each source is a function
-- (lo, n) giving up to n (> 0) of its offsets from lo on, ascending.
local function droppable_sources(k)
  local sources = {}
  local own = lp(k.user)
  for p = 1, 3 do
    local key = k.ix[p]
    sources[#sources + 1] = function(lo, n)
      return lex_range(key, own, lo, MAXOFF, n, false)
    end
  end
  local marks = redis.call('HGETALL', k.ack)
  for i = 1, #marks, 2 do
    local field, w = marks[i], tonumber(marks[i + 1])
    local sep = string.find(field, '|', 1, true)
    local p = sep and tonumber(string.sub(field, 1, sep - 1))
    if p and k.ix[p] and w and w > 0 then
      local from = string.sub(field, sep + 1)
      if from == '' then
        local key = k.po[p]
        sources[#sources + 1] = function(lo, n)
          if lo > w then
            return {}
          end
          return tonumbers(redis.call('ZRANGEBYSCORE', key, fmt(lo), fmt(w), 'LIMIT', '0', fmt(n)))
        end
      else
        local key, prefix = k.ix[p], lp(from)
        sources[#sources + 1] = function(lo, n)
          return lex_range(key, prefix, lo, w, n, false)
        end
      end
    end
  end
  return sources
end

-- Calls fn on the offset of every droppable item, oldest first (a merge of the sources), until
-- it returns false. fn may drop the item.
local function each_droppable(k, fn)
  local sources = droppable_sources(k)
  local buf, pos, lo, done = {}, {}, {}, {}
  for i = 1, #sources do
    buf[i], pos[i], lo[i], done[i] = {}, 1, 1, false
  end
  local function head(i)
    if pos[i] > #buf[i] then
      if done[i] then
        return nil
      end
      buf[i], pos[i] = sources[i](lo[i], SCAN), 1
      if #buf[i] < SCAN then
        done[i] = true
      end
      if #buf[i] == 0 then
        return nil
      end
      lo[i] = buf[i][#buf[i]] + 1
    end
    return buf[i][pos[i]]
  end
  while true do
    local best = nil
    for i = 1, #sources do
      local v = head(i)
      if v and (best == nil or v < best) then
        best = v
      end
    end
    if best == nil then
      return
    end
    for i = 1, #sources do
      if head(i) == best then
        pos[i] = pos[i] + 1
      end
    end
    if not fn(best) then
      return
    end
  end
end

-- When retention may next drop something: the oldest droppable item's time + retention (times
-- never decrease along the stream); nothing droppable: not scheduled (an append of an own copy
-- or an acknowledgement schedules it again).
local function schedule(k, cfg, due)
  local first = nil
  if cfg.retention > 0 then
    each_droppable(k, function(o)
      first = entry(k, o)
      return first == nil
    end)
  end
  if first then
    redis.call('ZADD', due, fmt(first.ts + cfg.retention), k.user)
  else
    redis.call('ZREM', due, k.user)
  end
end

-- Compaction, the file store's rules: droppable items older than the retention go; then, over
-- `cfg.max` items, droppable items oldest first, then the oldest of the others. Finds droppable
-- items through the indexes (never walks the kept part of the queue).
-- Returns { dropped, dropped_unacked, kept }.
local function compact(k, now, cfg, due)
  local dropped, dropped_unacked = 0, 0
  local touched = {}
  k.batch = new_batch()
  if cfg.retention > 0 then
    local cutoff = now - cfg.retention
    -- Times never decrease along the stream (see `append_item`): the old ones come first.
    each_droppable(k, function(o)
      local e = entry(k, o)
      if e == nil then
        return true
      end
      if e.ts >= cutoff then
        return false
      end
      drop(k, e, touched)
      dropped = dropped + 1
      return true
    end)
    flush(k)
  end
  local kept = redis.call('XLEN', k.q)
  if cfg.max > 0 and kept > cfg.max then
    each_droppable(k, function(o)
      if kept <= cfg.max then
        return false
      end
      local e = entry(k, o)
      if e then
        if not acked(k, e) then
          dropped_unacked = dropped_unacked + 1
        end
        drop(k, e, touched)
        dropped = dropped + 1
        kept = kept - 1
      end
      return true
    end)
    flush(k)
    -- Every droppable item is gone: the oldest of the rest.
    while kept > cfg.max do
      local r = redis.call('XRANGE', k.q, '-', '+', 'COUNT', fmt(math.min(kept - cfg.max, SCAN)))
      if #r == 0 then
        break
      end
      for _, raw in ipairs(r) do
        local e = parse(raw)
        if not acked(k, e) then
          dropped_unacked = dropped_unacked + 1
        end
        drop(k, e, touched)
        dropped = dropped + 1
        kept = kept - 1
      end
      flush(k)
    end
  end
  for f, _ in pairs(touched) do
    if lex_count(k.ix[CHAT], lp(f), 0, MAXOFF) == 0 then
      redis.call('ZREM', k.snd, f)
    end
  end
  if dropped > 0 then
    -- Frees the stream's nodes of a dropped prefix (XDEL only marks entries deleted).
    local first = redis.call('XRANGE', k.q, '-', '+', 'COUNT', '1')
    if first[1] then
      redis.call('XTRIM', k.q, 'MINID', first[1][1])
    else
      redis.call('XTRIM', k.q, 'MAXLEN', '0')
    end
  end
  schedule(k, cfg, due)
  return { dropped, dropped_unacked, kept }
end

-- An append's item from ARGV[i .. i+7]: partition, from, to, payload, message id, device, peer
-- offset, dedupe ('1' or '0').
local function read_item(i)
  return {
    p = tonumber(ARGV[i]),
    f = ARGV[i + 1],
    t = ARGV[i + 2],
    b = ARGV[i + 3],
    m = ARGV[i + 4],
    d = ARGV[i + 5],
    po = tonumber(ARGV[i + 6]),
    dedupe = ARGV[i + 7] == '1',
  }
end

-- Checks before anything is written: the stream's last item is not past the sequence (XADD
-- would refuse the next offset). Returns the last item, or false for an empty stream.
local function precheck(k)
  local last = redis.call('XREVRANGE', k.q, '+', '-', 'COUNT', '1')
  local seq = num(redis.call('GET', k.seq))
  if last[1] then
    local e = parse(last[1])
    if e.off > seq then
      return nil
    end
    return e
  end
  return false
end

-- Past max_queue_items by an eighth: compacts. Returns { dropped, dropped_unacked }.
local function limit_queue(k, now, cfg, due)
  if cfg.max > 0 and redis.call('XLEN', k.q) > cfg.max + math.floor(cfg.max / 8) then
    local c = compact(k, now, cfg, due)
    return { c[1], c[2] }
  end
  return { 0, 0 }
end

-- Appends one item (or finds the original with dedupe). `last` is precheck's result. Returns
-- { offset, timestamp, duplicate }; the caller applies the queue limit (`limit_queue`).
local function append_item(k, it, last, now, cfg, users, due)
  if it.dedupe and it.m ~= '' then
    local o = redis.call('HGET', k.ids, lp(it.f) .. it.m)
    if o then
      local e = entry(k, tonumber(o))
      if e and e.f == it.f and e.m == it.m then
        return { e.off, e.ts, 1 }
      end
    end
  end
  -- Never older than the item before it, so the items past the retention are a prefix.
  local ts = now
  if last and last.ts > ts then
    ts = last.ts
  end
  local off = redis.call('INCR', k.seq)
  local p = it.p
  redis.call('XADD', k.q, sid(off), 'p', fmt(p), 'f', it.f, 't', it.t, 'b', it.b, 'ts', fmt(ts),
    'm', it.m, 'd', it.d, 'po', fmt(it.po))
  redis.call('ZADD', k.ix[p], '0', lp(it.f) .. pad(off))
  redis.call('ZADD', k.po[p], fmt(off), fmt(off))
  if p == CHAT then
    redis.call('ZADD', k.snd, fmt(off), it.f)
    if it.f == k.user and it.t ~= '' then
      redis.call('ZADD', k.sent, '0', lp(it.t) .. pad(off))
    end
  else
    redis.call('ZADD', k.un[p], fmt(off), fmt(off))
  end
  if it.m ~= '' then
    local idf = lp(it.f) .. it.m
    if redis.call('HSETNX', k.ids, idf, fmt(off)) == 0 then
      redis.call('HINCRBY', k.ids, '#' .. idf, '1')
    end
  end
  redis.call('SADD', users, k.user)
  if cfg.retention > 0 and it.f == k.user then
    redis.call('ZADD', due, 'LT', fmt(ts + cfg.retention), k.user)
  end
  return { off, ts, 0 }
end
