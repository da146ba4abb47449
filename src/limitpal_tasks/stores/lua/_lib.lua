-- Shared helpers, prepended to every script of this folder when it is loaded.
-- The rules mirror limitpal_tasks/core/rules.py step for step (a differential test holds
-- them equal): keep the arithmetic in the same order so both stores round alike.
--
-- Per key K (hash tag {K}), four Redis keys:
--   s  hash    scalars: pause (pu, pr), breaker (bs state, bg generation, bo open_until,
--              bn consecutive opens, bk/bw probe successes/slow, wt/ws window shape,
--              wc cursor, tc/tf/tl window totals), GCRA TATs (r:<slot>), retry budget
--              (ys start, ya/yr admissions/retries, yA/yR previous window), hz horizon,
--              po policy of the last admission, o:<slot> operator rate override
--              ("limit:per:burst:until", until 0 = permanent), pm 1 while a permanent
--              override keeps s from expiring, a:<slot> an adaptive limit's learned state
--              ("rate:reported:previous:changed_at:cut_at:bucket:count:last", see
--              core/rules.py:AdaptiveData)
--   l  zset    leases: ticket id -> expiry
--   p  zset    half-open probe leases: ticket id -> expiry
--   w  string  count window ring (one byte per call) | hash: second -> "calls:failures:slow"
--
-- A script reads the fields it needs of s in one HMGET into a table, works on the table,
-- and writes back only what changed in one HSET (see load/save). Numbers go to Redis as
-- Lua numbers, which Redis writes with 17 significant digits: they read back exactly.

local function fmt(x) return string.format('%.17g', x) end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Split a packed argument on the unit separator (keys never contain control characters).
local function split(text)
  local out, start = {}, 1
  while true do
    local stop = string.find(text, '\31', start, true)
    if not stop then
      out[#out + 1] = string.sub(text, start)
      return out
    end
    out[#out + 1] = string.sub(text, start, stop - 1)
    start = stop + 1
  end
end

local ALL = {'pu', 'pr', 'bs', 'bg', 'bo', 'bn', 'bk', 'bw', 'wt', 'ws', 'wc', 'tc', 'tf', 'tl',
             'ys', 'ya', 'yr', 'yA', 'yR', 'hz'}
local BUDGET = {'ys', 'ya', 'yr', 'yA', 'yR'}

-- The state table of hash s, holding the given fields (and those finish() needs).
local function load(s, fields, extra)
  local names = {'hz', 'pu', 'bo', 'pm'}
  for _, list in ipairs({fields, extra or {}}) do
    for _, f in ipairs(list) do names[#names + 1] = f end
  end
  local values = redis.call('HMGET', s, unpack(names))
  local H = {_key = s, _dirty = {}, _raw = {}, _touched = {}}
  for i, f in ipairs(names) do
    local v = values[i]
    if v then H._raw[f] = tonumber(v) or v end
  end
  return H
end

local function get(H, field, default)
  local v = H._raw[field]
  if v == nil then return default end
  return v
end

local function set(H, field, value)
  H._raw[field] = value
  H._dirty[field] = true
end

-- Note that key k (l, p or w of the group) was written, so finish() re-arms its TTL.
local function touched(H, k)
  H._touched[#H._touched + 1] = k
end

local function save(H)
  local args = {}
  for f in pairs(H._dirty) do
    args[#args + 1] = f
    args[#args + 1] = H._raw[f]
  end
  if #args > 0 then redis.call('HSET', H._key, unpack(args)) end
  H._dirty = {}
end

local function clear_window(H, w, wt, ws)
  redis.call('DEL', w)
  touched(H, w)
  if wt then set(H, 'wt', wt); set(H, 'ws', ws) end
  set(H, 'wc', 0); set(H, 'tc', 0); set(H, 'tf', 0); set(H, 'tl', 0)
end

-- Add one outcome to the sliding window (count ring, or one-second buckets).
local function window_add(H, w, wt, ws, now, failed, slow)
  if get(H, 'wt', '') ~= wt or get(H, 'ws', -1) ~= ws then clear_window(H, w, wt, ws) end
  local code = 1 + (failed and 2 or 0) + (slow and 4 or 0)
  touched(H, w)
  local tc, tf, tl = get(H, 'tc', 0), get(H, 'tf', 0), get(H, 'tl', 0)
  local cursor = get(H, 'wc', 0)
  if wt == 'count' then
    local old = redis.call('GETRANGE', w, cursor, cursor)
    old = (old ~= '') and string.byte(old) or 0
    if old ~= 0 then
      tc = tc - 1
      if old % 4 >= 2 then tf = tf - 1 end
      if old >= 4 then tl = tl - 1 end
    end
    redis.call('SETRANGE', w, cursor, string.char(code))
    set(H, 'wc', (cursor + 1) % ws)
  else
    local second = math.floor(now)
    if second - cursor >= ws then
      redis.call('DEL', w)
      tc, tf, tl, cursor = 0, 0, 0, 0
    else
      for old = cursor - ws + 1, second - ws do
        local bucket = redis.call('HGET', w, fmt(old))
        if bucket then
          local c, f, l = string.match(bucket, '(%d+):(%d+):(%d+)')
          tc, tf, tl = tc - tonumber(c), tf - tonumber(f), tl - tonumber(l)
          redis.call('HDEL', w, fmt(old))
        end
      end
    end
    set(H, 'wc', math.max(cursor, second))
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
  set(H, 'tc', tc); set(H, 'tf', tf); set(H, 'tl', tl)
  return tc, tf, tl
end

-- Remember the latest time something written under the key still matters.
local function extend(H, t)
  if t > get(H, 'hz', 0) then set(H, 'hz', t) end
end

-- Write the state back and re-arm the TTL of every key written: idle_ttl past the latest
-- pending time (so an idle key's memory is gone idle_ttl after it stops mattering).
local function finish(H, now, idle_ttl)
  local written = next(H._dirty) ~= nil
  save(H)
  if not written and #H._touched == 0 then return end
  local latest = math.max(get(H, 'hz', 0), get(H, 'pu', 0), get(H, 'bo', 0))
  local ms = math.ceil((math.max(0, latest - now) + idle_ttl) * 1000)
  if get(H, 'pm', nil) then
    redis.call('PERSIST', H._key)
  else
    redis.call('PEXPIRE', H._key, ms)
  end
  local seen = {}
  for _, k in ipairs(H._touched) do
    if not seen[k] then
      seen[k] = true
      redis.call('PEXPIRE', k, ms)
    end
  end
end

-- An operator's override of a limit, if in force: its interval and burst.
local function overridden(H, slot, now)
  local o = get(H, 'o:' .. slot, nil)
  if o then
    local limit, per, b, until_ = string.match(o, '^([^:]+):([^:]+):([^:]+):([^:]+)$')
    until_ = tonumber(until_)
    if until_ == 0 or until_ > now then return tonumber(per) / tonumber(limit), tonumber(b) end
  end
  return nil
end

local function clamp(x, low, high) return math.min(math.max(x, low), high) end

-- The interval and burst a rate limit runs at now (see core/rules.py:_effective): an
-- operator's override while it is in force, else an adaptive limit's learned rate
-- (floor and ceiling given: the limit adapts), else its own.
local function effective(H, slot, interval, burst, now, floor, ceiling)
  local o_interval, o_burst = overridden(H, slot, now)
  if o_interval then return o_interval, o_burst end
  if floor then
    local a = get(H, 'a:' .. slot, nil)
    if a then
      local rate = tonumber(string.match(a, '^([^:]+):'))
      return 1.0 / clamp(rate, floor, ceiling), burst
    end
  end
  return interval, burst
end

local GOODPUT_WINDOW, GOODPUT_MARGIN, REPORT_STEP, BINDING_SHARE = 1.0, 0.95, 1.1, 0.75

local function adaptive_load(H, slot, start)
  local a = get(H, 'a:' .. slot, nil)
  if not a then
    return {rate = start, reported = start, previous = start, changed_at = 0.0, cut_at = 0.0,
            bucket = 0.0, count = 0, last = 0}
  end
  local v = {}
  for x in string.gmatch(a, '[^:]+') do v[#v + 1] = tonumber(x) end
  return {rate = v[1], reported = v[2], previous = v[3], changed_at = v[4], cut_at = v[5],
          bucket = v[6], count = v[7], last = v[8]}
end

local function adaptive_save(H, slot, D)
  set(H, 'a:' .. slot, table.concat({fmt(D.rate), fmt(D.reported), fmt(D.previous), fmt(D.changed_at),
    fmt(D.cut_at), fmt(D.bucket), fmt(D.count), fmt(D.last)}, ':'))
end

-- Feed one recorded outcome to the group's adaptive limits (see core/rules.py:adapt_rates);
-- appends {key, limit, from, to, reason, policy} to C for each change reported.
local function adapt_group(G, H, R, C)
  for _, A in ipairs(G.adaptive) do
    if not overridden(H, A.slot, R.now) then
      local overload = R.kind == 'cooldown' or R.overload
        or (A.slow ~= nil and R.kind == 'success' and R.duration >= A.slow)
      if overload or R.kind == 'success' then
        local D = adaptive_load(H, A.slot, clamp(A.start, A.floor, A.ceiling))
        if not (overload and R.admitted_at < D.cut_at) then
          local now = R.now
          D.rate = clamp(D.rate, A.floor, A.ceiling)
          if now >= D.bucket + GOODPUT_WINDOW then
            D.last = (now < D.bucket + 2 * GOODPUT_WINDOW) and D.count or 0
            D.count = 0
            D.bucket = math.floor(now / GOODPUT_WINDOW) * GOODPUT_WINDOW
          end
          local reason = nil
          if not overload then
            D.count = D.count + 1
            -- successes well below the rate say nothing about the capacity above it
            local weight = math.max(0.0, 1.0 - (now - D.bucket) / GOODPUT_WINDOW)
            local goodput = (D.last * weight + D.count) / GOODPUT_WINDOW
            if now - D.cut_at >= A.cooldown and goodput >= BINDING_SHARE * D.rate then
              D.rate = math.min(A.ceiling, D.rate + A.increase / D.rate)
              if (D.rate >= D.reported * REPORT_STEP or D.rate >= A.ceiling) and D.rate ~= D.reported then
                reason = 'increase'
              end
            end
          elseif now - D.cut_at >= A.cooldown then
            local weight = math.max(0.0, 1.0 - (now - D.bucket) / GOODPUT_WINDOW)
            local measured = (D.last * weight + D.count) / GOODPUT_WINDOW * GOODPUT_MARGIN
            local cut = math.max(A.floor, D.rate * A.decrease, math.min(D.rate * GOODPUT_MARGIN, measured))
            if cut < D.rate then
              D.rate = cut
              D.cut_at = now
              reason = 'overload'
            end
          end
          if reason then
            C[#C + 1] = {G.key, A.slot, fmt(D.reported), fmt(D.rate), reason, R.policy}
            D.previous, D.reported, D.changed_at = D.reported, D.rate, now
          end
          adaptive_save(H, A.slot, D)
        end
      end
    end
  end
end

-- Seconds until the earliest lease of zset z expires, at most cap.
local function earliest(z, now, cap)
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if not first[2] then return cap end
  return math.min(cap, math.max(0, tonumber(first[2]) - now))
end

-- Advance the retry budget's two windows to the one holding now; weight of the previous.
local function budget_roll(H, window, now)
  local start = math.floor(now / window) * window
  local current = get(H, 'ys', 0)
  if start > current then
    if start - current > window then
      set(H, 'yA', 0); set(H, 'yR', 0)
    else
      set(H, 'yA', get(H, 'ya', 0)); set(H, 'yR', get(H, 'yr', 0))
    end
    set(H, 'ya', 0); set(H, 'yr', 0); set(H, 'ys', start)
    current = start
  end
  return math.max(0.0, 1.0 - (now - current) / window)
end

local function open_breaker(H, w, p, now, rand, open_for, open_for_max, multiplier, open_jitter)
  local opens = get(H, 'bn', 0) + 1
  local generation = get(H, 'bg', 0) + 1
  local duration = math.min(open_for_max, open_for * multiplier ^ math.max(0, opens - 1))
  duration = duration * (1.0 - open_jitter * rand)
  set(H, 'bn', opens); set(H, 'bs', 'open'); set(H, 'bg', generation); set(H, 'bo', now + duration)
  redis.call('DEL', p)
  touched(H, p)
  clear_window(H, w, nil, nil)
  return generation
end

local RECORD_FIELDS = {'bs', 'bg', 'bn', 'bk', 'bw', 'wt', 'ws', 'wc', 'tc', 'tf', 'tl'}

-- Apply one outcome R to one group G of its ticket (see core/rules.py:record_group).
-- R = {now, ticket, rand, kind, duration, admitted_at, retry_after}; returns recorded (bool)
-- and appends to the transitions list T.
local function record_group(G, H, R, T)
  local now, ticket, rand, kind, retry_after = R.now, R.ticket, R.rand, R.kind, R.retry_after
  local duration = R.duration
  local l, p, w = G.l, G.p, G.w
  if kind == 'cooldown' and G.pause_target then
    local until_ = now + retry_after
    if until_ > get(H, 'pu', 0) then set(H, 'pu', until_); set(H, 'pr', 'cooldown') end
  end
  local expiry = tonumber(redis.call('ZSCORE', l, ticket))
  if expiry ~= nil then redis.call('ZREM', l, ticket) end
  local probe_expiry = nil
  if G.breaker and get(H, 'bs', 'closed') == 'half_open' then  -- probes exist only then
    probe_expiry = tonumber(redis.call('ZSCORE', p, ticket))
    if probe_expiry ~= nil then redis.call('ZREM', p, ticket) end
  end
  if expiry == nil or expiry < now then return false end
  if not G.breaker or G.generation ~= get(H, 'bg', 0) then return true end
  local state = get(H, 'bs', 'closed')
  if kind == 'ignored' or kind == 'cooldown' or state == 'forced_open' or state == 'disabled' then return true end
  local failed = kind == 'failure'
  local slow = G.slow_duration ~= nil and duration >= G.slow_duration
  if state == 'half_open' then
    if probe_expiry == nil then return true end
    if not failed then
      local ok = get(H, 'bk', 0) + 1
      local slow_ok = get(H, 'bw', 0) + (slow and 1 or 0)
      set(H, 'bk', ok); set(H, 'bw', slow_ok)
      if ok < G.probes then return true end
      if not (G.slow_duration ~= nil and slow_ok * 100.0 >= G.slow_threshold * ok) then
        local generation = get(H, 'bg', 0) + 1
        set(H, 'bs', 'closed'); set(H, 'bg', generation); set(H, 'bn', 0)
        redis.call('DEL', p)
        touched(H, p)
        clear_window(H, w, G.window_type, G.window)
        T[#T + 1] = {G.key, 'half_open', 'closed', fmt(generation), R.policy}
        return true
      end
    end
    local generation = open_breaker(H, w, p, now, rand, G.open_for, G.open_for_max, G.multiplier, G.open_jitter)
    T[#T + 1] = {G.key, 'half_open', 'open', fmt(generation), R.policy}
    return true
  end
  local calls, failures, slow_calls = window_add(H, w, G.window_type, G.window, now, failed, slow)
  if calls < G.minimum_calls then return true end
  if failures * 100.0 >= G.failure_threshold * calls
    or (G.slow_duration ~= nil and slow_calls * 100.0 >= G.slow_threshold * calls) then
    local generation = open_breaker(H, w, p, now, rand, G.open_for, G.open_for_max, G.multiplier, G.open_jitter)
    T[#T + 1] = {G.key, state, 'open', fmt(generation), R.policy}
  end
  return true
end

-- Apply a list of packed records: each is a header (now, ticket, rand, kind, duration,
-- admitted_at, retry_after, group count, policy, overload 0|1) then one packed argument per
-- group (key, pause target, generation, breaker 0|1, window type, window, minimum_calls,
-- failure_rate_threshold, slow_call_duration, slow_call_rate_threshold, open_for,
-- open_for_max, multiplier, open_jitter, half_open_probes, adaptive limit count, then per
-- adaptive limit: slot, starting rate, floor, ceiling, decrease, increase, cooldown,
-- slow ('' = none)), its keys taken from KEYS starting at key_pos. Returns the recorded
-- flags, the transitions (each {key, from, to, generation, policy}), the last record's
-- now and the rate changes (each {key, limit, from, to, reason, policy}).
local function apply_records(args, arg_pos, count, key_pos, idle_ttl)
  local flags, T, C, last = {}, {}, {}, nil
  for n = 1, count do
    local h = split(args[arg_pos])
    local R = {now = clock(h[1]), ticket = h[2], rand = tonumber(h[3]), kind = h[4],
               duration = tonumber(h[5]), admitted_at = tonumber(h[6]), retry_after = tonumber(h[7]),
               policy = h[9], overload = h[10] == '1'}
    if R.duration == nil then R.duration = R.now - R.admitted_at end
    last = R.now
    local recorded = false
    for g = 1, tonumber(h[8]) do
      local a = split(args[arg_pos + g])
      local G = {
        s = KEYS[key_pos], l = KEYS[key_pos + 1], p = KEYS[key_pos + 2], w = KEYS[key_pos + 3],
        key = a[1], pause_target = a[2] == '1', generation = tonumber(a[3]),
        breaker = a[4] == '1', window_type = a[5], window = tonumber(a[6]),
        minimum_calls = tonumber(a[7]), failure_threshold = tonumber(a[8]),
        slow_duration = tonumber(a[9]), slow_threshold = tonumber(a[10]),
        open_for = tonumber(a[11]), open_for_max = tonumber(a[12]),
        multiplier = tonumber(a[13]), open_jitter = tonumber(a[14]), probes = tonumber(a[15]),
        adaptive = {},
      }
      local extra = {}
      local pos = 17
      for i = 1, tonumber(a[16] or '0') do
        G.adaptive[i] = {
          slot = a[pos], start = tonumber(a[pos + 1]), floor = tonumber(a[pos + 2]), ceiling = tonumber(a[pos + 3]),
          decrease = tonumber(a[pos + 4]), increase = tonumber(a[pos + 5]), cooldown = tonumber(a[pos + 6]),
          slow = tonumber(a[pos + 7]),
        }
        extra[#extra + 1] = 'a:' .. a[pos]
        extra[#extra + 1] = 'o:' .. a[pos]
        pos = pos + 8
      end
      local H = load(G.s, RECORD_FIELDS, extra)
      if record_group(G, H, R, T) then
        recorded = true
        adapt_group(G, H, R, C)
      end
      finish(H, R.now, idle_ttl)
      key_pos = key_pos + 4
    end
    flags[n] = recorded and 1 or 0
    arg_pos = arg_pos + 1 + tonumber(h[8])
  end
  return flags, T, last, C
end
