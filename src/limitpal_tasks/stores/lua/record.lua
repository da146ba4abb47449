-- record.lua: give back what tickets hold and feed the breakers, for one or more records
-- in order (see core/rules.py:record_group and apply_records in _lib.lua). A duplicate
-- record, an expired lease or an older breaker generation changes nothing (but the pause
-- a cooldown asks for).
--
-- KEYS: 4 per group of each record, in order: s, l, p, w (see _lib.lua).
-- ARGV: idle_ttl, record count, then per record: a packed header
--   (now ('' = server TIME), ticket id, rand, outcome kind success|failure|ignored|cooldown,
--   duration ('' = now - admitted_at), admitted_at, retry_after, group count, policy,
--   overload 0|1) followed by one packed argument per group (see apply_records).
-- Returns: {now of the last record, {recorded 0|1 per record}, {transitions...}, {rate changes...}},
--   a transition being {key, from, to, generation, policy}, a rate change
--   {key, limit, from, to, reason, policy}.

local flags, transitions, now, changes = apply_records(ARGV, 3, tonumber(ARGV[2]), 1, tonumber(ARGV[1]))
return {fmt(now or clock('')), flags, transitions, changes}
