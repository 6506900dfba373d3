-- Sends a frame for one user to the other nodes that hold a connection of it: one PUBLISH per
-- node, whatever the number of devices there. Entries of nodes whose lease ran out are skipped
-- (they are being reaped), and so is every incarnation of this node (it delivered locally).
-- KEYS[1] the user's presence hash  KEYS[2] node leases  KEYS[3] the user's push tokens
-- ARGV[1] this node's name  ARGV[2] channel prefix  ARGV[3] payload
-- Returns {1 if the user has a push token else 0, the devices on the nodes it published to...}:
-- the push decision that follows needs no round trip of its own.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local nodes, alive = {}, {}
local devices = {redis.call('EXISTS', KEYS[3])}
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 2) == 'c:' then
    local inc = string.match(string.sub(f, 3), '^(.*):[^:]*$')
    if inc then
      local name = string.match(inc, '^([^/]*)')
      if name ~= ARGV[1] then
        if alive[inc] == nil then
          local lease = redis.call('ZSCORE', KEYS[2], inc)
          alive[inc] = lease ~= false and lease ~= nil and tonumber(lease) >= now
        end
        if alive[inc] then
          nodes[name] = true
          devices[#devices + 1] = all[i + 1]
        end
      end
    end
  end
end
for name, _ in pairs(nodes) do
  redis.call('PUBLISH', ARGV[2] .. name, ARGV[3])
end
return devices
