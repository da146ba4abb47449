-- park.lua: deferred tasks kept until due, released once each, in due order, paced per key
-- (see stores/memory.py:_Park, the same rules).
--
-- KEYS: due (zset id -> due time), msg (hash id -> entry JSON), meta (hash id ->
--   "interval|key"), claims (zset id -> claim expiry), slotted (set of ids given a paced
--   slot), count (hash key -> parked), pace (hash key -> next release time), seq (string)
-- ARGV: action, now ('' = server TIME), then per action:
--   'put', now, key, delay, interval, entry JSON (kept as given: the id and due time
--          are returned, and returned again by take), limit per key, ttl seconds
--                                            -> {id, due} or false when the key is full
--   'take', now, limit, lease, ttl           -> {id, due, JSON, ...} of the claimed entries
--   'confirm', now, id                       -> 1 if the entry was still there
--   'release', now, key                      -> how many entries were made due now
--   'purge', now, key ('' = every key)       -> how many entries were deleted
-- Ids are a 16-digit sequence, so entries due together leave in the order they came.
-- Entries with an interval of 0 are not paced: they leave when due.

local due, msg, meta, claims, slotted, count, pace, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local action = ARGV[1]
local now = clock(ARGV[2])

local function expire_all(ttl)
  for i = 1, 8 do redis.call('EXPIRE', KEYS[i], ttl) end
end

local function forget(id)
  local m = redis.call('HGET', meta, id)
  redis.call('ZREM', due, id)
  redis.call('ZREM', claims, id)
  redis.call('SREM', slotted, id)
  redis.call('HDEL', msg, id)
  redis.call('HDEL', meta, id)
  if not m then return 0 end
  local key = string.match(m, '^[^|]*|(.*)$')
  if redis.call('HINCRBY', count, key, -1) <= 0 then
    redis.call('HDEL', count, key)
    redis.call('HDEL', pace, key)
  end
  return 1
end

if action == 'put' then
  local key, delay, interval, entry = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
  if tonumber(redis.call('HGET', count, key) or '0') >= tonumber(ARGV[7]) then return false end
  local id = string.format('%016d', redis.call('INCR', seq))
  local at = now + delay
  redis.call('HSET', msg, id, entry)
  redis.call('HSET', meta, id, interval .. '|' .. key)
  redis.call('ZADD', due, at, id)
  redis.call('HINCRBY', count, key, 1)
  expire_all(ARGV[8])
  return {id, fmt(at)}
end

if action == 'take' then
  local limit, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', claims, '-inf', fmt(now))) do
    -- its releaser died before confirming: due again, at once
    redis.call('ZREM', claims, id)
    redis.call('SADD', slotted, id)
    redis.call('ZADD', due, now, id)
  end
  local out, taken = {}, 0
  local candidates = redis.call('ZRANGEBYSCORE', due, '-inf', fmt(now), 'WITHSCORES', 'LIMIT', 0, 4 * limit)
  for i = 1, #candidates, 2 do
    if taken >= limit then break end
    local id, at = candidates[i], candidates[i + 1]
    local m = redis.call('HGET', meta, id)
    local interval, key = string.match(m or '0|', '^([^|]*)|(.*)$')
    interval = tonumber(interval)
    local release = true
    if redis.call('SREM', slotted, id) == 0 and interval > 0 then  -- paced: the key's next slot
      local next_at = tonumber(redis.call('HGET', pace, key) or '0')
      if next_at > now then  -- the key's next release slot is this entry's
        redis.call('SADD', slotted, id)
        redis.call('ZADD', due, next_at, id)
        redis.call('HSET', pace, key, fmt(next_at + interval))
        release = false
      else
        redis.call('HSET', pace, key, fmt(math.max(next_at, now) + interval))
      end
    end
    if release then
      redis.call('ZREM', due, id)
      redis.call('ZADD', claims, now + lease, id)
      out[#out + 1] = id
      out[#out + 1] = at
      out[#out + 1] = redis.call('HGET', msg, id)
      taken = taken + 1
    end
  end
  expire_all(ARGV[5])
  return out
end

if action == 'confirm' then
  -- Even after its claim expired: it was published, so it must not be released again.
  return forget(ARGV[3])
end

if action == 'release' or action == 'purge' then
  local key, n = ARGV[3], 0
  local all = redis.call('HGETALL', meta)
  for i = 1, #all, 2 do
    local id, k = all[i], string.match(all[i + 1], '^[^|]*|(.*)$')
    if key == '' or k == key then
      if action == 'purge' then
        n = n + forget(id)
      elseif redis.call('ZSCORE', due, id) then
        redis.call('SREM', slotted, id)
        redis.call('ZADD', due, now, id)
        n = n + 1
      end
    end
  end
  if action == 'release' then redis.call('HDEL', pace, key) end
  return n
end

return redis.error_reply('park.lua: unknown action ' .. tostring(action))
