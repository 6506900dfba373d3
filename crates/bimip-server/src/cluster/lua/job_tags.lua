-- Push job ids carry the tag of the node that made them. This takes over the tags whose node is
-- no longer alive (no incarnation of that name holds a lease), atomically, so exactly one node
-- dispatches a dead node's jobs.
-- KEYS[1] tag → node name  KEYS[2] node leases
-- ARGV[1] this node's name  ARGV[2] this node's new tag ('' = none)
-- ARGV[3] '1' to take this name's own old tags too (at start: they are a previous run's)
-- Returns the tags taken (the new one included).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local taken = {}
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[1])
  taken[#taken + 1] = ARGV[2]
end
local alive = {}
local leases = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
for _, inc in ipairs(leases) do
  local name = string.match(inc, '^([^/]*)')
  alive[name] = true
end
local owners = redis.call('HGETALL', KEYS[1])
for i = 1, #owners, 2 do
  local tag, owner = owners[i], owners[i + 1]
  if tag ~= ARGV[2] then
    local own_old = owner == ARGV[1] and ARGV[3] == '1'
    if own_old or (owner ~= ARGV[1] and not alive[owner]) then
      redis.call('HSET', KEYS[1], tag, ARGV[1])
      taken[#taken + 1] = tag
    end
  end
end
return taken
