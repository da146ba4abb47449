-- dead.lua: the dead letter, kept bounded: put an entry, or take one exactly once.
--
-- KEYS: h (hash: id -> JSON entry), z (zset: id -> dead-lettered time)
-- ARGV: 'put', id, json, dead_at, max_entries, ttl_seconds  -> number of entries dropped (oldest first)
--       'take', id                                         -> the JSON entry, or false when already taken
--       'purge'                                            -> the number of entries deleted

local h, z = KEYS[1], KEYS[2]
if ARGV[1] == 'put' then
  redis.call('HSET', h, ARGV[2], ARGV[3])
  redis.call('ZADD', z, ARGV[4], ARGV[2])
  local dropped = 0
  local extra = redis.call('ZCARD', z) - tonumber(ARGV[5])
  if extra > 0 then
    local oldest = redis.call('ZPOPMIN', z, extra)
    for i = 1, #oldest, 2 do redis.call('HDEL', h, oldest[i]) end
    dropped = extra
  end
  redis.call('EXPIRE', h, ARGV[6])
  redis.call('EXPIRE', z, ARGV[6])
  return dropped
end
if ARGV[1] == 'purge' then
  local count = redis.call('ZCARD', z)
  redis.call('DEL', h, z)
  return count
end
local entry = redis.call('HGET', h, ARGV[2])
if not entry then return false end
redis.call('HDEL', h, ARGV[2])
redis.call('ZREM', z, ARGV[2])
return entry
