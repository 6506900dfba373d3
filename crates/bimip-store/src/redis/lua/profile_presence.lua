-- set_presence: intent, invisibility and last seen of one user; returns the whole profile.
-- KEYS: 1 {u}:prof, 2 {u}:contacts, 3 {u}:listed_by, 4 {u}:blocks, 5 {u}:blocked_by, 6 users.
-- ARGV: 1 user, 2 now (unix ms), 3 intent ('' = unchanged, else the status number, 0 clears),
-- 4 details, 5 invisible ('' = unchanged, 0 or 1), 6 last seen ('' = unchanged).
-- Absent fields mean 0 / ''; only fields whose value changes are written.
local p = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  p[flat[i]] = flat[i + 1]
end
local set = {}
local function put(field, value, default)
  if (p[field] or default) ~= value then
    table.insert(set, field)
    table.insert(set, value)
  end
end
if ARGV[3] ~= '' then
  put('intent', ARGV[3], '0')
  put('details', ARGV[4], '')
  put('intent_at', ARGV[2], '0')
end
if ARGV[5] ~= '' and ARGV[5] ~= (p['invisible'] or '0') then
  put('invisible', ARGV[5], '0')
  if ARGV[5] == '1' then
    put('invisible_since', ARGV[2], '0')
  else
    put('invisible_since', '0', '0')
  end
end
if ARGV[6] ~= '' then
  put('last_seen', ARGV[6], '0')
end
if #set > 0 then
  redis.call('HSET', KEYS[1], unpack(set))
  redis.call('SADD', KEYS[6], ARGV[1])
end
return {
  redis.call('HGETALL', KEYS[1]),
  redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('SMEMBERS', KEYS[4]),
  redis.call('SMEMBERS', KEYS[5]),
}
