-- remove_jobs: each job is removed unless its stored version is newer; a tombstone remembers the
-- version (also for a job not stored yet) so that an older put arriving later is ignored.
-- Tombstones older than the cutoff are forgotten, a bounded number per call.
-- KEYS: as push_jobs_put.lua. ARGV: 1 now (unix ms), 2 cutoff (unix ms), then (id, version).
for i = 3, #ARGV, 2 do
  local id, v = ARGV[i], ARGV[i + 1]
  local dead = redis.call('HGET', KEYS[3], id)
  local live = redis.call('HGET', KEYS[2], id)
  if not (dead and int_cmp(dead, v) >= 0) and not (live and int_cmp(live, v) > 0) then
    if live then
      redis.call('HDEL', KEYS[1], id)
      redis.call('HDEL', KEYS[2], id)
    end
    redis.call('HSET', KEYS[3], id, v)
    redis.call('ZADD', KEYS[4], ARGV[1], id)
  end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[2], 'LIMIT', 0, 256)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
return 1
