"""``limitpal-tasks demo`` (``make demo``): three tenants, a flaky upstream, and no sleeping worker.

By default everything is embedded — Celery's in-memory broker, a ``MemoryStore`` and a
worker in this process — so it runs anywhere. With ``--broker``/``--store`` URLs (Redis),
it starts separate worker processes that share state through the store.

Tenant "noisy" floods 150 calls at once; "quiet-a" and "quiet-b" send a call every
200 ms. Every tenant may call the upstream 15 times a second; the upstream also has its
own quota of 10/s for "noisy" (over it, it answers "come back in 1 s", a ``Cooldown``),
and it is down between the 3rd and the 6th second. The table shows, per tenant, what ran
and what was deferred and why; the summary proves nothing was lost and the quiet tenants
were not slowed by the noisy one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from .core.decisions import Deferred
from .core.events import Hooks
from .core.keys import TaskContext
from .core.policy import Breaker, DeferPolicy, Policy, RateLimit, RetryPolicy
from .errors import Cooldown
from .integrations.celery import ResilientTask, runtime

__all__ = ["app", "run_demo"]

TENANTS = ("noisy", "quiet-a", "quiet-b")
DOWN_FROM, DOWN_UNTIL = 3.0, 6.0  # seconds after the start: the upstream is down
NOISY_QUOTA = 10  # calls per second the upstream accepts from "noisy"

POLICY = Policy(
    "upstream",
    key="tenant:{tenant}",
    breaker=Breaker(
        failure_rate_threshold=50,
        minimum_calls=6,
        window=12,
        open_for=1.5,
        half_open_probes=2,
        key="service:upstream",
    ),
    rate=RateLimit("15/s", burst=3),
    retry=RetryPolicy(max_attempts=8, backoff=0.3, backoff_max=2.0),
    defer=DeferPolicy(max_delay=5.0, max_deferrals=200),
)

app = Celery("limitpal_tasks.demo")


class Stats:
    """Counters per tenant, in this process or in Redis (when workers are separate processes)."""

    def __init__(self, url: str | None) -> None:
        self._lock = threading.Lock()
        self._local: dict[str, Counter[str]] = {t: Counter() for t in TENANTS}
        self._redis: Any = None
        if url:
            import redis  # noqa: PLC0415 - only the multi-process demo needs it

            self._redis = redis.Redis.from_url(url)

    def add(self, tenant: str, field: str, amount: float = 1) -> None:
        if self._redis is not None:
            self._redis.hincrbyfloat(f"limitpal-demo:{tenant}", field, amount)
            return
        with self._lock:
            self._local[tenant][field] += amount  # type: ignore[assignment]

    def read(self) -> dict[str, Counter[str]]:
        if self._redis is not None:
            return {
                t: Counter(
                    {k.decode(): float(v) for k, v in self._redis.hgetall(f"limitpal-demo:{t}").items()}
                )
                for t in TENANTS
            }
        with self._lock:
            return {t: Counter(c) for t, c in self._local.items()}

    def clear(self) -> None:
        if self._redis is not None:
            self._redis.delete(*(f"limitpal-demo:{t}" for t in TENANTS), "limitpal-demo:noisy-window")


STATS = Stats(os.environ.get("LIMITPAL_DEMO_STATS"))
START = float(os.environ.get("LIMITPAL_DEMO_START", "0") or 0)


class DemoHooks(Hooks):
    """Counts deferrals per tenant and reason (the task body never sees them)."""

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        STATS.add(str(context.argument("tenant")), f"deferred:{decision.reason}")


_noisy_calls: list[float] = []
_noisy_lock = threading.Lock()


def _noisy_over_quota(now: float) -> bool:
    """The upstream's own quota for "noisy": at most NOISY_QUOTA calls in any second."""
    with _noisy_lock:
        while _noisy_calls and _noisy_calls[0] <= now - 1.0:
            _noisy_calls.pop(0)
        if len(_noisy_calls) >= NOISY_QUOTA:
            return True
        _noisy_calls.append(now)
        return False


@app.task(  # type: ignore[untyped-decorator]  # celery ships no type information
    base=ResilientTask, policy=POLICY, name="limitpal_tasks.demo.call_upstream"
)
def call_upstream(tenant: str, n: int, sent_at: float) -> int:
    """One call to the simulated upstream on behalf of ``tenant``."""
    now = time.time()
    since = now - (START or float(os.environ.get("LIMITPAL_DEMO_START", "0") or now))
    STATS.add(tenant, "ran")
    if DOWN_FROM <= since < DOWN_UNTIL:
        STATS.add(tenant, "failed")
        raise ConnectionError("upstream is down")
    if tenant == "noisy" and _noisy_over_quota(now):
        STATS.add(tenant, "cooldown")
        raise Cooldown(retry_after=1.0)
    STATS.add(tenant, "succeeded")
    STATS.add(tenant, "latency_total", now - sent_at)
    return n


def _configure(broker: str | None, store: str | None, stats: str | None) -> None:
    app.conf.update(
        broker_url=broker or "memory://",
        result_backend=(broker if broker and broker.startswith("redis") else "cache+memory://"),
        task_acks_late=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"polling_interval": 0.05},
        limitpal_store_url=store or "memory://",
        limitpal_key_prefix="limitpal-demo",
        limitpal_hooks=[DemoHooks()],
    )


@contextmanager
def _workers(broker: str | None, store: str | None, stats: str | None, start: float) -> Iterator[None]:
    """A worker in this process (embedded), or two worker processes (real servers)."""
    if not broker:
        from celery.contrib.testing.worker import start_worker  # noqa: PLC0415

        with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING"):
            yield
        return
    env = {
        **os.environ,
        "LIMITPAL_DEMO_BROKER": broker,
        "LIMITPAL_DEMO_STORE": store or "",
        "LIMITPAL_DEMO_STATS": stats or "",
        "LIMITPAL_DEMO_START": repr(start),
    }
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "limitpal_tasks.demo",
        "worker",
        "--pool=threads",
        "-c",
        "8",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel=WARNING",
        "-Q",
        "limitpal-demo",
    ]
    procs = [subprocess.Popen([*cmd, "-n", f"demo{i}@%h"], env=env) for i in range(2)]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def _table(stats: dict[str, Counter[str]], sent: dict[str, int], breaker: str, elapsed: float) -> str:
    reasons = ("rate_limited", "breaker_open", "half_open_busy", "paused")
    head = f"{'tenant':8} {'sent':>5} {'ran':>5} {'ok':>5} {'failed':>6} " + " ".join(
        f"{r:>14}" for r in reasons
    )
    lines = [f"t={elapsed:5.1f}s  upstream breaker: {breaker}", head]
    for tenant in TENANTS:
        c = stats[tenant]
        deferred = " ".join(f"{int(c[f'deferred:{r}']):>14}" for r in reasons)
        counts = f"{sent[tenant]:>5} {int(c['ran']):>5} {int(c['succeeded']):>5} {int(c['failed']):>6}"
        lines.append(f"{tenant:8} {counts} {deferred}")
    return "\n".join(lines)


def run_demo(broker: str | None = None, store: str | None = None, timeout: float = 50.0) -> int:
    """Run the demo; returns 0 when every task completed and the quiet tenants were not slowed."""
    global START  # noqa: PLW0603 - the upstream's clock starts with the run
    stats_url = broker if broker and broker.startswith("redis") else None
    if stats_url:
        global STATS  # noqa: PLW0603
        STATS = Stats(stats_url)
        STATS.clear()
    _configure(broker, store, stats_url)
    if broker:
        app.conf.task_default_queue = "limitpal-demo"
    START = time.time()
    os.environ["LIMITPAL_DEMO_START"] = repr(START)
    results: dict[str, list[AsyncResult]] = {t: [] for t in TENANTS}
    sent = dict.fromkeys(TENANTS, 0)
    interactive = sys.stdout.isatty()
    with _workers(broker, store, stats_url, START):
        for i in range(150):
            results["noisy"].append(call_upstream.delay("noisy", i, time.time()))
        sent["noisy"] = 150
        next_quiet = time.time()
        last_print = 0.0
        quiet_n = 0
        while True:
            now = time.time()
            if quiet_n < 40 and now >= next_quiet:
                for tenant in ("quiet-a", "quiet-b"):
                    results[tenant].append(call_upstream.delay(tenant, quiet_n, now))
                    sent[tenant] += 1
                quiet_n += 1
                next_quiet += 0.2
            done = all(r.ready() for rs in results.values() for r in rs) and quiet_n >= 40
            if now - last_print >= (0.5 if interactive else 3.0) or done:
                breaker = runtime(app).store.status("service:upstream").breaker if not broker else "(shared)"
                table = _table(STATS.read(), sent, breaker, now - START)
                print(
                    ("\x1b[H\x1b[2J" if interactive else "") + table + ("" if interactive else "\n"),
                    flush=True,
                )
                last_print = now
            if done or now - START > timeout:
                break
            time.sleep(0.05)
    return _summary(results, sent)


def _summary(results: dict[str, list[AsyncResult]], sent: dict[str, int]) -> int:
    stats = STATS.read()
    print("\nSummary")
    ok = True
    for tenant in TENANTS:
        finished = sum(1 for r in results[tenant] if r.successful())
        failed = sum(1 for r in results[tenant] if r.failed())
        pending = sent[tenant] - finished - failed
        c = stats[tenant]
        average = c["latency_total"] / c["succeeded"] if c["succeeded"] else 0.0
        print(
            f"  {tenant:8} sent {sent[tenant]:3}, succeeded {finished:3}, failed for good {failed}, "
            f"not finished {pending}; mean time to success {average:5.2f}s"
        )
        ok = ok and pending == 0
    print(
        "  nothing lost: every task finished (succeeded or failed for good)"
        if ok
        else "  SOME TASKS DID NOT FINISH"
    )

    def mean(tenant: str) -> float:
        c = stats[tenant]
        return c["latency_total"] / c["succeeded"] if c["succeeded"] else 0.0

    print(
        f"  the flood waited, not its neighbours: quiet tenants took {mean('quiet-a'):.2f}s and "
        f"{mean('quiet-b'):.2f}s on average (through a 3 s outage), the noisy tenant {mean('noisy'):.2f}s; "
        f"it was deferred {int(stats['noisy']['deferred:rate_limited'])} times by its rate limit, "
        "and no worker slept"
    )
    return 0 if ok else 1


if os.environ.get("LIMITPAL_DEMO_BROKER"):  # imported by a demo worker process
    _configure(os.environ["LIMITPAL_DEMO_BROKER"], os.environ.get("LIMITPAL_DEMO_STORE") or None, None)
    app.conf.task_default_queue = "limitpal-demo"
