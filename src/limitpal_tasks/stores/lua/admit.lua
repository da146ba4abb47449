-- admit.lua: admit one execution across its key groups, all or nothing
-- (pause -> breaker -> bulkhead -> rate limits; see core/rules.py:admit_group).
--
-- KEYS: 4 per group, in group order: s, l, p, w (see _lib.lua) of the group's key.
-- ARGV: now ('' = server TIME), ticket id, rand, policy, idle_ttl, group count, then one
--   packed argument per group, fields separated by \31 (below), then the count of
--   piggybacked records (successes this process batched) and those records, applied
--   first, in the format of record.lua (see apply_records in _lib.lua; their KEYS follow
--   the groups' KEYS). Per group:
--   key, lease, breaker (0|1), open_for, half_open_probes, busy_delay,
--   bulkhead (0|1), max_concurrent, bulkhead lease ('' = lease), retry_delay,
--   budget window ('' = none), rate count, then per rate:
--     slot id, interval, burst, reserve_ahead, grace, adaptive floor and ceiling (calls/s;
--     '' = not adaptive), carried slot ('' = none)
-- Returns: {now, {transitions of the records}, results...}; one result per group evaluated
--   (stopping at the first deferral):
--   {admitted 0|1, reason, delay, generation, probe 0|1, early 0|1, {slots...}, {transitions...}}
--   where a transition is {key, from, to, generation}. Numbers are returned as strings.
-- A deferral releases what earlier groups took; only booked rate-limit slots stay booked.

local now = clock(ARGV[1])
local ticket, rand, policy, idle_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])

local ngroups = tonumber(ARGV[6])
local groups = {}
for g = 1, ngroups do
  local a = split(ARGV[6 + g])
  local G = {
    key = a[1], lease = tonumber(a[2]),
    breaker = a[3] == '1', open_for = tonumber(a[4]), probes = tonumber(a[5]), busy_delay = tonumber(a[6]),
    bulkhead = a[7] == '1', max = tonumber(a[8]), bh_lease = tonumber(a[9]), retry_delay = tonumber(a[10]),
    budget = tonumber(a[11]), rates = {}, fields = {}, exec = {}, hmget = {},
  }
  local pos = 13
  for i = 1, tonumber(a[12]) do
    G.rates[i] = {
      slot = a[pos], interval = tonumber(a[pos + 1]), burst = tonumber(a[pos + 2]),
      ahead = tonumber(a[pos + 3]), grace = tonumber(a[pos + 4]),
      floor = tonumber(a[pos + 5]), ceiling = tonumber(a[pos + 6]), carried = tonumber(a[pos + 7]),
    }
    G.fields[i] = 'r:' .. a[pos]
    G.exec[i] = 'r:' .. a[pos] .. '#x'
    G.hmget[#G.hmget + 1] = G.fields[i]
    G.hmget[#G.hmget + 1] = G.exec[i]
    G.hmget[#G.hmget + 1] = 'o:' .. a[pos]
    if G.rates[i].floor then G.hmget[#G.hmget + 1] = 'a:' .. a[pos] end
    pos = pos + 8
  end
  local k = (g - 1) * 4
  G.s, G.l, G.p, G.w = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  groups[g] = G
end

local function defer(reason, delay, early, slots)
  return {0, reason, fmt(math.max(0, delay)), '0', 0, early and 1 or 0, slots or {}, {}}
end

local function slot_list(values)
  local out = {}
  for i, v in ipairs(values) do out[i] = fmt(v) end
  return out
end

-- GCRA over the group's limits, with a booking and an execution schedule per limit (see
-- core/rules.py:_check_rates): a deferral, or the slots used per limit (0 = fresh slot).
local function check_rates(G, H)
  local rates = G.rates
  for _, r in ipairs(rates) do
    r.interval, r.burst = effective(H, r.slot, r.interval, r.burst, now, r.floor, r.ceiling)
  end
  local covered = {}
  for i, r in ipairs(rates) do
    covered[i] = r.carried ~= nil and r.carried - 0.001 <= now and now <= r.carried + r.grace
  end
  local early = 0.0
  for i, r in ipairs(rates) do
    if r.carried ~= nil and not covered[i] and now < r.carried then early = math.max(early, r.carried - now) end
  end
  if early <= 0 then
    for i, r in ipairs(rates) do
      if covered[i] then
        local ready = math.max(get(H, G.exec[i], 0.0), now) + r.interval * (1 - r.burst) - r.interval
        early = math.max(early, ready - now)
      end
    end
  end
  if early > 0 then
    local kept = {}
    for i, r in ipairs(rates) do
      kept[i] = (r.carried ~= nil and r.carried + r.grace >= now) and r.carried or 0.0
    end
    return defer('rate_limited', early, true, slot_list(kept))
  end
  local target, ahead = now, math.huge
  for i, r in ipairs(rates) do
    if not covered[i] then
      local booked = math.max(get(H, G.fields[i], 0.0), now)
      local executed = math.max(get(H, G.exec[i], 0.0), now)
      target = math.max(target, booked + r.interval * (1 - r.burst), executed + r.interval * (1 - r.burst))
      ahead = math.min(ahead, r.ahead)
    end
  end
  if target <= now then
    local used = {}
    for i, r in ipairs(rates) do
      if not covered[i] then
        local tat = math.max(get(H, G.fields[i], 0.0), now) + r.interval
        set(H, G.fields[i], tat)
        extend(H, tat)
      end
      local executed = math.max(get(H, G.exec[i], 0.0), now) + r.interval
      set(H, G.exec[i], executed)
      extend(H, executed)
      used[i] = covered[i] and r.carried or 0.0
    end
    return nil, used
  end
  if target - now > ahead then
    local kept = {}
    for i, r in ipairs(rates) do kept[i] = covered[i] and r.carried or 0.0 end
    return defer('rate_limited', target - now - ahead, false, slot_list(kept))
  end
  local booked = {}
  for i, r in ipairs(rates) do
    if not covered[i] then
      local tat = math.max(get(H, G.fields[i], 0.0), target) + r.interval
      set(H, G.fields[i], tat)
      extend(H, tat)
    end
    booked[i] = covered[i] and r.carried or target
  end
  return defer('rate_limited', target - now, false, slot_list(booked))
end

local function admit_group(G, H)
  local l, p = G.l, G.p
  local paused = get(H, 'pu', 0)
  if paused > now then return defer('paused', paused - now) end

  local half_open_now, probe, generation = false, false, 0
  if G.breaker then
    local state = get(H, 'bs', nil)
    if not state then
      state = 'closed'
      set(H, 'bs', state)
    end
    generation = get(H, 'bg', 0)
    if state == 'forced_open' then return defer('breaker_open', G.open_for) end
    if state == 'open' then
      local open_until = get(H, 'bo', 0)
      if now < open_until then return defer('breaker_open', open_until - now) end
      half_open_now, probe, generation = true, true, generation + 1
    elseif state == 'half_open' then
      redis.call('ZREMRANGEBYSCORE', p, '-inf', fmt(now))
      if redis.call('ZCARD', p) >= G.probes - get(H, 'bk', 0) then
        return defer('half_open_busy', earliest(p, now, G.busy_delay))
      end
      probe = true
    end
  end

  local lease_for = G.lease
  if G.bulkhead then
    lease_for = G.bh_lease or lease_for
    redis.call('ZREMRANGEBYSCORE', l, '-inf', fmt(now))
    if redis.call('ZCARD', l) >= G.max then
      return defer('concurrency', earliest(l, now, G.retry_delay))
    end
  end

  local used = {}
  if #G.rates > 0 then
    local deferred
    deferred, used = check_rates(G, H)
    if deferred then return deferred end
  end

  -- Commit: every check passed.
  local transitions = {}
  if G.breaker then
    if half_open_now then
      set(H, 'bs', 'half_open'); set(H, 'bg', generation); set(H, 'bk', 0); set(H, 'bw', 0)
      redis.call('DEL', p)
      touched(H, p)
      transitions[1] = {G.key, 'open', 'half_open', fmt(generation)}
    end
    if probe then
      redis.call('ZADD', p, now + lease_for, ticket)
      touched(H, p)
    end
  end
  redis.call('ZADD', l, now + lease_for, ticket)
  touched(H, l)
  extend(H, now + lease_for)
  if G.budget then
    budget_roll(H, G.budget, now)
    set(H, 'ya', get(H, 'ya', 0) + 1)
  end
  return {1, '', '0', fmt(generation), probe and 1 or 0, 0, slot_list(used), transitions}
end

local function release_group(G, H, result)
  redis.call('ZREM', G.l, ticket)
  redis.call('ZREM', G.p, ticket)
  for i, r in ipairs(G.rates) do
    local executed = get(H, G.exec[i], nil)
    if executed then set(H, G.exec[i], executed - r.interval) end
    local tat = get(H, G.fields[i], nil)
    if tonumber(result[7][i]) == 0 and tat then set(H, G.fields[i], tat - r.interval) end
  end
  save(H)
end

local ADMIT = {'bs', 'bg', 'bk', 'po'}
local ADMIT_BUDGET = {'bs', 'bg', 'bk', 'po', 'ys', 'ya', 'yr', 'yA', 'yR'}
local _, record_transitions = apply_records(ARGV, 8 + ngroups, tonumber(ARGV[7 + ngroups]), 4 * ngroups + 1, idle_ttl)
local out, states = {fmt(now), record_transitions}, {}
for g, G in ipairs(groups) do
  local H = load(G.s, G.budget and ADMIT_BUDGET or ADMIT, G.hmget)
  states[g] = H
  if get(H, 'po', nil) ~= policy then set(H, 'po', policy) end
  local result = admit_group(G, H)
  out[#out + 1] = result
  finish(H, now, idle_ttl)
  if result[1] == 0 then
    for d = 1, g - 1 do release_group(groups[d], states[d], out[d + 2]) end
    break
  end
end
return out
