"""Celery integration: ``@resilient_task``, ``ResilientTask``, and settings-driven policies.

Three ways to attach a policy::

    from limitpal_tasks.celery import ResilientTask, install, resilient_task

    @resilient_task(policy=payments, key="tenant:{tenant_id}")        # 1. the decorator
    def charge(tenant_id, amount): ...

    @app.task(base=ResilientTask, policy="payments")                    # 2. a base class
    def refund(tenant_id, amount): ...

    app.conf.limitpal_task_policies = {"proj.tasks.sync": "partner"}   # 3. settings only
    install(app)

Enforcement runs inside the worker around the task body. A task that may not run now is
*deferred*: re-published with the same id, arguments, routing, priority and
chain/chord membership (the path Celery's own ``retry`` takes), a countdown from the
decision, and a ``limitpal`` header carrying its deferral state; the current delivery is
then acknowledged (``Ignore``), so ``request.retries`` is untouched.
"""

from __future__ import annotations

import base64
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, overload

from celery import Celery, Task, shared_task, signals
from celery.exceptions import Ignore, Reject, Retry
from kombu import serialization
from kombu.utils import json as kombu_json

from ..core.deadletter import DeadLetter
from ..core.decisions import Admitted, Deferred, Outcome
from ..core.events import Hooks
from ..core.keys import KeySpec, TaskContext
from ..core.parking import ParkedEntry
from ..core.policy import Policy
from ..errors import ConfigurationError, Cooldown, DeferralLimitExceeded, StoreError
from ._runtime import HEADER, Releaser, Runtime, Settings, dead_letter, park, redacted, state_header

__all__ = [
    "Cooldown",
    "ResilientTask",
    "install",
    "park_name",
    "releaser",
    "replay",
    "resilient_task",
    "runtime",
]

log = logging.getLogger("limitpal_tasks.celery")

_F = TypeVar("_F", bound=Callable[..., Any])
_runtimes: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()
_installed: weakref.WeakSet[Celery] = weakref.WeakSet()


def runtime(app: Celery) -> Runtime:
    """The limitpal runtime of ``app`` in this process (built from ``app.conf`` on first use)."""
    found = _runtimes.get(app)
    if found is None:
        hooks = app.conf.get("limitpal_hooks") or ()
        for hook in hooks:
            if not isinstance(hook, Hooks):
                raise ConfigurationError("limitpal_hooks", hook, "expected limitpal_tasks.Hooks instances")
        found = _runtimes[app] = Runtime(Settings.from_mapping(app.conf), hooks=hooks)
    return found


def _policy_of(task: Task, rt: Runtime) -> Policy | None:
    """The policy enforced for ``task``: settings first (operators), then the task's own."""
    name = rt.settings.task_policies.get(task.name)
    declared = name if name is not None else getattr(task, "policy", None)
    if declared is None:
        return None
    key: KeySpec | None = getattr(task, "limitpal_key", None) if name is None else None
    return rt.resolve(declared, f"policy of task {task.name}", key)


def _enforced_call(task: Task, *args: Any, **kwargs: Any) -> Any:
    """The task body wrapped in the pipeline (replaces ``Task.__call__`` for protected tasks)."""
    request = task.request
    if request.called_directly or request.is_eager:
        return Task.__call__(task, *args, **kwargs)  # not from a broker: nothing to defer
    rt = runtime(task.app)
    policy = _policy_of(task, rt)
    if policy is None:
        return Task.__call__(task, *args, **kwargs)
    headers = request.headers or {}
    context = rt.context(
        task.name, args, kwargs, headers.get(HEADER) or getattr(request, HEADER, None), task.run
    )
    try:
        decision = rt.pipeline.admit(policy, context)
    except ConfigurationError as exc:  # the key cannot be rendered from these arguments
        _dead_letter(task, rt, policy, context, "bad_key", str(exc))
        raise
    if not decision.admitted:
        _defer(task, rt, policy, context, decision)
    return _run(task, rt, policy, context, decision, args, kwargs)


def _run(
    task: Task, rt: Runtime, policy: Policy, context: TaskContext, admitted: Admitted, args: Any, kwargs: Any
) -> Any:
    ticket = admitted.ticket
    start = time.monotonic()
    try:
        result = Task.__call__(task, *args, **kwargs)
    except Cooldown as exc:
        # The upstream said "later": pause the key fleet-wide, and defer this task too.
        elapsed = time.monotonic() - start
        rt.pipeline.record(ticket, Outcome.cooldown(exc.retry_after, elapsed))
        deferred = rt.pipeline.deferral(
            policy, context, "paused", exc.retry_after, ticket.admitted_at + elapsed
        )
        _defer(task, rt, policy, context, deferred)
    except Retry as exc:
        # The task retries itself (self.retry, autoretry_for): the failure it retries for
        # still counts, so a breaker sees an upstream failing behind autoretry_for too.
        cause = exc.exc if isinstance(exc.exc, Exception) else None
        outcome = (
            Outcome.ignored(time.monotonic() - start)
            if cause is None
            else rt.pipeline.outcome_of(policy, cause, time.monotonic() - start)
        )
        rt.pipeline.record(ticket, outcome)
        raise
    except (Ignore, Reject):
        rt.pipeline.record(ticket, Outcome.ignored(time.monotonic() - start))  # the task chose its own path
        raise
    except Exception as exc:
        rt.pipeline.record(ticket, rt.pipeline.outcome_of(policy, exc, time.monotonic() - start))
        _retry_or_fail(task, rt, policy, context, exc)
        raise
    rt.pipeline.record(ticket, Outcome.success(time.monotonic() - start))
    return result


def _retry_or_fail(task: Task, rt: Runtime, policy: Policy, context: TaskContext, exc: Exception) -> None:
    """Retry with the policy's backoff, or dead-letter when attempts (or the budget) ran out."""
    if policy.retry is None:
        return
    attempt = task.request.retries + 1
    decision = rt.pipeline.retry(policy, exc, attempt, context)
    if decision.retry:
        raise task.retry(exc=exc, countdown=decision.delay, max_retries=policy.retry.max_attempts - 1)
    if decision.reason in ("max_attempts", "retry_budget"):
        _dead_letter(task, rt, policy, context, decision.reason, f"{type(exc).__name__}: {exc}")


def _defer(task: Task, rt: Runtime, policy: Policy, context: TaskContext, decision: Deferred) -> NoReturn:
    """Re-publish the task after ``decision.delay`` and acknowledge this delivery; never returns."""
    request = task.request
    if decision.exhausted:
        waited = max(0.0, time.time() - decision.first_seen)
        error = DeferralLimitExceeded(decision.reason, decision.exhausted, decision.deferrals, waited)
        _dead_letter(task, rt, policy, context, decision.exhausted, str(error))
        raise error
    headers = dict(request.headers or {})
    headers[HEADER] = state_header(decision)
    # A per-process MemoryStore cannot park: a prefork child's park is not the releaser's.
    if (
        (policy.defer.transport or rt.settings.defer_transport) == "park"
        and rt.shared
        and _park(task, rt, policy, context, decision, headers)
    ):
        log.debug("parked %s %s for %.3fs: %s", task.name, request.id, decision.delay, decision.reason)
        raise Ignore()
    signature = task.signature_from_request(request, countdown=decision.delay, headers=headers)
    try:
        signature.apply_async()
    except Exception as exc:
        # The message must not be lost: hand it back to the broker if we still hold it.
        log.error("could not re-publish deferred %s %s: %s", task.name, request.id, exc)
        raise Reject(exc, requeue=True) from exc
    log.debug("deferred %s %s by %.3fs: %s", task.name, request.id, decision.delay, decision.reason)
    raise Ignore()


def park_name(app: Celery) -> str:
    """The park this app's deferred tasks wait in (``limitpal_park_name``, default ``celery``)."""
    return runtime(app).settings.park_name or "celery"


def _park(
    task: Task, rt: Runtime, policy: Policy, context: TaskContext, decision: Deferred, headers: dict[str, Any]
) -> bool:
    """Park the deferred task in the store; False to fall back to a broker countdown.

    The task is kept as its signature (JSON) with its arguments serialized by the task's
    own serializer (base64), so it is published again exactly as Celery would.
    """
    request = task.request
    signature = task.signature_from_request(request, headers=headers)
    serializer = task.serializer or task.app.conf.task_serializer
    try:
        content_type, encoding, body = serialization.dumps(  # type: ignore[no-untyped-call]
            (list(signature.args), dict(signature.kwargs)), serializer=serializer
        )
        spec = dict(signature)
        spec["args"], spec["kwargs"] = (), {}
        payload = {
            "signature": kombu_json.dumps(spec),  # type: ignore[no-untyped-call]
            "body": base64.b64encode(body if isinstance(body, bytes) else body.encode()).decode(),
            "content_type": content_type,
            "content_encoding": encoding,
        }
        parked = park(rt, policy, context, decision, park_name(task.app), payload)
    except StoreError as exc:
        log.warning("could not park %s %s (%s); deferring through the broker", task.name, request.id, exc)
        return False
    except (TypeError, ValueError) as exc:
        log.warning("could not park %s %s (%s); deferring through the broker", task.name, request.id, exc)
        return False
    if parked is None:
        waited = max(0.0, time.time() - decision.first_seen)
        error = DeferralLimitExceeded(decision.reason, "park_full", decision.deferrals, waited)
        _dead_letter(task, rt, policy, context, "park_full", str(error))
        raise error
    return True


def _publisher(app: Celery) -> Callable[[ParkedEntry], None]:
    def publish(entry: ParkedEntry) -> None:
        payload = entry.payload
        # Only what this worker accepts from its broker (accept_content): an entry written
        # into the store by someone else must not be able to make it unpickle anything.
        args, kwargs = serialization.loads(  # type: ignore[no-untyped-call]
            base64.b64decode(payload["body"]),
            payload["content_type"],
            payload["content_encoding"],
            accept=serialization.prepare_accept_content(app.conf.accept_content),  # type: ignore[no-untyped-call]
        )
        app.signature(kombu_json.loads(payload["signature"])).apply_async(args=tuple(args), kwargs=kwargs)  # type: ignore[no-untyped-call]

    return publish


_releasers: weakref.WeakKeyDictionary[Celery, Releaser] = weakref.WeakKeyDictionary()


def releaser(app: Celery) -> Releaser:
    """The thread that re-publishes ``app``'s parked tasks when due (one per worker)."""
    found = _releasers.get(app)
    if found is None:
        rt = runtime(app)
        found = _releasers[app] = Releaser(
            rt.store, park_name(app), _publisher(app), lease=rt.settings.park_lease
        )
    return found


def _uses_park(app: Celery, rt: Runtime) -> bool:
    if rt.settings.defer_transport == "park":
        return True
    for task in app.tasks.values():
        policy = _policy_of(task, rt)
        if policy is not None and policy.defer.transport == "park":
            return True
    return False


def _dead_letter(
    task: Task, rt: Runtime, policy: Policy, context: TaskContext, reason: str, error: str
) -> None:
    request = task.request
    dead_letter(
        rt.store,
        policy,
        context,
        reason=reason,
        headers=dict(request.headers or {}),
        attempts=request.retries + 1,
        error=error,
        letter_id=request.id,
        hooks=rt.pipeline.hooks,
    )


class ResilientTask(Task):  # type: ignore[misc]  # celery ships no type information
    """A Celery task class that runs every execution through the limitpal pipeline.

    Use it as ``base=``: ``@app.task(base=ResilientTask, policy="payments")``, with an
    optional ``limitpal_key="tenant:{tenant_id}"`` overriding the policy's key.
    """

    abstract = True
    policy: Policy | str | None = None
    limitpal_key: KeySpec | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _enforced_call(self, *args, **kwargs)

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        install(app)
        declared = cls.__dict__.get("policy")
        if isinstance(declared, Policy) and "run" in cls.__dict__:
            policy = declared if cls.limitpal_key is None else declared.evolve(key=cls.limitpal_key)
            policy.check_keys(cls.__dict__["run"])


@overload
def resilient_task(func: _F, /) -> Any: ...
@overload
def resilient_task(
    *, policy: Policy | str, key: KeySpec | None = None, app: Celery | None = None, **options: Any
) -> Callable[[_F], Any]: ...
def resilient_task(func: _F | None = None, /, **options: Any) -> Any:
    """Create a Celery task protected by a policy, like ``shared_task`` (or ``app.task`` with ``app=``).

    ``policy`` is a :class:`Policy` or the name of one in ``app.conf.limitpal_policies``;
    ``key`` overrides the policy's key template; other keyword arguments are Celery task
    options. Key templates are checked against the function's parameters here, at
    decoration time, when the policy is an object (by name: when the worker starts).
    """
    policy = options.pop("policy", None)
    key = options.pop("key", None)
    app: Celery | None = options.pop("app", None)
    if func is not None:
        raise ConfigurationError(
            "resilient_task", func, "expected keyword arguments: @resilient_task(policy=...)"
        )
    if not isinstance(policy, (Policy, str)):
        raise ConfigurationError(
            "resilient_task.policy", policy, "expected a Policy or the name of a registered policy"
        )

    def create(fn: _F) -> Any:
        if isinstance(policy, Policy):
            (policy if key is None else policy.evolve(key=key)).check_keys(fn)
        task_options = {"base": ResilientTask, **options, "policy": policy, "limitpal_key": key}
        if app is not None:
            install(app)
            return app.task(**task_options)(fn)
        return shared_task(**task_options)(fn)

    return create


def install(app: Celery) -> Celery:
    """Activate limitpal on ``app``: validate settings when a worker starts, protect the tasks
    named in ``limitpal_task_policies``, and manage connections across forks.

    Idempotent; ``@resilient_task(app=...)`` and ``ResilientTask`` call it for you.
    """
    if app in _installed:
        return app
    _installed.add(app)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        _runtimes.pop(app, None)
        try:
            rt = runtime(app)
            _check_tasks(app, rt)
        except ConfigurationError as exc:
            # Celery logs and swallows exceptions from signal handlers; SystemExit stops the worker.
            log.critical("limitpal_tasks: invalid configuration, the worker stops: %s", exc)
            raise SystemExit(f"limitpal_tasks: invalid configuration: {exc}") from exc
        try:
            rt.store.status("limitpal:startup-check")  # one round trip: is the store there?
        except StoreError as exc:
            log.warning(
                "limitpal store %s is unreachable at worker start (%s); policies apply their fail_mode "
                "(default %s) until it is back",
                redacted(rt.settings.store_url),
                exc,
                rt.settings.fail_mode,
            )
        concurrency = getattr(sender, "concurrency", 1) or 1
        pool = str(getattr(sender, "pool_cls", "") or "")
        if not rt.shared and concurrency > 1 and "prefork" in pool.lower():
            log.warning(
                "limitpal_store_url is memory:// with %d worker processes: each process has its own "
                "breakers and budgets; set limitpal_store_url to a redis:// URL to share them",
                concurrency,
            )

    def on_process_init(**_: Any) -> None:
        found = _runtimes.get(app)
        if found is not None:
            found.after_fork()

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        rt = runtime(app)
        if _uses_park(app, rt) and not rt.shared:
            log.warning(
                "limitpal: transport='park' needs a shared store (limitpal_store_url=redis://...); "
                "with memory:// deferrals go through the broker"
            )
        elif _uses_park(app, rt):
            releaser(app).start()
            log.info("limitpal: releasing parked tasks of park %r", park_name(app))

    def on_shutdown(**_: Any) -> None:
        found = _releasers.pop(app, None)
        if found is not None:
            found.stop()
        rt = _runtimes.get(app)
        if rt is not None:
            rt.close()

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    return app


def _check_tasks(app: Celery, rt: Runtime) -> None:
    """Resolve every task's policy and check its keys; protect settings-only tasks; log them."""
    for name in rt.settings.task_policies:
        if name not in app.tasks:
            raise ConfigurationError(
                f"limitpal_task_policies.{name}",
                rt.settings.task_policies[name],
                "expected the name of a registered task",
            )
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        policy = _policy_of(task, rt)
        if policy is None:
            continue
        policy.check_keys(task.run)
        visibility = _visibility_timeout(app)
        transport = policy.defer.transport or rt.settings.defer_transport
        if transport == "broker" and visibility is not None and policy.defer.max_delay >= visibility:
            raise ConfigurationError(
                f"policy {policy.name!r}: defer.max_delay",
                policy.defer.max_delay,
                f"expected less than the broker's visibility_timeout ({visibility:g}s), or deferred "
                "tasks would be redelivered while they wait",
            )
        if not isinstance(task, ResilientTask):
            # A task whose code is not touched: wrap its class's __call__ before the
            # worker builds its tracers (they look for a custom __call__ then).
            type(task).__call__ = _enforced_call
        limits = ", ".join(str(r.rate) for r in policy.rates) or "no rate limit"
        log.info(
            "limitpal: %s -> policy %s (key %s; breaker %s; bulkhead %s; %s; fail_mode %s)",
            name,
            policy.name,
            policy.key.source,
            "on" if policy.breaker else "off",
            policy.bulkhead.max_concurrent if policy.bulkhead else "off",
            limits,
            policy.fail_mode,
        )


def _visibility_timeout(app: Celery) -> float | None:
    """The Redis/SQS broker's visibility timeout (an ETA beyond it gets redelivered), if any."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis", "rediss", "sentinel", "sqs")):
        return None
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", 3600))


def replay(app: Celery, letter: DeadLetter) -> str:
    """Publish a dead-lettered task again, with fresh deferral and retry counters; its new task id."""
    headers = {k: v for k, v in letter.headers.items() if k != HEADER}
    result = app.send_task(
        letter.task_name, args=list(letter.args), kwargs=dict(letter.kwargs), headers=headers
    )
    log.info("replayed dead letter %s of %s as %s", letter.id, letter.task_name, result.id)
    return str(result.id)
