-- control.lua: an operator's action on one key (pause, resume, reset or force the breaker),
-- or the release of an admission whose later group deferred (Redis Cluster).
--
-- KEYS: s, l, p, w of the key (see _lib.lua).
-- ARGV: now ('' = server TIME), action (pause|resume|reset|forced_open|disabled|release|
--   override|unoverride), key, seconds (pause; override: '' = permanent) or ticket id
--   (release), reason (pause) or limit id (override, unoverride), idle_ttl,
--   then for release: per rate limit (slot id, interval, 1 if the booked slot is refunded
--   too, adaptive floor, ceiling ('' = not adaptive));
--   for override: the rate's limit, per and burst
-- Returns: {now, {transitions...}}, a transition being {key, from, to, generation}.

local now = clock(ARGV[1])
local action, key, idle_ttl = ARGV[2], ARGV[3], tonumber(ARGV[6])
local s, l, p, w = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local extra = {}
if action == 'release' then
  for i = 7, #ARGV, 5 do
    extra[#extra + 1] = 'r:' .. ARGV[i]
    extra[#extra + 1] = 'r:' .. ARGV[i] .. '#x'
    extra[#extra + 1] = 'o:' .. ARGV[i]
    extra[#extra + 1] = 'a:' .. ARGV[i]
  end
end
local H = load(s, ALL, extra)
local transitions = {}

if action == 'pause' then
  set(H, 'pu', now + tonumber(ARGV[4])); set(H, 'pr', ARGV[5])
elseif action == 'release' then
  redis.call('ZREM', l, ARGV[4])
  redis.call('ZREM', p, ARGV[4])
  for i = 7, #ARGV, 5 do
    local interval = effective(H, ARGV[i], tonumber(ARGV[i + 1]), 1, now, tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]))
    local executed = get(H, 'r:' .. ARGV[i] .. '#x', nil)
    if executed then set(H, 'r:' .. ARGV[i] .. '#x', executed - interval) end
    local tat = get(H, 'r:' .. ARGV[i], nil)
    if ARGV[i + 2] == '1' and tat then set(H, 'r:' .. ARGV[i], tat - interval) end
  end
elseif action == 'override' or action == 'unoverride' then
  -- Another permanent override keeps the key alive; this one's new value counts below.
  local field, permanent = 'o:' .. ARGV[5], false
  local fields = redis.call('HGETALL', s)
  for i = 1, #fields, 2 do
    if fields[i] ~= field and string.sub(fields[i], 1, 2) == 'o:' and string.match(fields[i + 1], ':0$') then
      permanent = true
    end
  end
  if action == 'override' then
    local until_ = ARGV[4] == '' and 0 or now + tonumber(ARGV[4])
    set(H, field, ARGV[7] .. ':' .. ARGV[8] .. ':' .. ARGV[9] .. ':' .. fmt(until_))
    if until_ == 0 then permanent = true else extend(H, until_) end
  else
    redis.call('HDEL', s, field)
  end
  if permanent then
    set(H, 'pm', 1)
  else
    redis.call('HDEL', s, 'pm'); H._raw['pm'] = nil
    set(H, 'hz', get(H, 'hz', 0))  -- something written, so the TTL is re-armed
  end
elseif action == 'resume' then
  set(H, 'pu', 0); redis.call('HDEL', s, 'pr'); H._raw['pr'] = nil
elseif get(H, 'bs', nil) or action ~= 'reset' then
  local was = get(H, 'bs', 'closed')
  local to = (action == 'reset') and 'closed' or action
  local generation = get(H, 'bg', 0) + 1
  set(H, 'bs', to); set(H, 'bg', generation)
  if to == 'closed' then set(H, 'bn', 0); set(H, 'bo', 0); set(H, 'bk', 0); set(H, 'bw', 0) end
  redis.call('DEL', p)
  touched(H, p)
  clear_window(H, w, nil, nil)
  if was ~= to then transitions[1] = {key, was, to, fmt(generation)} end
end
finish(H, now, idle_ttl)
return {fmt(now), transitions}
