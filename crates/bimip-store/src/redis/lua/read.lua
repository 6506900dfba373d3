-- read (never writes). KEYS: the user's 15 queue keys.
-- ARGV: user, device, partition, peer ('' = every sender), start ('' = none), limit (0 = none),
-- with_sent ('1'/'0'), newest_first ('1'/'0').
-- Returns { more, start, item... } (see item_reply).
local k = user_keys(0, ARGV[1])
local device, p, from = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local limit = tonumber(ARGV[6])
local with_sent, newest = ARGV[7] == '1', ARGV[8] == '1'
local start
if ARGV[5] ~= '' then
  start = tonumber(ARGV[5])
elseif newest then
  start = MAXOFF
else
  start = read_cursor(k, device, p, from)
end
start = math.min(math.max(start, 1), MAXOFF)
-- One more than a page, to know whether there is more.
local n = 0
if limit > 0 then
  n = limit + 1
end

local offs
if from == '' then
  local r
  if newest then
    if n > 0 then
      r = redis.call('ZREVRANGEBYSCORE', k.po[p], fmt(start), '-inf', 'LIMIT', '0', fmt(n))
    else
      r = redis.call('ZREVRANGEBYSCORE', k.po[p], fmt(start), '-inf')
    end
  else
    if n > 0 then
      r = redis.call('ZRANGEBYSCORE', k.po[p], fmt(start), '+inf', 'LIMIT', '0', fmt(n))
    else
      r = redis.call('ZRANGEBYSCORE', k.po[p], fmt(start), '+inf')
    end
  end
  offs = tonumbers(r)
else
  local lo, hi = start, MAXOFF
  if newest then
    lo, hi = 1, start
  end
  offs = lex_range(k.ix[p], lp(from), lo, hi, n, newest)
  -- The user's own key already holds every copy it sent: no second list for itself.
  if with_sent and p == CHAT and from ~= k.user then
    local sent = lex_range(k.sent, lp(from), lo, hi, n, newest)
    if #sent > 0 then
      local merged, i, j = {}, 1, 1
      while i <= #offs or j <= #sent do
        local x, y = offs[i], sent[j]
        local take_x
        if x == nil then
          take_x = false
        elseif y == nil then
          take_x = true
        elseif newest then
          take_x = x > y
        else
          take_x = x < y
        end
        if take_x then
          merged[#merged + 1] = x
          i = i + 1
        else
          merged[#merged + 1] = y
          j = j + 1
        end
      end
      offs = merged
    end
  end
end

local more = 0
if limit > 0 and #offs > limit then
  more = 1
end
local out = { more, start }
for i, o in ipairs(offs) do
  if limit > 0 and i > limit then
    break
  end
  local e = entry(k, o)
  if e then
    out[#out + 1] = item_reply(k, e)
  end
end
return out
