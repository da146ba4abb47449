-- Shared helpers, prepended to every script of this folder when it is loaded.
-- The rules mirror limitpal_tasks/core/rules.py step for step (a differential test holds
-- them equal): keep the arithmetic in the same order so both stores round alike.
--
-- Per key K (hash tag {K}), four Redis keys:
--   s  hash    scalars: pause (pu, pr), breaker (bs state, bg generation, bo open_until,
--              bn consecutive opens, bk/bw probe successes/slow, wt/ws window shape,
--              wc cursor, tc/tf/tl window totals), GCRA TATs (r:<slot>), budget (y*)
--   l  zset    leases: ticket id -> expiry
--   p  zset    half-open probe leases: ticket id -> expiry
--   w  string  count window ring (one byte per call) | hash: second -> "calls:failures:slow"

local function fmt(x) return string.format('%.17g', x) end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function num(s, field, default)
  local v = redis.call('HGET', s, field)
  if v then return tonumber(v) end
  return default
end

local function clear_window(s, w, wt, ws)
  redis.call('DEL', w)
  if wt then redis.call('HSET', s, 'wt', wt, 'ws', fmt(ws)) end
  redis.call('HSET', s, 'wc', '0', 'tc', '0', 'tf', '0', 'tl', '0')
end

-- Add one outcome to the sliding window (count ring, or one-second buckets).
local function window_add(s, w, wt, ws, now, failed, slow)
  if redis.call('HGET', s, 'wt') ~= wt or num(s, 'ws', -1) ~= ws then
    clear_window(s, w, wt, ws)
  end
  local code = 1 + (failed and 2 or 0) + (slow and 4 or 0)
  local tc, tf, tl = num(s, 'tc', 0), num(s, 'tf', 0), num(s, 'tl', 0)
  if wt == 'count' then
    local cursor = num(s, 'wc', 0)
    local old = redis.call('GETRANGE', w, cursor, cursor)
    old = (old ~= '') and string.byte(old) or 0
    if old ~= 0 then
      tc = tc - 1
      if old % 4 >= 2 then tf = tf - 1 end
      if old >= 4 then tl = tl - 1 end
    end
    redis.call('SETRANGE', w, cursor, string.char(code))
    redis.call('HSET', s, 'wc', fmt((cursor + 1) % ws))
  else
    local size = ws
    local second = math.floor(now)
    local cursor = num(s, 'wc', 0)
    if second - cursor >= size then
      redis.call('DEL', w)
      tc, tf, tl, cursor = 0, 0, 0, 0
    else
      for old = cursor - size + 1, second - size do
        local bucket = redis.call('HGET', w, fmt(old))
        if bucket then
          local c, f, l = string.match(bucket, '(%d+):(%d+):(%d+)')
          tc, tf, tl = tc - tonumber(c), tf - tonumber(f), tl - tonumber(l)
          redis.call('HDEL', w, fmt(old))
        end
      end
    end
    redis.call('HSET', s, 'wc', fmt(math.max(cursor, second)))
    local field = fmt(second)
    local bucket = redis.call('HGET', w, field)
    local c, f, l = 0, 0, 0
    if bucket then
      c, f, l = string.match(bucket, '(%d+):(%d+):(%d+)')
      c, f, l = tonumber(c), tonumber(f), tonumber(l)
    end
    redis.call('HSET', w, field, string.format('%d:%d:%d', c + 1, f + (failed and 1 or 0), l + (slow and 1 or 0)))
  end
  tc = tc + 1
  if failed then tf = tf + 1 end
  if slow then tl = tl + 1 end
  redis.call('HSET', s, 'tc', fmt(tc), 'tf', fmt(tf), 'tl', fmt(tl))
  return tc, tf, tl
end

-- Remember the latest time something written under the key still matters.
local function extend(s, t)
  if t > num(s, 'hz', 0) then redis.call('HSET', s, 'hz', fmt(t)) end
end

-- Re-arm the TTL of every key of the group: idle_ttl past the latest pending time.
local function touch(s, l, p, w, now, idle_ttl)
  local latest = math.max(num(s, 'hz', 0), num(s, 'pu', 0), num(s, 'bo', 0))
  local ms = math.ceil((math.max(0, latest - now) + idle_ttl) * 1000)
  for _, k in ipairs({s, l, p, w}) do redis.call('PEXPIRE', k, ms) end
end

-- Seconds until the earliest lease of zset z expires, at most cap.
local function earliest(z, now, cap)
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if not first[2] then return cap end
  return math.min(cap, math.max(0, tonumber(first[2]) - now))
end

-- Advance the retry budget's two windows to the one holding now; weight of the previous.
local function budget_roll(s, window, now)
  local start = math.floor(now / window) * window
  local current = num(s, 'ys', 0)
  if start > current then
    if start - current > window then
      redis.call('HSET', s, 'yA', '0', 'yR', '0')
    else
      redis.call('HSET', s, 'yA', fmt(num(s, 'ya', 0)), 'yR', fmt(num(s, 'yr', 0)))
    end
    redis.call('HSET', s, 'ya', '0', 'yr', '0', 'ys', fmt(start))
    current = start
  end
  return math.max(0.0, 1.0 - (now - current) / window)
end

local function open_breaker(s, w, p, now, rand, open_for, open_for_max, multiplier, open_jitter)
  local opens = num(s, 'bn', 0) + 1
  local generation = num(s, 'bg', 0) + 1
  local duration = math.min(open_for_max, open_for * multiplier ^ math.max(0, opens - 1))
  duration = duration * (1.0 - open_jitter * rand)
  redis.call('HSET', s, 'bn', fmt(opens), 'bs', 'open', 'bg', fmt(generation), 'bo', fmt(now + duration))
  redis.call('DEL', p)
  clear_window(s, w, nil, nil)
  return generation
end
