"""Dramatiq integration: ``LimitpalMiddleware`` and the actor options it accepts.

::

    import dramatiq
    from limitpal_tasks.dramatiq import LimitpalMiddleware, install

    install(broker, LimitpalMiddleware.from_settings({...}))  # after Retries

    @dramatiq.actor(limitpal_policy="payments", limitpal_key="tenant:{tenant_id}")
    def charge(tenant_id, amount): ...

``before_process_message`` admits or defers: a deferral re-enqueues the same message
(same id, so the Results middleware still finds it) with a delay from the decision and a
``limitpal`` option carrying its deferral state, then skips the current delivery.
Deferrals never touch the ``Retries`` middleware's count. Failures still go through
``Retries``; for an actor with a policy, this middleware (added *after* ``Retries``, so
its ``after_process_message`` runs first) sets the message's ``max_retries`` and backoff
from the policy, so the two agree.
"""

from __future__ import annotations

import base64
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import dramatiq
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage

from ..core.deadletter import DeadLetter
from ..core.decisions import Deferred, Outcome, Ticket
from ..core.events import Hooks
from ..core.keys import KeySpec, TaskContext
from ..core.parking import ParkedEntry
from ..core.policy import DeferTransport, FailMode, Policy
from ..core.store import Store
from ..errors import ConfigurationError, Cooldown, StoreError
from ._runtime import HEADER, Releaser, Runtime, Settings, dead_letter, park, state_header

__all__ = ["ActorConfigurationError", "Cooldown", "LimitpalMiddleware", "install", "replay"]

log = logging.getLogger("limitpal_tasks.dramatiq")

_TICKET = "_limitpal_ticket"
_STARTED = "_limitpal_started"
_CONTEXT = "_limitpal_context"
_POLICY = "_limitpal_policy"


class ActorConfigurationError(ConfigurationError, MiddlewareError):
    """An actor's limitpal options are invalid; raised when the actor is declared."""


class LimitpalMiddleware(Middleware):
    """Runs every message of an actor with ``limitpal_policy`` through the pipeline.

    ``policies`` maps names to :class:`Policy` objects (or plain dicts); ``store`` is a
    store or a URL (default ``memory://``); ``fail_mode`` is the default for policies
    given as dicts.
    """

    def __init__(
        self,
        *,
        store: Store | str = "memory://",
        policies: Mapping[str, Policy | Mapping[str, Any]] | None = None,
        fail_mode: FailMode = "open",
        key_prefix: str = "limitpal",
        hooks: tuple[Hooks, ...] = (),
        task_policies: Mapping[str, str] | None = None,
        store_timeout: float = 0.25,
        defer_transport: DeferTransport = "broker",
        park_name: str | None = None,
        park_lease: float = 30.0,
    ) -> None:
        settings = Settings.from_mapping(
            {
                "store_url": store if isinstance(store, str) else "memory://",
                "policies": dict(policies or {}),
                "task_policies": dict(task_policies or {}),
                "fail_mode": fail_mode,
                "key_prefix": key_prefix,
                "store_timeout": store_timeout,
                "defer_transport": defer_transport,
                "park_name": park_name,
                "park_lease": park_lease,
            },
            prefix="",
        )
        self.runtime = Runtime(settings, store=None if isinstance(store, str) else store, hooks=hooks)
        self.releaser: Releaser | None = None

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], prefix: str = "limitpal_", *, hooks: tuple[Hooks, ...] = ()
    ) -> LimitpalMiddleware:
        """Build from the same plain settings the Celery side reads (``limitpal_store_url``, ...)."""
        parsed = Settings.from_mapping(settings, prefix=prefix)
        middleware = cls.__new__(cls)
        middleware.runtime = Runtime(parsed, hooks=hooks)
        middleware.releaser = None
        return middleware

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, hooks: tuple[Hooks, ...] = ()
    ) -> LimitpalMiddleware:
        """Build from ``LIMITPAL_STORE_URL`` and ``LIMITPAL_POLICIES_FILE`` (JSON: name → policy fields)."""
        import json  # noqa: PLC0415 - only this path reads files

        env = os.environ if environ is None else environ
        settings: dict[str, Any] = {"limitpal_store_url": env.get("LIMITPAL_STORE_URL", "memory://")}
        path = env.get("LIMITPAL_POLICIES_FILE")
        if path:
            try:
                settings["limitpal_policies"] = json.loads(Path(path).read_text("utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigurationError(
                    "LIMITPAL_POLICIES_FILE", path, f"expected a readable JSON file ({exc})"
                ) from None
        for name in ("fail_mode", "key_prefix", "defer_transport", "park_name"):
            if f"LIMITPAL_{name.upper()}" in env:
                settings[f"limitpal_{name}"] = env[f"LIMITPAL_{name.upper()}"]
        for name in ("store_timeout", "park_lease"):
            if f"LIMITPAL_{name.upper()}" in env:
                raw = env[f"LIMITPAL_{name.upper()}"]
                try:
                    settings[f"limitpal_{name}"] = float(raw)
                except ValueError:
                    raise ConfigurationError(
                        f"LIMITPAL_{name.upper()}", raw, "expected seconds > 0"
                    ) from None
        return cls.from_settings(settings, hooks=hooks)

    # -- declaration ------------------------------------------------------------------

    @property
    def actor_options(self) -> set[str]:
        return {"limitpal_policy", "limitpal_key"}

    def _policy(self, actor: Any) -> Policy | None:
        declared = self.runtime.settings.task_policies.get(actor.actor_name)  # settings first
        key: KeySpec | None = None
        if declared is None:
            declared = actor.options.get("limitpal_policy")
            key = actor.options.get("limitpal_key")
        if declared is None:
            return None
        return self.runtime.resolve(declared, f"actor {actor.actor_name}: limitpal_policy", key)

    def before_declare_actor(self, broker: Any, actor: Any) -> None:
        """Fail at declaration when the policy is unknown or a key names a parameter the actor lacks."""
        try:
            policy = self._policy(actor)
            if policy is not None:
                policy.check_keys(actor.fn)
        except ConfigurationError as exc:
            raise ActorConfigurationError(exc.field, exc.value, exc.expected) from None

    def after_process_boot(self, broker: Any) -> None:
        self.runtime.after_fork()  # worker processes are forked: fresh connections

    @property
    def park_name(self) -> str:
        """The park this broker's deferred messages wait in (default ``dramatiq``)."""
        return self.runtime.settings.park_name or "dramatiq"

    def uses_park(self, broker: Any) -> bool:
        """Whether any actor of ``broker`` (or the worker setting) parks its deferrals."""
        if self.runtime.settings.defer_transport == "park":
            return True
        for name in broker.get_declared_actors():
            policy = self._policy(broker.get_actor(name))
            if policy is not None and policy.defer.transport == "park":
                return True
        return False

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        if self.uses_park(broker) and not self.runtime.shared:
            log.warning(
                "limitpal: transport='park' needs a shared store (redis://...); with memory:// "
                "deferrals go through the broker"
            )
        elif self.uses_park(broker):
            self.releaser = Releaser(
                self.runtime.store, self.park_name, _publisher(broker), lease=self.runtime.settings.park_lease
            )
            self.releaser.start()
            log.info("limitpal: releasing parked messages of park %r", self.park_name)

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        if self.releaser is not None:
            self.releaser.stop()
            self.releaser = None

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.runtime.close()

    # -- processing -------------------------------------------------------------------

    def before_process_message(self, broker: Any, message: Any) -> None:
        actor = broker.get_actor(message.actor_name)
        policy = self._policy(actor)
        if policy is None:
            return
        context = self.runtime.context(
            actor.actor_name, tuple(message.args), message.kwargs, message.options.get(HEADER), actor.fn
        )
        loop = _event_loop(actor)
        try:
            if loop is None:
                decision = self.runtime.pipeline.admit(policy, context)
            else:  # an AsyncIO actor: the async store, on Dramatiq's event loop thread
                decision = loop.run_coroutine(self.runtime.pipeline.admit_async(policy, context))
        except ConfigurationError as exc:
            # The key cannot be rendered from these arguments. Dramatiq would log an error
            # raised here and run the actor anyway, outside the policy: fail the message.
            log.error("%s %s: %s; dead-lettered", message.actor_name, message.message_id, exc)
            self._dead_letter(message, policy, context, "bad_key", str(exc))
            message.fail()
            raise SkipMessage("bad_key") from exc
        if not decision.admitted:
            self._defer(broker, message, policy, context, decision)
        setattr(message, _TICKET, decision.ticket)
        setattr(message, _CONTEXT, context)
        setattr(message, _POLICY, policy)
        setattr(message, _STARTED, time.monotonic())

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        ticket: Ticket | None = getattr(message, _TICKET, None)
        if ticket is None:
            return
        setattr(message, _TICKET, None)
        policy: Policy = getattr(message, _POLICY)
        context: TaskContext = getattr(message, _CONTEXT)
        elapsed = time.monotonic() - getattr(message, _STARTED)
        pipeline = self.runtime.pipeline
        if exception is None:
            self._record(broker, message, ticket, Outcome.success(elapsed))
            return
        if isinstance(exception, Cooldown):
            # The upstream said "later": the key is paused fleet-wide, and this message is
            # deferred, through Retries (next in line) but without spending a retry.
            self._record(broker, message, ticket, Outcome.cooldown(exception.retry_after, elapsed))
            now = ticket.admitted_at + elapsed
            deferred = pipeline.deferral(policy, context, "paused", exception.retry_after, now)
            retries = int(message.options.get("retries", 0))
            if deferred.exhausted:
                self._dead_letter(message, policy, context, deferred.exhausted, str(exception))
                message.options["max_retries"] = retries  # Retries fails it: Dramatiq's dead letter too
                return
            message.options[HEADER] = state_header(deferred)
            message.options["retries"] = retries - 1  # Retries adds one back: a deferral is no attempt
            message.options["max_retries"] = retries + 1
            self._backoff(message, deferred.delay)
            return
        self._record(broker, message, ticket, pipeline.outcome_of(policy, exception, elapsed))
        self._retries(message, policy, context, exception)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        ticket: Ticket | None = getattr(message, _TICKET, None)
        if ticket is not None:  # another middleware skipped a message we had admitted
            setattr(message, _TICKET, None)
            self._record(broker, message, ticket, Outcome.ignored())

    # -- helpers ----------------------------------------------------------------------

    def _record(self, broker: Any, message: Any, ticket: Ticket, outcome: Outcome) -> None:
        loop = _event_loop(broker.get_actor(message.actor_name))
        if loop is None:
            self.runtime.pipeline.record(ticket, outcome)
        else:
            loop.run_coroutine(self.runtime.pipeline.record_async(ticket, outcome))

    @staticmethod
    def _backoff(message: Any, delay: float) -> None:
        # Retries draws its backoff in [max/2, max] (its own jitter): ask for twice the
        # delay, so the requeue lands between the delay and twice it.
        milliseconds = max(1, int(delay * 2000))
        message.options["min_backoff"] = milliseconds
        message.options["max_backoff"] = milliseconds

    def _retries(self, message: Any, policy: Policy, context: TaskContext, exception: BaseException) -> None:
        """Tell the Retries middleware (which runs next) what the policy decided."""
        for option in ("max_retries", "min_backoff", "max_backoff"):
            message.options.pop(option, None)  # left by an earlier deferral or retry
        if policy.retry is None:
            return  # the actor's own Retries settings apply
        retries = int(message.options.get("retries", 0))
        decision = self.runtime.pipeline.retry(policy, exception, retries + 1, context)
        if decision.retry:
            message.options["max_retries"] = policy.retry.max_attempts - 1
            self._backoff(message, decision.delay)
            return
        message.options["max_retries"] = retries  # Retries fails the message: Dramatiq's dead letter
        if decision.reason in ("max_attempts", "retry_budget"):
            self._dead_letter(
                message, policy, context, decision.reason, f"{type(exception).__name__}: {exception}"
            )

    def _defer(
        self, broker: Any, message: Any, policy: Policy, context: TaskContext, decision: Deferred
    ) -> NoReturn:
        if decision.exhausted:
            self._dead_letter(
                message, policy, context, decision.exhausted, f"deferred {decision.deferrals} times"
            )
            message.fail()  # to Dramatiq's own dead-letter queue as well
            raise SkipMessage(decision.exhausted)
        parking = (policy.defer.transport or self.runtime.settings.defer_transport) == "park"
        # A per-process MemoryStore cannot park: a worker process's park is not the releaser's.
        if not (parking and self.runtime.shared and self._park(message, policy, context, decision)):
            self._requeue(broker, message, policy, context, decision)
        # The Results middleware would store None for a skipped delivery under this message
        # id; the requeued copy carries the real result later.
        message.options["store_results"] = False
        raise SkipMessage(decision.reason)

    def _park(self, message: Any, policy: Policy, context: TaskContext, decision: Deferred) -> bool:
        """Park the message in the store (encoded by Dramatiq's encoder); False to use the broker."""
        copy = message.copy(options={**message.options, HEADER: state_header(decision)})
        copy.options.pop("redis_message_id", None)  # the Redis broker gives each enqueue its own
        payload = {"message": base64.b64encode(copy.encode()).decode()}
        try:
            parked = park(self.runtime, policy, context, decision, self.park_name, payload)
        except StoreError as exc:
            log.warning(
                "could not park %s %s (%s); deferring through the broker",
                message.actor_name,
                message.message_id,
                exc,
            )
            return False
        if parked is None:
            self._dead_letter(
                message, policy, context, "park_full", f"park full after {decision.deferrals} deferrals"
            )
            message.fail()
            raise SkipMessage("park_full")
        log.debug(
            "parked %s %s for %.3fs: %s",
            message.actor_name,
            message.message_id,
            decision.delay,
            decision.reason,
        )
        return True

    def _requeue(
        self, broker: Any, message: Any, policy: Policy, context: TaskContext, decision: Deferred
    ) -> None:
        copy = message.copy(options={**message.options, HEADER: state_header(decision)})
        broker.enqueue(copy, delay=max(1, int(decision.delay * 1000)))
        log.debug(
            "deferred %s %s by %.3fs: %s",
            message.actor_name,
            message.message_id,
            decision.delay,
            decision.reason,
        )

    def _dead_letter(
        self, message: Any, policy: Policy, context: TaskContext, reason: str, error: str
    ) -> None:
        dead_letter(
            self.runtime.store,
            policy,
            context,
            reason=reason,
            headers={k: v for k, v in message.options.items() if isinstance(v, (str, int, float, bool))},
            attempts=int(message.options.get("retries", 0)) + 1,
            error=error,
            letter_id=message.message_id,
            hooks=self.runtime.pipeline.hooks,
        )


def _publisher(broker: Any) -> Callable[[ParkedEntry], None]:
    def publish(entry: ParkedEntry) -> None:
        broker.enqueue(dramatiq.Message.decode(base64.b64decode(entry.payload["message"])))

    return publish


def _event_loop(actor: Any) -> Any:
    """Dramatiq's event loop thread when ``actor`` is a coroutine actor under ``AsyncIO``."""
    if not inspect.iscoroutinefunction(inspect.unwrap(actor.fn)):  # Dramatiq wraps async actors
        return None
    try:
        from dramatiq.asyncio import get_event_loop_thread  # noqa: PLC0415
    except ImportError:  # pragma: no cover - every supported Dramatiq has it
        return None
    return get_event_loop_thread()


def install(broker: dramatiq.Broker, middleware: LimitpalMiddleware) -> LimitpalMiddleware:
    """Add ``middleware`` to ``broker`` after ``Retries``.

    Dramatiq runs ``after_*`` hooks in reverse order, so this places our
    ``after_process_message`` before Retries': retries then follow the policies.
    """
    from dramatiq.middleware import Retries  # noqa: PLC0415

    has_retries = any(isinstance(m, Retries) for m in broker.middleware)
    broker.add_middleware(middleware, after=Retries if has_retries else None)
    return middleware


# Options that describe one run of a message, not the task: a replay starts without them.
_RUN_OPTIONS = frozenset(
    {HEADER, "retries", "max_retries", "min_backoff", "max_backoff", "traceback", "eta", "redis_message_id"}
)


def replay(broker: dramatiq.Broker, letter: DeadLetter) -> str:
    """Enqueue a dead-lettered message again, with fresh deferral and retry counters; its new id.

    The actor must be declared on ``broker`` (import the module that declares it first).
    """
    actor = broker.get_actor(letter.task_name)
    options = {k: v for k, v in letter.headers.items() if k not in _RUN_OPTIONS}
    message = broker.enqueue(
        actor.message_with_options(args=tuple(letter.args), kwargs=dict(letter.kwargs), **options)
    )
    log.info("replayed dead letter %s of %s as %s", letter.id, letter.task_name, message.message_id)
    return str(message.message_id)
