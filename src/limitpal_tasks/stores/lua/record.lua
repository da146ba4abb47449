-- record.lua: give back what a ticket holds and feed the breaker (see core/rules.py:record_group).
-- A duplicate record, an expired lease or an older breaker generation changes nothing
-- (but the pause a cooldown asks for).
--
-- KEYS: 4 per group, in the ticket's group order: s, l, p, w (see _lib.lua).
-- ARGV: now ('' = server TIME), ticket id, rand, policy, idle_ttl, outcome kind
--   (success|failure|ignored|cooldown), duration ('' = now - admitted_at), admitted_at,
--   retry_after, then one packed argument per group, fields separated by \31:
--   key, pause target (0|1), generation, breaker (0|1), window type, window, minimum_calls,
--   failure_rate_threshold, slow_call_duration ('' = none), slow_call_rate_threshold,
--   open_for, open_for_max, multiplier, open_jitter, half_open_probes
-- Returns: {now, recorded 0|1, {transitions...}}, a transition being {key, from, to, generation}.

local now = clock(ARGV[1])
local ticket, rand, idle_ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5])
local kind, duration, admitted_at, retry_after = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
if duration == nil then duration = now - admitted_at end

local recorded, transitions = 0, {}
local RECORD = {'bs', 'bg', 'bn', 'bk', 'bw', 'wt', 'ws', 'wc', 'tc', 'tf', 'tl'}

local function record_group(G, H)
  local l, p, w = G.l, G.p, G.w
  if kind == 'cooldown' and G.pause_target then
    local until_ = now + retry_after
    if until_ > get(H, 'pu', 0) then set(H, 'pu', until_); set(H, 'pr', 'cooldown') end
  end
  local expiry = tonumber(redis.call('ZSCORE', l, ticket))
  if expiry ~= nil then redis.call('ZREM', l, ticket) end
  local probe_expiry = nil
  if G.breaker then
    probe_expiry = tonumber(redis.call('ZSCORE', p, ticket))
    if probe_expiry ~= nil then redis.call('ZREM', p, ticket) end
  end
  if expiry == nil or expiry < now then return end
  recorded = 1
  if not G.breaker or G.generation ~= get(H, 'bg', 0) then return end
  local state = get(H, 'bs', 'closed')
  if kind == 'ignored' or kind == 'cooldown' or state == 'forced_open' or state == 'disabled' then return end
  local failed = kind == 'failure'
  local slow = G.slow_duration ~= nil and duration >= G.slow_duration
  if state == 'half_open' then
    if probe_expiry == nil then return end
    if not failed then
      local ok = get(H, 'bk', 0) + 1
      local slow_ok = get(H, 'bw', 0) + (slow and 1 or 0)
      set(H, 'bk', ok); set(H, 'bw', slow_ok)
      if ok < G.probes then return end
      if not (G.slow_duration ~= nil and slow_ok * 100.0 >= G.slow_threshold * ok) then
        local generation = get(H, 'bg', 0) + 1
        set(H, 'bs', 'closed'); set(H, 'bg', generation); set(H, 'bn', 0)
        redis.call('DEL', p)
        touched(H, p)
        clear_window(H, w, G.window_type, G.window)
        transitions[#transitions + 1] = {G.key, 'half_open', 'closed', fmt(generation)}
        return
      end
    end
    local generation = open_breaker(H, w, p, now, rand, G.open_for, G.open_for_max, G.multiplier, G.open_jitter)
    transitions[#transitions + 1] = {G.key, 'half_open', 'open', fmt(generation)}
    return
  end
  local calls, failures, slow_calls = window_add(H, w, G.window_type, G.window, now, failed, slow)
  if calls < G.minimum_calls then return end
  if failures * 100.0 >= G.failure_threshold * calls
    or (G.slow_duration ~= nil and slow_calls * 100.0 >= G.slow_threshold * calls) then
    local generation = open_breaker(H, w, p, now, rand, G.open_for, G.open_for_max, G.multiplier, G.open_jitter)
    transitions[#transitions + 1] = {G.key, state, 'open', fmt(generation)}
  end
end

for g = 1, #ARGV - 9 do
  local a = split(ARGV[9 + g])
  local k = (g - 1) * 4
  local G = {
    s = KEYS[k + 1], l = KEYS[k + 2], p = KEYS[k + 3], w = KEYS[k + 4],
    key = a[1], pause_target = a[2] == '1', generation = tonumber(a[3]),
    breaker = a[4] == '1', window_type = a[5], window = tonumber(a[6]),
    minimum_calls = tonumber(a[7]), failure_threshold = tonumber(a[8]),
    slow_duration = tonumber(a[9]), slow_threshold = tonumber(a[10]),
    open_for = tonumber(a[11]), open_for_max = tonumber(a[12]),
    multiplier = tonumber(a[13]), open_jitter = tonumber(a[14]), probes = tonumber(a[15]),
  }
  local H = load(G.s, RECORD)
  record_group(G, H)
  finish(H, now, idle_ttl)
end
return {fmt(now), recorded, transitions}
