-- put_contacts: the user's contacts and each contact's listed_by in one atomic step.
-- On a single Redis every key is declared in KEYS; Redis Cluster would need the file store's
-- ordered two-step (reverse side first when adding, own side first when removing).
--
-- KEYS[1] = {user}:contacts, KEYS[2] = users,
-- KEYS[2+i] = {c_i}:listed_by for the n wanted contacts, then for the m known current contacts.
-- ARGV[1] = user, ARGV[2] = replace (0/1), ARGV[3] = n,
-- ARGV[2+2i], ARGV[3+2i] = contact i, one_way (0/1); then the m known contact names.
-- Returns {'ok', changed} or, when `replace` would drop contacts whose keys were not passed,
-- {'retry', name...} (the caller calls again with them as known).
local user = ARGV[1]
local replace = ARGV[2] == '1'
local n = tonumber(ARGV[3])
local wanted = {}
for i = 1, n do
  wanted[ARGV[2 + 2 * i]] = true
end
local known = {}
for j = 1, #ARGV - 3 - 2 * n do
  known[ARGV[3 + 2 * n + j]] = KEYS[2 + n + j]
end
local cur = {}
local order = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  cur[flat[i]] = flat[i + 1]
  table.insert(order, flat[i])
end
if replace then
  local missing = {'retry'}
  for _, c in ipairs(order) do
    if not wanted[c] and not known[c] then
      table.insert(missing, c)
    end
  end
  if #missing > 1 then
    return missing
  end
end
local changed = 0
local wrote = false
for i = 1, n do
  local c, flag = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if cur[c] ~= flag then
    changed = changed + 1
    redis.call('HSET', KEYS[2 + i], user, flag)
    redis.call('HSET', KEYS[1], c, flag)
    redis.call('SADD', KEYS[2], c)
    wrote = true
  end
end
if replace then
  for _, c in ipairs(order) do
    if not wanted[c] then
      redis.call('HDEL', KEYS[1], c)
      redis.call('HDEL', known[c], user)
    end
  end
end
if wrote then
  redis.call('SADD', KEYS[2], user)
end
return {'ok', tostring(changed)}
