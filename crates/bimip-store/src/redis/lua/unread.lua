-- unread (never writes). KEYS: the user's 15 queue keys. ARGV: user.
-- Returns { { from, unread, first, last }... } (chat senders other than the user with items at
-- or past the furthest cursor of any device).
local k = user_keys(0, ARGV[1])
local out = {}
for _, from in ipairs(redis.call('ZRANGE', k.snd, '0', '-1')) do
  if from ~= k.user then
    local prefix = lp(from)
    local cursor = math.max(num(redis.call('HGET', k.cur, 'a|' .. CHAT .. '|' .. from)), 1)
    local unread = lex_count(k.ix[CHAT], prefix, cursor, MAXOFF)
    if unread > 0 then
      local first = lex_range(k.ix[CHAT], prefix, cursor, MAXOFF, 1, false)[1]
      local last = lex_range(k.ix[CHAT], prefix, cursor, MAXOFF, 1, true)[1]
      out[#out + 1] = { from, unread, first, last }
    end
  end
end
return out
