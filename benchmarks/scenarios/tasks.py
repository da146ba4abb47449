"""The task body both frameworks run, and the hooks that record limitpal's decisions."""

from __future__ import annotations

from limitpal_tasks import Cooldown, Deferred, Hooks, TaskContext, Transition

from .recorder import Recorder, WorkerSpec
from .upstream import Upstream, UpstreamDown, UpstreamThrottled

__all__ = ["RecordingHooks", "TaskBody"]


class RecordingHooks(Hooks):
    """Records every deferral (with its reason) and every breaker transition."""

    def __init__(self, record: Recorder) -> None:
        self.record = record

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        task_id = context.args[1] if len(context.args) > 1 else context.kwargs.get("task_id")
        self.record(
            "defer",
            id=task_id,
            r=decision.reason,
            d=round(decision.delay, 4),
            x=decision.exhausted,
            n=decision.deferrals,
            c=int(decision.deferrals > context.deferrals),  # 0: an uncounted hop (early return)
        )

    def on_transition(self, transition: Transition) -> None:
        self.record("tr", key=transition.key, frm=transition.from_state, to=transition.to_state)

    def on_store_error(self, policy: str, error: BaseException, fallback: str) -> None:
        self.record("store_error", x=type(error).__name__, fallback=fallback)


class TaskBody:
    """Calls the upstream for a tenant (or nothing, for no-op tasks) and records start and end.

    Under limitpal a 429 becomes :class:`Cooldown` (the key pauses, the task is deferred),
    unless the spec says ``on_429="raise"``; under a baseline (or with ``"raise"``) it stays an
    :class:`UpstreamThrottled` error (``status_code`` 429), which the framework or the
    policy's retry retries, and which an adaptive rate limit reads as an overload signal.
    """

    def __init__(self, spec: WorkerSpec, record: Recorder) -> None:
        self.record = record
        self.limitpal = spec.variant == "limitpal" and spec.on_429 == "cooldown"
        self.upstream = (
            Upstream.from_url(spec.store_url, spec.upstream_prefix) if spec.upstream_prefix else None
        )

    def __call__(self, tenant: str, task_id: str) -> None:
        self.record("start", id=task_id, k=tenant)
        if self.upstream is None:
            self.record("end", id=task_id, o="ok")
            return
        try:
            self.upstream.call(tenant, task_id)
        except UpstreamThrottled as exc:
            self.record("end", id=task_id, o="429")
            if self.limitpal:
                raise Cooldown(retry_after=exc.retry_after) from exc
            raise
        except UpstreamDown:
            self.record("end", id=task_id, o="503")
            raise
        self.record("end", id=task_id, o="ok")
