-- record.lua: give back what a ticket holds and feed the breaker (see core/rules.py:record_group).
-- A duplicate record, an expired lease or an older breaker generation changes nothing
-- (but the pause a cooldown asks for).
--
-- KEYS: 4 per group, in the ticket's group order: s, l, p, w (see _lib.lua).
-- ARGV: now ('' = server TIME), ticket id, rand, policy, idle_ttl, outcome kind
--   (success|failure|ignored|cooldown), duration ('' = now - admitted_at), admitted_at,
--   retry_after, group count, then per group:
--   key, pause target (0|1), generation, breaker (0|1), window type, window, minimum_calls,
--   failure_rate_threshold, slow_call_duration ('' = none), slow_call_rate_threshold,
--   open_for, open_for_max, multiplier, open_jitter, half_open_probes
-- Returns: {now, recorded 0|1, {transitions...}}, a transition being {key, from, to, generation}.

local now = clock(ARGV[1])
local ticket, rand, policy, idle_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local kind, duration, admitted_at, retry_after = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local ngroups = tonumber(ARGV[10])
if duration == nil then duration = now - admitted_at end

local recorded, transitions = 0, {}

local function record_group(G)
  local s, l, p, w = G.s, G.l, G.p, G.w
  if kind == 'cooldown' and G.pause_target then
    local until_ = now + retry_after
    if until_ > num(s, 'pu', 0) then redis.call('HSET', s, 'pu', fmt(until_), 'pr', 'cooldown') end
  end
  local expiry = tonumber(redis.call('ZSCORE', l, ticket))
  redis.call('ZREM', l, ticket)
  local probe_expiry = tonumber(redis.call('ZSCORE', p, ticket))
  redis.call('ZREM', p, ticket)
  if expiry == nil or expiry < now then return end
  recorded = 1
  if not G.breaker or G.generation ~= num(s, 'bg', 0) then return end
  local state = redis.call('HGET', s, 'bs') or 'closed'
  if kind == 'ignored' or kind == 'cooldown' or state == 'forced_open' or state == 'disabled' then return end
  local failed = kind == 'failure'
  local slow = G.slow_duration ~= nil and duration >= G.slow_duration
  if state == 'half_open' then
    if probe_expiry == nil then return end
    if not failed then
      local ok = num(s, 'bk', 0) + 1
      local slow_ok = num(s, 'bw', 0) + (slow and 1 or 0)
      redis.call('HSET', s, 'bk', fmt(ok), 'bw', fmt(slow_ok))
      if ok < G.probes then return end
      if not (G.slow_duration ~= nil and slow_ok * 100.0 >= G.slow_threshold * ok) then
        local generation = num(s, 'bg', 0) + 1
        redis.call('HSET', s, 'bs', 'closed', 'bg', fmt(generation), 'bn', '0')
        redis.call('DEL', p)
        clear_window(s, w, G.window_type, G.window)
        transitions[#transitions + 1] = {G.key, 'half_open', 'closed', fmt(generation)}
        return
      end
    end
    local generation = open_breaker(s, w, p, now, rand, G.open_for, G.open_for_max, G.multiplier, G.open_jitter)
    transitions[#transitions + 1] = {G.key, 'half_open', 'open', fmt(generation)}
    return
  end
  local calls, failures, slow_calls = window_add(s, w, G.window_type, G.window, now, failed, slow)
  if calls < G.minimum_calls then return end
  if failures * 100.0 >= G.failure_threshold * calls
    or (G.slow_duration ~= nil and slow_calls * 100.0 >= G.slow_threshold * calls) then
    local generation = open_breaker(s, w, p, now, rand, G.open_for, G.open_for_max, G.multiplier, G.open_jitter)
    transitions[#transitions + 1] = {G.key, state, 'open', fmt(generation)}
  end
end

local pos = 11
for g = 1, ngroups do
  local k = (g - 1) * 4
  local G = {
    s = KEYS[k + 1], l = KEYS[k + 2], p = KEYS[k + 3], w = KEYS[k + 4],
    key = ARGV[pos], pause_target = ARGV[pos + 1] == '1', generation = tonumber(ARGV[pos + 2]),
    breaker = ARGV[pos + 3] == '1', window_type = ARGV[pos + 4], window = tonumber(ARGV[pos + 5]),
    minimum_calls = tonumber(ARGV[pos + 6]), failure_threshold = tonumber(ARGV[pos + 7]),
    slow_duration = tonumber(ARGV[pos + 8]), slow_threshold = tonumber(ARGV[pos + 9]),
    open_for = tonumber(ARGV[pos + 10]), open_for_max = tonumber(ARGV[pos + 11]),
    multiplier = tonumber(ARGV[pos + 12]), open_jitter = tonumber(ARGV[pos + 13]),
    probes = tonumber(ARGV[pos + 14]),
  }
  pos = pos + 15
  record_group(G)
  touch(G.s, G.l, G.p, G.w, now, idle_ttl)
end
return {fmt(now), recorded, transitions}
