-- pending (never writes). KEYS: the user's 15 queue keys. ARGV: user, device.
-- Returns { { from, unread, first, last, last item }..., }, { notification item... },
-- { receipt item... } }.
local k = user_keys(0, ARGV[1])
local device = ARGV[2]
local senders = {}
for _, from in ipairs(redis.call('ZRANGE', k.snd, '0', '-1')) do
  if from ~= k.user then
    local prefix = lp(from)
    local cursor = read_cursor(k, device, CHAT, from)
    local unread = lex_count(k.ix[CHAT], prefix, cursor, MAXOFF)
    if unread > 0 then
      local first = lex_range(k.ix[CHAT], prefix, cursor, MAXOFF, 1, false)[1]
      local last = lex_range(k.ix[CHAT], prefix, cursor, MAXOFF, 1, true)[1]
      local e = entry(k, last)
      if e then
        senders[#senders + 1] = { from, unread, first, last, item_reply(k, e) }
      end
    end
  end
end
local function unacked(p)
  local out = {}
  for _, o in ipairs(redis.call('ZRANGE', k.un[p], '0', '-1')) do
    local e = entry(k, tonumber(o))
    if e then
      out[#out + 1] = item_reply(k, e)
    end
  end
  return out
end
return { senders, unacked(2), unacked(3) }
