"""What both integrations share: settings, the per-process runtime, message state, dead letters.

The Celery and Dramatiq adapters only translate; every decision they act on comes from
here and from the core, so users see the same policies, keys, reasons and dead letters
on either.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..core.deadletter import DeadLetter
from ..core.decisions import Deferred
from ..core.events import HookRunner, Hooks
from ..core.keys import ArgBinder, KeySpec, TaskContext
from ..core.parking import ParkedEntry
from ..core.pipeline import Pipeline
from ..core.policy import DeferTransport, FailMode, Policy
from ..core.store import Store
from ..errors import ConfigurationError, LimitpalError, StoreError
from ..stores.factory import store_from_url
from ..stores.memory import MemoryStore

__all__ = [
    "HEADER",
    "Releaser",
    "Runtime",
    "Settings",
    "dead_letter",
    "message_state",
    "park",
    "redacted",
    "state_header",
]

log = logging.getLogger("limitpal_tasks.worker")

HEADER = "limitpal"
"""The message header (Celery) / option (Dramatiq) carrying deferral state across requeues."""


_SETTINGS = frozenset(
    {
        "store_url",
        "policies",
        "task_policies",
        "fail_mode",
        "key_prefix",
        "store_timeout",
        "defer_transport",
        "park_name",
        "park_lease",
        "hooks",  # Celery only: read by the Celery integration
    }
)


@dataclass(frozen=True)
class Settings:
    """Validated worker-level settings, the same for Celery (``app.conf.limitpal_*``) and Dramatiq."""

    store_url: str = "memory://"
    policies: Mapping[str, Policy] = field(default_factory=dict)
    task_policies: Mapping[str, str] = field(default_factory=dict)
    fail_mode: FailMode = "open"
    key_prefix: str = "limitpal"
    store_timeout: float = 0.25
    defer_transport: DeferTransport = "broker"
    park_name: str | None = None
    park_lease: float = 30.0

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any], prefix: str = "limitpal_") -> Settings:
        """Read ``{prefix}store_url``, ``{prefix}policies``, ... from a settings mapping.

        Errors name the setting, the field and the value, e.g.
        ``limitpal_policies.payments.breaker.failure_rate_threshold: expected ..., got 150``.
        """

        def get(name: str, default: Any) -> Any:
            value = conf.get(prefix + name)
            return default if value is None else value

        if prefix:  # a typo such as limitpal_policy must not pass silently
            for name in conf:
                if isinstance(name, str) and name.startswith(prefix) and name[len(prefix) :] not in _SETTINGS:
                    raise ConfigurationError(
                        name, conf[name], f"unknown setting; expected one of {', '.join(sorted(_SETTINGS))}"
                    )

        fail_mode = get("fail_mode", "open")
        if fail_mode not in ("open", "closed"):
            raise ConfigurationError(prefix + "fail_mode", fail_mode, 'expected "open" or "closed"')
        store_url = get("store_url", "memory://")
        if not isinstance(store_url, str) or "://" not in store_url:
            raise ConfigurationError(
                prefix + "store_url", store_url, "expected a URL such as redis://localhost:6379/0"
            )
        key_prefix = get("key_prefix", "limitpal")
        if not isinstance(key_prefix, str) or not key_prefix or any(c in key_prefix for c in "{} \n"):
            raise ConfigurationError(
                prefix + "key_prefix", key_prefix, "expected a name without braces or spaces"
            )
        timeout = get("store_timeout", 0.25)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ConfigurationError(prefix + "store_timeout", timeout, "expected seconds > 0 and <= 3600")
        transport = get("defer_transport", "broker")
        if transport not in ("broker", "park"):
            raise ConfigurationError(prefix + "defer_transport", transport, 'expected "broker" or "park"')
        park_name = get("park_name", None)
        if park_name is not None and (
            not isinstance(park_name, str) or not park_name or any(c in park_name for c in "{} \n")
        ):
            raise ConfigurationError(
                prefix + "park_name", park_name, "expected a name without braces or spaces"
            )
        lease = get("park_lease", 30.0)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= 86400:
            raise ConfigurationError(prefix + "park_lease", lease, "expected seconds > 0 and <= 86400")
        raw = get("policies", {})
        if not isinstance(raw, Mapping):
            raise ConfigurationError(
                prefix + "policies", raw, "expected a mapping of policy name to policy fields"
            )
        policies: dict[str, Policy] = {}
        for name, spec in raw.items():
            if isinstance(spec, Policy):
                policies[name] = spec
                continue
            data = (
                {**spec, "fail_mode": fail_mode}
                if isinstance(spec, Mapping) and "fail_mode" not in spec
                else spec
            )
            try:
                policies[name] = Policy.from_dict(data, name=name)
            except ConfigurationError as exc:
                raise ConfigurationError(prefix + exc.field, exc.value, exc.expected) from None
        task_policies = get("task_policies", {})
        if not isinstance(task_policies, Mapping):
            raise ConfigurationError(
                prefix + "task_policies", task_policies, "expected a mapping of task name to policy name"
            )
        for task, name in task_policies.items():
            if not isinstance(name, str) or name not in policies:
                raise ConfigurationError(
                    f"{prefix}task_policies.{task}",
                    name,
                    f"expected a policy of {prefix}policies ({', '.join(sorted(policies)) or 'none'})",
                )
        return cls(
            store_url,
            policies,
            dict(task_policies),
            fail_mode,
            key_prefix,
            float(timeout),
            transport,
            park_name,
            float(lease),
        )


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def state_header(decision: Deferred) -> dict[str, Any]:
    """The deferral state a requeued message carries (JSON-safe)."""
    return {
        "deferrals": decision.deferrals,
        "first_seen": decision.first_seen,
        "reservations": dict(decision.reservations),
    }


_MAX_DEFERRALS_HEADER = 1_000_000
_FUTURE_SLACK = 30 * 86400.0  # no legitimate slot or first-seen time is this far ahead


def message_state(header: object) -> tuple[int, float | None, dict[str, float]]:
    """``(deferrals, first_seen, reservations)`` from a message's header.

    Anything malformed or implausible — wrong types, negative or huge counts, times that
    are not finite or lie far in the future — makes the whole header count as absent
    (logged): a forged header can reset a task's own bounds at worst, never crash the
    worker or skip the pipeline (a forged reservation is still checked by the store).
    """
    if header is None:
        return 0, None, {}
    try:
        if not isinstance(header, Mapping):
            raise TypeError("not a mapping")
        raw = header.get("deferrals", 0)
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= _MAX_DEFERRALS_HEADER:
            raise ValueError(f"deferrals {raw!r}")
        horizon = time.time() + _FUTURE_SLACK
        first = header.get("first_seen")
        first_seen = None if first is None else _plausible_time(first, horizon)
        slots = header.get("reservations") or {}
        if not isinstance(slots, Mapping):
            raise TypeError("reservations are not a mapping")
        reservations = {str(k): _plausible_time(v, horizon) for k, v in slots.items()}
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:
        log.warning("ignoring a malformed %r header (%s): %.200r", HEADER, exc, header)
        return 0, None, {}
    return raw, first_seen, reservations


def _plausible_time(value: object, horizon: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"time {value!r}")
    number = float(value)
    if not (math.isfinite(number) and 0 <= number <= horizon):
        raise ValueError(f"time {value!r}")
    return number


def dead_letter(
    store: Store,
    policy: Policy,
    context: TaskContext,
    *,
    reason: str,
    headers: Mapping[str, Any],
    attempts: int,
    error: str,
    letter_id: str | None = None,
    hooks: HookRunner | None = None,
) -> DeadLetter:
    """Store a dead letter for the execution ``context``, log it and tell ``hooks``.

    Pass the runtime's runner (``runtime.pipeline.hooks``) so ``Hooks.on_dead_letter``
    fires; the WARNING line on ``limitpal_tasks.deadletter`` is written either way. A
    store failure is logged with the whole entry, never raised over the task's own error.
    """
    try:
        key = policy.key.render(context)
    except LimitpalError:
        key = ""
    task_name = context.task_name
    letter = DeadLetter(
        id=letter_id or uuid.uuid4().hex,
        task_name=task_name,
        reason=reason,
        policy=policy.name,
        key=key,
        args=tuple(context.args),
        kwargs=dict(context.kwargs),
        headers={k: v for k, v in headers.items() if k != HEADER},
        attempts=attempts,
        deferrals=context.deferrals,
        first_seen=context.first_seen,
        dead_at=time.time(),
        error=error,
    )
    try:
        store.put_dead(letter)
    except StoreError as exc:
        # The log is then the only copy of the entry, so it carries the arguments too.
        log.error(
            "dead letter for %s %s (%s) could not be stored: %s; entry: %s",
            task_name,
            letter.id,
            reason,
            exc,
            letter.to_json(),
        )
    # Reported whether or not the store kept it: the task is dead-lettered either way.
    (hooks if hooks is not None else HookRunner()).dead_letter(letter)
    return letter


def park(
    runtime: Runtime,
    policy: Policy,
    context: TaskContext,
    decision: Deferred,
    park_name: str,
    payload: dict[str, Any],
) -> ParkedEntry | None:
    """Keep a deferred task in the store until it is due; ``None`` when its key's park is full.

    Releases are paced on the key of the policy's first rate limit, at that limit's
    interval, so a backlog comes back as a ramp; without a rate limit they are not paced,
    nor is a rate-limited deferral (its booked slot already paces it).
    """
    limit = policy.rates[0] if policy.rates else None
    template = limit.key if limit is not None and limit.key is not None else policy.key
    try:
        key = template.render(context)
    except LimitpalError:
        key = policy.name
    entry = ParkedEntry(
        park=park_name,
        task_name=context.task_name,
        policy=policy.name,
        key=key,
        delay=decision.delay,
        # A rate-limited deferral waits for its own booked slot: pacing it again would only
        # push it behind the key's paced backlog. The others (breaker, pause) are paced.
        interval=limit.interval if limit is not None and decision.reason != "rate_limited" else 0.0,
        payload=payload,
    )
    return runtime.store.park(entry, policy.defer.park_limit)


class Releaser:
    """Re-publishes a park's due tasks: one daemon thread per worker process.

    Every worker runs one; the store hands each due entry to exactly one of them under a
    claim of ``lease`` seconds, and an entry is confirmed only after ``publish`` returned,
    so a releaser killed between taking and publishing loses nothing (the entry is
    released again once the lease ends). A failing publish is logged and retried after the
    lease; a store outage is logged and waited out.
    """

    def __init__(
        self,
        store: Store,
        park_name: str,
        publish: Callable[[ParkedEntry], None],
        *,
        batch: int = 100,
        lease: float = 30.0,
        idle: float = 0.1,
    ) -> None:
        self.store = store
        self.park_name = park_name
        self.publish = publish
        self.batch = batch
        self.lease = lease
        self.idle = idle
        self.released = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Take what is due, publish it, confirm it; how many were released.

        Stops at the first failed publish (the broker is likely down: the rest would fail
        too, slowly) and once half the lease has passed (past the lease another releaser may
        hold the same entries): what is left is released again after the lease.
        """
        started = time.monotonic()
        entries = self.store.take_parked(self.park_name, self.batch, self.lease)
        done = 0
        for entry in entries:
            if time.monotonic() - started > self.lease / 2:
                log.warning(
                    "parked tasks: publishing is slow; %d left for after the lease", len(entries) - done
                )
                break
            try:
                self.publish(entry)
            except Exception:
                log.exception(
                    "could not publish parked %s %s; it and %d more are released again after %gs",
                    entry.task_name,
                    entry.id,
                    len(entries) - done - 1,
                    self.lease,
                )
                break
            try:
                self.store.confirm_parked(self.park_name, entry.id)
            except StoreError as exc:  # published: a second release is possible after the lease
                log.warning(
                    "published parked %s %s but could not confirm it: %s", entry.task_name, entry.id, exc
                )
            done += 1
        self.released += done
        return done

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                released = self.run_once()
            except StoreError as exc:
                log.warning("parked tasks: the store is unavailable (%s); trying again", exc)
                released = 0
            except Exception:
                log.exception("parked tasks: the releaser failed; trying again")
                released = 0
            if released < self.batch:
                self._stop.wait(self.idle)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"limitpal-releaser-{self.park_name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class Runtime:
    """Per-process state of an integration: the store, the pipeline, and the policies.

    Built lazily from :class:`Settings`; :meth:`after_fork` re-creates connections in a
    freshly forked worker process.
    """

    def __init__(self, settings: Settings, store: Store | None = None, hooks: Sequence[Hooks] = ()) -> None:
        self.settings = settings
        self._store = store
        self._hooks = tuple(hooks)
        self._pipeline: Pipeline | None = None
        self._lock = threading.RLock()  # pipeline() builds the store under it too
        self._binders: dict[Callable[..., Any], ArgBinder] = {}
        self._keyed: dict[tuple[int, KeySpec], tuple[Policy, Policy]] = {}
        self.policies: dict[str, Policy] = dict(settings.policies)

    @property
    def store(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    options: dict[str, Any] = {}
                    if not self.settings.store_url.startswith("memory:"):
                        options = {
                            "prefix": self.settings.key_prefix,
                            "store_timeout": self.settings.store_timeout,
                        }
                    self._store = store_from_url(self.settings.store_url, **options)
        return self._store

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            with self._lock:
                if self._pipeline is None:
                    self._pipeline = Pipeline(self.store, hooks=self._hooks)
        return self._pipeline

    @property
    def shared(self) -> bool:
        """Whether the state is shared across processes (not a per-process MemoryStore)."""
        return not isinstance(self.store, MemoryStore)

    def resolve(self, policy: Policy | str, where: str, key: KeySpec | None = None) -> Policy:
        """A policy object from a policy or a registered name, with ``key`` as its key if given.

        The re-keyed copy is made once per (policy, key), not per message.
        """
        found = self._resolve(policy, where)
        if key is None:
            return found
        cache_key = (id(found), key)
        keyed = self._keyed.get(cache_key)
        if keyed is None or keyed[0] is not found:
            keyed = self._keyed[cache_key] = (found, found.evolve(key=key))
        return keyed[1]

    def _resolve(self, policy: Policy | str, where: str) -> Policy:
        if isinstance(policy, Policy):
            return policy
        found = self.policies.get(policy)
        if found is None:
            raise ConfigurationError(
                where,
                policy,
                f"expected a Policy or a registered one ({', '.join(sorted(self.policies)) or 'none'})",
            )
        return found

    def binder(self, func: Callable[..., Any]) -> ArgBinder:
        binder = self._binders.get(func)
        if binder is None:
            binder = self._binders[func] = ArgBinder(func)
        return binder

    def context(
        self,
        task_name: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        header: object,
        func: Callable[..., Any],
    ) -> TaskContext:
        deferrals, first_seen, reservations = message_state(header)
        return TaskContext(
            task_name,
            tuple(args),
            kwargs,
            deferrals=deferrals,
            first_seen=first_seen,
            reservations=reservations,
            binder=self.binder(func),
        )

    def after_fork(self) -> None:
        """Drop connections inherited from the parent; the next use reconnects."""
        reconnect = getattr(self._store, "reconnect", None)
        if callable(reconnect):
            reconnect()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
