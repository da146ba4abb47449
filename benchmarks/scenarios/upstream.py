"""The simulated upstream: a fault schedule and per-tenant quotas kept in Redis (db 15).

Every call is one Lua script run on the Redis server: it reads the schedule the harness
wrote (``down_from``/``down_until``, server-clock seconds; a per-tenant ``quota`` of calls
in any sliding second, and optionally ``steps``, a capacity schedule that changes that quota
at given times), decides the status the upstream would answer (200, 429 with
a ``Retry-After``, or 503 while down) and appends the arrival to a list, so every call that
reached the upstream is on record with the server's time, whichever process made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

__all__ = ["Arrival", "Upstream", "UpstreamDown", "UpstreamError", "UpstreamThrottled"]

# KEYS[1]: the schedule hash; KEYS[2]: the arrivals list; KEYS[3]: this tenant's recent calls (zset).
# ARGV[1]: tenant; ARGV[2]: task id. Returns {status, retry_after in ms}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cfg = redis.call('HMGET', KEYS[1], 'down_from', 'down_until', 'quota', 'steps')
local quota = cfg[3] and tonumber(cfg[3])
if cfg[4] then  -- 'at:quota;at:quota;...', ascending: the last step reached is in force
  for at, q in string.gmatch(cfg[4], '([^:;]+):([^;]+)') do
    if now >= tonumber(at) then quota = tonumber(q) end
  end
end
local status, retry_ms = 200, 0
if cfg[1] and now >= tonumber(cfg[1]) and now < tonumber(cfg[2]) then
  status = 503
elseif quota then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 1.0)
  if redis.call('ZCARD', KEYS[3]) >= quota then
    status = 429
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    retry_ms = math.max(1, math.floor((tonumber(oldest[2]) + 1.0 - now) * 1000))
  else
    redis.call('ZADD', KEYS[3], now, ARGV[2] .. '@' .. t[1] .. '.' .. t[2])
    redis.call('PEXPIRE', KEYS[3], 5000)
  end
end
redis.call('RPUSH', KEYS[2], string.format('%.6f %d %s %s', now, status, ARGV[1], ARGV[2]))
return {status, retry_ms}
"""


class UpstreamError(Exception):
    """The upstream failed the call (a retryable error for both limitpal and the baselines)."""


class UpstreamDown(UpstreamError):
    """503: the upstream is down."""


class UpstreamThrottled(UpstreamError):
    """429: this tenant's quota is spent; ``retry_after`` says for how long.

    It carries ``status_code = 429`` like an HTTP client's error, so an adaptive rate limit's
    default overload signal recognizes it when a task lets it propagate.
    """

    status_code = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429, retry after {retry_after:.3f}s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Arrival:
    """One call that reached the upstream."""

    t: float
    status: int
    tenant: str
    task_id: str


class Upstream:
    """A handle on one upstream (one per scenario variant, by ``prefix``)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(_SCRIPT)
        self._config = f"{prefix}:schedule"
        self._arrivals = f"{prefix}:arrivals"

    @classmethod
    def from_url(cls, url: str, prefix: str) -> Upstream:
        return cls(redis.Redis.from_url(url), prefix)

    # -- the harness's side -----------------------------------------------------

    def configure(
        self,
        *,
        quota: int | None = None,
        down_from: float | None = None,
        down_until: float | None = None,
        steps: Sequence[tuple[float, int]] = (),
    ) -> None:
        """Write the script: a per-tenant quota per sliding second, and an outage (epoch seconds).

        ``steps``: ``(at, quota)`` pairs (epoch seconds): from ``at`` on, the quota is ``quota``
        (a capacity schedule; before the first step, ``quota`` applies, or none).
        """
        mapping: dict[str, str] = {}
        if quota is not None:
            mapping["quota"] = str(quota)
        if steps:
            mapping["steps"] = ";".join(f"{at!r}:{q:d}" for at, q in sorted(steps))
        if down_from is not None and down_until is not None:
            mapping["down_from"] = repr(down_from)
            mapping["down_until"] = repr(down_until)
        self.client.delete(self._config)
        if mapping:
            self.client.hset(self._config, mapping=cast(Any, mapping))  # redis-py types its keys narrowly

    def arrivals(self) -> list[Arrival]:
        out = []
        for raw in cast(list[bytes], self.client.lrange(self._arrivals, 0, -1)):
            t, status, tenant, task_id = raw.decode().split(" ", 3)
            out.append(Arrival(float(t), int(status), tenant, task_id))
        return out

    # -- the task's side --------------------------------------------------------

    def call(self, tenant: str, task_id: str) -> None:
        """Call the upstream; raise :class:`UpstreamDown` or :class:`UpstreamThrottled` as it answers."""
        reply = cast(
            list[Any],
            self._script(
                keys=[self._config, self._arrivals, f"{self.prefix}:t:{tenant}"], args=[tenant, task_id]
            ),
        )
        status, retry_ms = int(reply[0]), int(reply[1])
        if status == 503:
            raise UpstreamDown("503")
        if status == 429:
            raise UpstreamThrottled(retry_ms / 1000.0)
