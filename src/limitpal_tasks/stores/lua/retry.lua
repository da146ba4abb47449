-- retry.lua: take one retry from a key's fleet-wide budget (see core/rules.py:spend_retry).
--
-- KEYS: s, l, p, w of the budget's key (see _lib.lua).
-- ARGV: now ('' = server TIME), ratio, min_per_second, window, idle_ttl
-- Returns: 1 when the retry is allowed (and counted), 0 when the budget is spent.

local now = clock(ARGV[1])
local ratio, floor_rate, window, idle_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local s = KEYS[1]
local weight = budget_roll(s, window, now)
local admissions = num(s, 'yA', 0) * weight + num(s, 'ya', 0)
local retries = num(s, 'yR', 0) * weight + num(s, 'yr', 0)
extend(s, now + 2 * window)
touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now, idle_ttl)
if retries + 1 > ratio * admissions + floor_rate * window then return 0 end
redis.call('HINCRBY', s, 'yr', 1)
return 1
