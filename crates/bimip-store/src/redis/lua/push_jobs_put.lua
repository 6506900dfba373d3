-- put_jobs: each job is stored unless its stored version is newer or it was removed at a version
-- not older than the given one. KEYS: 1 jobs, 2 versions of live jobs, 3 tombstones (id ->
-- version), 4 tombstone times (zset). ARGV: (id, version, encoded job) per job.
for i = 1, #ARGV, 3 do
  local id, v = ARGV[i], ARGV[i + 1]
  local dead = redis.call('HGET', KEYS[3], id)
  local live = redis.call('HGET', KEYS[2], id)
  if not (dead and int_cmp(dead, v) >= 0) and not (live and int_cmp(live, v) > 0) then
    redis.call('HSET', KEYS[1], id, ARGV[i + 2])
    redis.call('HSET', KEYS[2], id, v)
    if dead then
      redis.call('HDEL', KEYS[3], id)
      redis.call('ZREM', KEYS[4], id)
    end
  end
end
return 1
