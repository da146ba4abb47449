-- retry.lua: take one retry from a key's fleet-wide budget (see core/rules.py:spend_retry).
--
-- KEYS: s, l, p, w of the budget's key (see _lib.lua).
-- ARGV: now ('' = server TIME), ratio, min_per_second, window, idle_ttl
-- Returns: 1 when the retry is allowed (and counted), 0 when the budget is spent.

local now = clock(ARGV[1])
local ratio, floor_rate, window, idle_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local H = load(KEYS[1], BUDGET)
local weight = budget_roll(H, window, now)
local admissions = get(H, 'yA', 0) * weight + get(H, 'ya', 0)
local retries = get(H, 'yR', 0) * weight + get(H, 'yr', 0)
local allowed = retries + 1 <= ratio * admissions + floor_rate * window
if allowed then set(H, 'yr', get(H, 'yr', 0) + 1) end
extend(H, now + 2 * window)
finish(H, now, idle_ttl)
return allowed and 1 or 0
