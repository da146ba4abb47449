"""What the Celery and the Dramatiq payments examples share: policies, task bodies, producer, runner.

The case: tenants of a SaaS charge their customers through one shared payments API.

- Each tenant has its own quota (``rate`` per ``tenant:{tenant_id}``), so one tenant's
  flood waits in the broker, not in front of the others' work.
- The API itself has one breaker (``service:payments``): when it goes down, every worker
  of the fleet stops calling it at once and defers its tasks instead of burning retries.
- After each charge, a webhook tells the tenant's own server. Receivers answer 429 or
  503 with ``Retry-After`` when they want a break; the task raises ``Cooldown``, which
  pauses that receiver's key fleet-wide, so its other deliveries wait without calling it.

The frameworks differ only in how a task is declared and sent; ``celery_payments.py`` and
``dramatiq_payments.py`` hold that part.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from limitpal_tasks import (
    Breaker,
    Bulkhead,
    Cooldown,
    DeadLetter,
    DeferPolicy,
    Deferred,
    FailurePolicy,
    Hooks,
    Policy,
    RateLimit,
    RetryPolicy,
    TaskContext,
    Transition,
    store_from_url,
)

__all__ = [
    "PAYMENTS",
    "WEBHOOKS",
    "ChargeRejected",
    "ExampleHooks",
    "PaymentsUnavailable",
    "ReceiverError",
    "Settings",
    "call_charge",
    "deliver_webhook",
    "parse_settings",
    "produce",
    "run_all",
]

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_UPSTREAM = "http://127.0.0.1:8765"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# -- errors the task bodies raise ---------------------------------------------------------


class PaymentsUnavailable(Exception):
    """The payments API failed without saying when to come back (an outage): retry, and count it."""


class ChargeRejected(Exception):
    """The payments API refused the charge itself (a 4xx): the caller's fault, never retried."""


class ReceiverError(Exception):
    """A webhook receiver failed without ``Retry-After``: retry with backoff."""


# -- policies -------------------------------------------------------------------------------

PAYMENTS = Policy(
    "payments",
    key="tenant:{tenant_id}",  # the rate limit is per tenant: its own quota
    rate=RateLimit("10/s", burst=5),
    breaker=Breaker(  # one breaker for the API, shared by every tenant and every worker
        failure_rate_threshold=50,
        minimum_calls=4,
        window=10,
        open_for=1.5,
        half_open_probes=2,
        key="service:payments",
    ),
    retry=RetryPolicy(max_attempts=10, backoff=0.5, backoff_max=3.0, retry_on=(PaymentsUnavailable,)),
    failure=FailurePolicy(ignore=(ChargeRejected,)),  # not the API's fault: the breaker ignores it
    defer=DeferPolicy(max_delay=10.0, deadline=120.0),
)
"""Per-tenant quota on the shared payments API, with a breaker per upstream."""

WEBHOOKS = Policy(
    "webhooks",
    key="receiver:{tenant_id}",  # a Cooldown pauses this key: one tenant's receiver
    bulkhead=Bulkhead(2, retry_delay=0.5),  # at most two deliveries in flight per receiver
    retry=RetryPolicy(max_attempts=5, backoff=0.5, backoff_max=5.0, retry_on=(ReceiverError,)),
    defer=DeferPolicy(max_delay=10.0, deadline=120.0),
)
"""Webhook deliveries: paced by the receivers' own ``Retry-After``, two at a time per receiver."""


# -- talking to the upstream ----------------------------------------------------------------


def post_json(url: str, payload: Mapping[str, Any], timeout: float = 5.0) -> tuple[int, Mapping[str, str]]:
    """POST ``payload`` as JSON; the status (0 when unreachable) and the response headers."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers)
    except OSError:
        return 0, {}


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date), or ``None``."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def call_charge(upstream: str, tenant_id: str, charge_id: str, amount: int) -> None:
    """The body of the ``charge`` task: one idempotent call to the payments API."""
    status, headers = post_json(
        f"{upstream}/charges", {"tenant_id": tenant_id, "charge_id": charge_id, "amount": amount}
    )
    if status == 200:
        return
    delay = retry_after(headers)
    if status in (429, 503) and delay is not None:
        raise Cooldown(delay, f"payments API answered {status}, Retry-After {delay:g}s")
    if status == 0 or status >= 500:
        raise PaymentsUnavailable(f"payments API answered {status or 'nothing'}")
    raise ChargeRejected(f"payments API refused charge {charge_id}: {status}")


def deliver_webhook(upstream: str, tenant_id: str, event_id: str) -> None:
    """The body of the ``send_webhook`` task: one POST to the tenant's receiver."""
    status, headers = post_json(
        f"{upstream}/webhooks/{tenant_id}", {"event_id": event_id, "type": "charge.succeeded"}
    )
    if 200 <= status < 300:
        return
    delay = retry_after(headers)
    if status in (429, 503) and delay is not None:
        # Pauses receiver:{tenant_id} for every worker; this delivery is deferred, not failed.
        raise Cooldown(delay, f"receiver {tenant_id} answered {status}, Retry-After {delay:g}s")
    raise ReceiverError(f"receiver {tenant_id} answered {status or 'nothing'}")


class Upstream:
    """The producer's view of the simulated upstream (its admin and stats endpoints)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def admin(self, **changes: Any) -> None:
        status, _ = post_json(f"{self.url}/admin", changes)
        if status != 200:
            raise RuntimeError(f"upstream {self.url} is not answering (status {status})")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# -- what the workers report ------------------------------------------------------------------


class ExampleHooks(Hooks):
    """Counts deferrals, breaker transitions and dead letters in a Redis hash the producer reads.

    One extra Redis call per event is fine for an example; in production use
    ``limitpal_tasks.metrics.PrometheusHooks`` and the log lines instead.
    """

    def __init__(self, redis_url: str, key: str) -> None:
        self._redis = redis.Redis.from_url(redis_url)
        self._key = key

    def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
        self._redis.hincrby(self._key, f"deferred {policy}/{decision.reason}", 1)

    def on_transition(self, transition: Transition) -> None:
        name = f"breaker {transition.key} {transition.from_state}->{transition.to_state}"
        self._redis.hincrby(self._key, name, 1)

    def on_dead_letter(self, letter: DeadLetter) -> None:
        self._redis.hincrby(self._key, f"dead {letter.policy}/{letter.reason}", 1)


def stats_key(namespace: str) -> str:
    return f"{namespace}:example-stats"


# -- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Where everything is; from the command line, else the environment, else the local defaults."""

    command: str = "all"
    broker: str = LOCAL_REDIS
    store: str = LOCAL_REDIS
    upstream: str | None = None  # all: None starts one in this process
    namespace: str = "limitpal-example"
    workers: int = 2
    timeout: float = 60.0

    @property
    def upstream_url(self) -> str:
        return self.upstream or LOCAL_UPSTREAM

    def env(self) -> dict[str, str]:
        """The environment a worker process reads these settings from."""
        return {
            "BROKER_URL": self.broker,
            "LIMITPAL_STORE_URL": self.store,
            "LIMITPAL_KEY_PREFIX": self.namespace,
            "UPSTREAM_URL": self.upstream_url,
            "EXAMPLE_NAMESPACE": self.namespace,
        }


def parse_settings(
    argv: Sequence[str] | None, *, prog: str, framework: str, default_namespace: str
) -> Settings:
    """Settings from ``argv`` (a script run) or, when ``argv`` is ``None`` (an import), the environment."""
    env = os.environ
    defaults = Settings(
        broker=env.get("BROKER_URL", LOCAL_REDIS),
        store=env.get("LIMITPAL_STORE_URL", LOCAL_REDIS),
        upstream=env.get("UPSTREAM_URL") or None,
        namespace=env.get("EXAMPLE_NAMESPACE", default_namespace),
    )
    if argv is None:
        return defaults
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Per-tenant quotas on a shared payments API and webhooks that honour Retry-After, "
            f"with {framework} and limitpal_tasks. Without a command: starts a simulated "
            f"upstream, {defaults.workers} worker processes and the producer, runs the scenario "
            "against the local Redis, prints what happened, and exits 0 when every charge and "
            "webhook went through."
        ),
        epilog=(
            "The environment variables BROKER_URL, LIMITPAL_STORE_URL, UPSTREAM_URL and "
            "EXAMPLE_NAMESPACE set the defaults of the options (docker-compose.yml uses them)."
        ),
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="all",
        choices=("all", "worker", "produce"),
        help="all (default): everything in one go; worker: one worker until SIGTERM/Ctrl-C; "
        "produce: send the workload to running workers and report",
    )
    parser.add_argument("--broker", default=defaults.broker, help="broker URL (default: %(default)s)")
    parser.add_argument("--store", default=defaults.store, help="limitpal store URL (default: %(default)s)")
    parser.add_argument(
        "--upstream",
        default=defaults.upstream,
        help=f"the upstream's URL (default: all starts one on a free port; worker and produce use "
        f"{LOCAL_UPSTREAM})",
    )
    parser.add_argument(
        "--namespace",
        default=defaults.namespace,
        help="queue name and key prefix of this run, in the broker and the store (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="worker processes of all (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="produce/all: give up after this many seconds (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not _NAMESPACE.fullmatch(args.namespace):
        parser.error(f"--namespace: expected letters, digits, '.', '_' or '-', got {args.namespace!r}")
    if args.workers < 1:
        parser.error("--workers: expected at least 1")
    return Settings(
        args.command, args.broker, args.store, args.upstream, args.namespace, args.workers, args.timeout
    )


# -- the producer -----------------------------------------------------------------------------

FLOOD = {"acme": 60}  # charges sent at once by the tenant that floods
QUIET = {"globex": 12, "initech": 12}  # charges sent one every QUIET_EVERY seconds
QUIET_EVERY = 0.4
OUTAGE_AFTER, OUTAGE_FOR = 12, 2.0  # the API goes down once this many charges went through


SendCharge = Callable[[str, str, int], None]
"""Enqueue one charge: ``send_charge(tenant_id, charge_id, amount)``."""


def event_id(charge_id: str) -> str:
    """The id of the webhook event a charge sends (the ``send_webhook`` task's argument)."""
    return f"charge.succeeded:{charge_id}"


def produce(settings: Settings, send_charge: SendCharge, title: str) -> int:
    """Send the workload, watch it drain through the upstream's eyes, print a report; 0 on success."""
    upstream = Upstream(settings.upstream_url)
    upstream.wait_healthy()
    upstream.admin(reset=True)
    client = redis.Redis.from_url(settings.store)
    client.delete(stats_key(settings.namespace))
    run = uuid.uuid4().hex[:6]
    start = time.time()
    print(f"{title}: sending {sum(FLOOD.values()) + sum(QUIET.values())} charges", flush=True)
    sent: dict[str, tuple[str, float]] = {}  # charge id -> (tenant, sent at)

    def send(tenant: str, n: int) -> None:
        charge_id = f"{tenant}-{run}-{n}"
        sent[charge_id] = (tenant, time.time())
        send_charge(tenant, charge_id, 100 + n)

    for tenant, count in FLOOD.items():
        for n in range(count):
            send(tenant, n)
    quiet_sent = 0
    outage_at: float | None = None
    stats: dict[str, Any] = {}
    dead: list[DeadLetter] = []
    store = store_from_url(settings.store, prefix=settings.namespace)
    try:
        while True:
            now = time.time()
            if quiet_sent < max(QUIET.values()) and now >= start + quiet_sent * QUIET_EVERY:
                for tenant, count in QUIET.items():
                    if quiet_sent < count:
                        send(tenant, quiet_sent)
                quiet_sent += 1
            stats = upstream.stats()["tenants"]
            applied = {cid for t in stats.values() for cid in t["charges"] if cid in sent}
            delivered = {e for t in stats.values() for e in t["webhooks"]}
            if outage_at is None and len(applied) >= OUTAGE_AFTER:
                upstream.admin(down_for=OUTAGE_FOR)
                outage_at = now
                print(f"t={now - start:4.1f}s  the payments API goes down for {OUTAGE_FOR:g}s", flush=True)
            dead = [d for d in store.list_dead(1000) if d.dead_at >= start - 1]
            # A dead-lettered charge or webhook will not go through: stop waiting for it.
            given_up = {str(a) for d in dead for a in (*d.args, *d.kwargs.values())}
            charges_left = set(sent) - applied - given_up
            webhooks_left = {event_id(c) for c in applied} - delivered - given_up
            if quiet_sent >= max(QUIET.values()) and not charges_left and not webhooks_left:
                break
            if now - start > settings.timeout:
                print(f"gave up after {settings.timeout:g}s", flush=True)
                break
            time.sleep(0.1)
        elapsed = time.time() - start
    finally:
        store.close()
    raw: Mapping[bytes, bytes] = client.hgetall(stats_key(settings.namespace))  # type: ignore[assignment]  # bytes: no decode_responses
    counts = {k.decode(): int(v) for k, v in raw.items()}
    client.close()
    return _report(settings, sent, stats, counts, dead, elapsed)


def _report(
    settings: Settings,
    sent: Mapping[str, tuple[str, float]],
    stats: Mapping[str, Any],
    counts: Mapping[str, int],
    dead: Sequence[DeadLetter],
    elapsed: float,
) -> int:
    print()
    print(f"{'tenant':8} {'charges':>7} {'applied':>7} {'max wait':>8} {'webhooks':>8} refused by upstream")
    total_applied = total_delivered = 0
    for tenant in sorted({t for t, _ in sent.values()}):
        mine = {cid: at for cid, (t, at) in sent.items() if t == tenant}
        seen = stats.get(tenant, {"charges": {}, "webhooks": [], "refused": {}})
        applied = {cid: at for cid, at in seen["charges"].items() if cid in mine}
        delivered = [e for e in seen["webhooks"] if e.removeprefix("charge.succeeded:") in mine]
        waits = [applied[cid] - mine[cid] for cid in applied]
        refused = ", ".join(f"{n} x {what}" for what, n in sorted(seen["refused"].items())) or "-"
        wait = f"{max(waits):7.1f}s" if waits else "       -"
        print(f"{tenant:8} {len(mine):7} {len(applied):7} {wait} {len(delivered):8} {refused}")
        total_applied += len(applied)
        total_delivered += len(delivered)
    print()
    for prefix, label in (("breaker ", "breaker"), ("deferred ", "deferred"), ("dead ", "dead-lettered")):
        items = Counter({k.removeprefix(prefix): v for k, v in counts.items() if k.startswith(prefix)})
        text = ", ".join(f"{k}: {v}" for k, v in sorted(items.items())) or "none"
        print(f"{label + ':':14} {text}")
    print(
        f"\nstate: limitpal-tasks status --store {settings.store} --prefix {settings.namespace}"
        f"\ndead letters: limitpal-tasks dead list --store {settings.store} --prefix {settings.namespace}"
    )
    ok = total_applied == len(sent) and total_delivered == len(sent) and not dead
    if ok:
        print(
            f"\nOK: {total_applied} charges applied exactly once, {total_delivered} webhooks delivered, "
            f"0 dead letters, in {elapsed:.1f}s; no worker slept",
            flush=True,
        )
        return 0
    print(
        f"\nFAILED: {total_applied}/{len(sent)} charges applied, {total_delivered}/{len(sent)} webhooks "
        f"delivered, {len(dead)} dead letters ({', '.join(sorted({d.reason for d in dead})) or '-'})",
        flush=True,
    )
    return 1


# -- running everything -------------------------------------------------------------------------


def _forget_namespace(settings: Settings) -> None:
    """Delete what an earlier run of this namespace left in Redis (queues, state, dead letters)."""
    for url in {settings.broker, settings.store}:
        if not url.startswith(("redis://", "rediss://")):
            continue
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{settings.namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def _workers(script: Path, settings: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``settings.workers`` processes running ``script worker``; stopped (SIGTERM) on exit."""
    env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), "worker"], env=env) for _ in range(settings.workers)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_all(settings: Settings, script: Path, send_charge: SendCharge, title: str) -> int:
    """Upstream (unless ``--upstream``), workers and producer, in one command."""
    from payments_upstream import serve_in_thread  # noqa: PLC0415 - a sibling of this module

    _forget_namespace(settings)
    with ExitStack() as stack:
        if settings.upstream is None:
            settings = replace(settings, upstream=stack.enter_context(serve_in_thread()))
        print(
            f"{title}: upstream {settings.upstream_url}, {settings.workers} workers, "
            f"broker {settings.broker}, store {settings.store} (prefix {settings.namespace})",
            flush=True,
        )
        stack.enter_context(_workers(script, settings))
        return produce(settings, send_charge, title)
