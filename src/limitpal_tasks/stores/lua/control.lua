-- control.lua: an operator's action on one key: pause, resume, reset or force the breaker.
--
-- KEYS: s, l, p, w of the key (see _lib.lua).
-- ARGV: now ('' = server TIME), action (pause|resume|reset|forced_open|disabled|release), key,
--   seconds (pause) or ticket id (release), reason (pause), idle_ttl,
--   then for release: pairs of (rate slot id, interval) whose token is refunded
-- Returns: {now, {transitions...}}, a transition being {key, from, to, generation}.

local now = clock(ARGV[1])
local action, key, idle_ttl = ARGV[2], ARGV[3], tonumber(ARGV[6])
local s, l, p, w = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local transitions = {}

if action == 'pause' then
  redis.call('HSET', s, 'pu', fmt(now + tonumber(ARGV[4])), 'pr', ARGV[5])
  extend(s, now + tonumber(ARGV[4]))
elseif action == 'release' then
  -- Give back an admission because a later group of the same request deferred (cluster).
  redis.call('ZREM', l, ARGV[4])
  redis.call('ZREM', p, ARGV[4])
  for i = 7, #ARGV, 2 do
    local tat = redis.call('HGET', s, 'r:' .. ARGV[i])
    if tat then redis.call('HSET', s, 'r:' .. ARGV[i], fmt(tonumber(tat) - tonumber(ARGV[i + 1]))) end
  end
elseif action == 'resume' then
  redis.call('HDEL', s, 'pu', 'pr')
elseif redis.call('HEXISTS', s, 'bs') == 1 or action ~= 'reset' then
  local was = redis.call('HGET', s, 'bs') or 'closed'
  local to = (action == 'reset') and 'closed' or action
  local generation = num(s, 'bg', 0) + 1
  redis.call('HSET', s, 'bs', to, 'bg', fmt(generation))
  if to == 'closed' then redis.call('HSET', s, 'bn', '0', 'bo', '0', 'bk', '0', 'bw', '0') end
  redis.call('DEL', p)
  clear_window(s, w, nil, nil)
  if was ~= to then transitions[1] = {key, was, to, fmt(generation)} end
end
touch(s, l, p, w, now, idle_ttl)
return {fmt(now), transitions}
