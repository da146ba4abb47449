"""The scenarios: their load, the policy limitpal runs, the baseline's settings, and what is measured.

Each scenario runs four variants: {Celery, Dramatiq} × {limitpal_tasks, baseline}. The
baseline is what a user of that framework would otherwise write:

- Celery: the task's ``rate_limit`` (per task type and per worker instance; the workers are
  one ``prefork -c N`` instance, so the limit covers them all) and ``autoretry_for`` the upstream's
  errors with ``retry_backoff=1``, ``retry_backoff_max=10``, ``retry_jitter=True``,
  ``max_retries=5``;
- Dramatiq: a ``BucketRateLimiter`` per tenant (Redis backend, one-second buckets) in the
  actor, and the ``Retries`` middleware (``min_backoff=1 s``, ``max_backoff=10 s``, its
  default ``max_retries=20``) for ``RateLimitExceeded`` and the upstream's errors alike.

limitpal_tasks runs the same limits as a ``Policy`` in the ``RedisStore``, with a
``RetryPolicy`` of the same shape (6 attempts, backoff 1 s doubling, full jitter, cap 10 s).
The upstream's quota per tenant is the limit plus its burst, in any sliding second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from limitpal_tasks.stores.redis import RedisStore

from .harness import Load, RunData, Send, sleep_until
from .measures import bins, first_sustained, max_in_window, percentile

__all__ = ["SCENARIOS", "Headline", "Scenario", "Variant", "scenarios"]

RETRY: dict[str, Any] = {
    "max_attempts": 6,
    "backoff": 1.0,
    "backoff_max": 10.0,
    "jitter": "full",
    "retry_on": ["scenarios.upstream.UpstreamError"],
}
ADAPTIVE_POLICY: dict[str, Any] = {
    "key": "service:upstream",
    "rate": {
        "rate": "50/s",
        "adaptive": {"floor": "5/s", "ceiling": "200/s", "increase": 20.0, "cooldown": 1.0, "decrease": 0.5},
    },
    "retry": RETRY,
}
CELERY_MAX_RETRIES = 5
DRAMATIQ_MAX_RETRIES = 20
BACKOFF = 1.0
BACKOFF_MAX = 10.0

Metrics = dict[str, float | None]


@dataclass(frozen=True)
class Headline:
    """One row of the headline table: a metric, its target, and whether a value meets it."""

    metric: str
    label: str
    target: str
    meets: Callable[[float], bool] | None = None
    unit: str = ""


@dataclass(frozen=True)
class Variant:
    """One side of a scenario: limitpal_tasks with a policy, or the framework's own tools."""

    name: str  # in results, queues and key prefixes
    label: str  # in tables and plots
    limitpal: bool = True
    policy: dict[str, Any] | None = None  # limitpal: this policy instead of the scenario's
    on_429: str = "cooldown"  # limitpal: a 429 becomes Cooldown(retry_after), or "raise" it


LIMITPAL = Variant("limitpal", "limitpal_tasks")
BASELINE = Variant("baseline", "baseline", limitpal=False)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    describe: str
    processes: int
    threads: int  # Dramatiq threads per process (Celery runs solo instances)
    timeout: float  # hard limit per variant, from t0
    load: Load
    analyse: Callable[[RunData, Scenario], Metrics]
    headline: tuple[Headline, ...]
    policy: dict[str, Any]
    rate: float | None = None  # the baseline's limit (per tenant; Celery: per task type)
    burst: int = 0
    quota: int | None = None
    outage: tuple[float, float] | None = None
    noop: bool = False
    preload: bool = False
    side_by_side: bool = True
    rounds: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    variants: tuple[Variant, ...] = (LIMITPAL, BASELINE)  # the first is the "limitpal" column
    frameworks: tuple[str, ...] = ("celery", "dramatiq")
    steps: tuple[tuple[float, int], ...] = ()  # the upstream's capacity: (seconds after t0, quota)


def _fixed(rate: str) -> dict[str, Any]:
    return {"key": "service:upstream", "rate": {"rate": rate}, "retry": RETRY}


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


# -- measures shared by scenarios --------------------------------------------------------------


def _common(run: RunData) -> Metrics:
    counts: dict[str, int] = {}
    for event in run.events:
        counts[event["e"]] = counts.get(event["e"], 0) + 1
    statuses = [a.status for a in run.arrivals]
    counted = sum(1 for e in run.of("defer") if e.get("c"))
    return {
        "deferrals": counted,
        "deferral_hops_uncounted": counts.get("defer", 0) - counted,
        "retries": counts.get("retry", 0),
        "rate_limiter_refusals": counts.get("limited", 0),
        "upstream_calls": len(statuses),
        "upstream_429": statuses.count(429),
        "upstream_503": statuses.count(503),
        "timed_out": float(run.timed_out),
    }


def _latencies(run: RunData, tenant: str) -> list[float]:
    out = []
    for task_id, (t, k) in run.enqueued.items():
        if k != tenant:
            continue
        final = run.finished.get(task_id)
        out.append(math.inf if final is None else final[1] - t)
    return out


# -- noisy neighbour ---------------------------------------------------------------------------


def _noisy_load(a: int, b: int) -> Load:
    def load(send: Send, t0: float) -> None:
        sleep_until(t0)
        for task_id in _ids("A", a):
            send("A", task_id)
        sleep_until(t0 + 1.0)
        for task_id in _ids("B", b):
            send("B", task_id)

    return load


def _noisy(run: RunData, scenario: Scenario) -> Metrics:
    b = _latencies(run, "B")
    a = _latencies(run, "A")
    a_ends = [run.finished[i][1] for i, (_, k) in run.enqueued.items() if k == "A" and i in run.finished]
    return {
        "b_p50": percentile(b, 50),
        "b_p95": percentile(b, 95),
        "b_max": max(b) if b else None,
        "a_p95": percentile(a, 95),
        "a_drained_after": (max(a_ends) - run.t0) if a_ends else None,
        **_common(run),
    }


# -- backlog drain -----------------------------------------------------------------------------


def _backlog_load(n: int) -> Load:
    def load(send: Send, t0: float) -> None:
        sleep_until(t0)
        for task_id in _ids("K", n):
            send("k", task_id)

    return load


def _drain(run: RunData, scenario: Scenario) -> Metrics:
    n = scenario.params["n"]
    ideal = n / scenario.params["rate"]
    first = min((t for t, _ in run.enqueued.values()), default=run.t0)
    last = max((t for _, t in run.finished.values()), default=math.nan)
    drain = last - first if not run.accounting.unfinished else math.inf
    return {"drain_s": drain, "ideal_s": ideal, "drain_ratio": drain / ideal, **_common(run)}


# -- outage and recovery -----------------------------------------------------------------------


def _steady_load(rate: float, duration: float, tenants: int) -> Load:
    def load(send: Send, t0: float) -> None:
        n = int(rate * duration)
        for i in range(n):
            due = t0 + i / rate
            if due > time.time():
                sleep_until(due)
            send(f"t{i % tenants:02d}", f"S{i:06d}")

    return load


def _outage(run: RunData, scenario: Scenario) -> Metrics:
    window = run.outage_window
    assert window is not None
    down, up = window
    rate = scenario.params["rate"]
    load_end = run.t0 + scenario.params["duration"]
    down_calls = [a.t for a in run.arrivals if down <= a.t < up]
    opens = [float(e["t"]) for e in run.of("tr") if e["to"] == "open" and down <= float(e["t"]) < up]
    keys = {e["key"] for e in run.of("tr") if e["to"] == "open"}
    metrics: Metrics = {"calls_while_down": len(down_calls)}
    if opens:
        tripped = opens[0]
        after = sum(1 for t in down_calls if t >= tripped)
        metrics.update(
            calls_to_trip=sum(1 for t in down_calls if t < tripped),
            calls_after_trip=after,
            break_periods=len(opens),
            breaker_keys=len(keys),
            calls_per_break_per_key=after / (len(opens) * max(1, len(keys))),
            trip_after_s=tripped - down,
        )
    in_outage = [float(e["t"]) for e in run.events if e["e"] in ("retry", "limited") and down <= e["t"] < up]
    deferred = [float(e["t"]) for e in run.events if e["e"] == "defer" and down <= e["t"] < up]
    after_up = [a.t for a in run.arrivals if up <= a.t < load_end]
    per_bin = bins(after_up, up, load_end, 0.1)
    mean = sum(per_bin) / len(per_bin) if per_bin else 0.0
    ok_times = [a.t for a in run.arrivals if a.status == 200]
    full = first_sustained(ok_times, up, 1.0, 0.95 * rate)
    metrics.update(
        retries_during_outage=len(in_outage),
        deferrals_during_outage=len(deferred),
        herd_factor=(max(per_bin) / mean) if mean else None,
        recovery_to_full_s=(full - up) if full is not None else None,
        **_common(run),
    )
    return metrics


# -- rate accuracy -----------------------------------------------------------------------------


def _accuracy(run: RunData, scenario: Scenario) -> Metrics:
    rate = scenario.params["rate"]
    burst = scenario.burst
    times = [a.t for a in run.arrivals]
    ok = [a.t for a in run.arrivals if a.status == 200]
    worst = max_in_window(times, 1.0)
    span = ok[-1] - ok[0] if len(ok) > 1 else math.nan
    return {
        "max_1s_window": worst,
        "window_ratio": worst / (rate + burst),
        "achieved_rate": (len(ok) - burst) / span if span else None,
        "utilization": (len(ok) - burst) / (rate * span) if span else None,
        **_common(run),
    }


# -- overhead ----------------------------------------------------------------------------------


def _overhead(run: RunData, scenario: Scenario) -> Metrics:
    starts = [float(e["t"]) for e in run.of("start")]
    ends = [float(e["t"]) for e in run.of("end")]
    elapsed = max(ends) - min(starts) if starts and ends else math.nan
    return {"tasks_per_s": len(ends) / elapsed if elapsed else None, **_common(run)}


# -- adaptive rate -----------------------------------------------------------------------------


def _saturating_load(outstanding: int, duration: float, key: str, sample: float, drain: float) -> Load:
    """Keeps ``outstanding`` tasks published and not yet final for ``duration`` seconds, then stops.

    Demand exceeds the upstream's capacity throughout (a queue that always has work), so goodput
    measures what the limiter lets through, and the run ends soon after the schedule: each
    variant only drains the ``outstanding`` tasks left. A variant with an adaptive limit has the
    key's rate sampled from the store every ``sample`` seconds (``rate`` events) until every task
    is final (or ``drain`` seconds after the schedule).
    """

    def load(send: Send, t0: float) -> None:
        spec = send.spec
        store = None
        if spec.variant == "limitpal" and "adaptive" in (spec.policy or {}).get("rate", {}):
            store = RedisStore.from_url(spec.store_url, prefix=spec.key_prefix)
        sent = 0
        next_sample = t0
        try:
            sleep_until(t0)
            while True:
                now = time.time()
                done = send.finished()
                if now < t0 + duration:
                    while sent - done < outstanding:
                        send("api", f"C{sent:06d}")
                        sent += 1
                elif done >= sent or now > t0 + duration + drain:
                    break
                if store is not None and now >= next_sample:
                    for slot, adaptive in store.status(key).adaptive.items():
                        send.note("rate", slot=slot, r=round(adaptive.rate, 3))
                    next_sample = max(next_sample + sample, now)
                time.sleep(0.01)
        finally:
            if store is not None:
                store.close()

    return load


def _capacity_at(steps: tuple[tuple[float, int], ...], t: float) -> float:
    """The upstream's quota ``t`` seconds after t0 (``nan`` before the first step)."""
    quota = math.nan
    for at, q in steps:
        if t >= at:
            quota = float(q)
    return quota


def _phases(scenario: Scenario) -> list[tuple[float, float, int]]:
    """``(start, end, capacity)`` of every step of the schedule, in seconds after t0."""
    steps = scenario.steps
    ends = [at for at, _ in steps[1:]] + [scenario.params["duration"]]
    return [(at, end, q) for (at, q), end in zip(steps, ends)]


def _adaptive(run: RunData, scenario: Scenario) -> Metrics:
    duration = scenario.params["duration"]
    t0 = run.t0
    ok = [a.t - t0 for a in run.arrivals if a.status == 200]
    in_window = [t for t in ok if 0.0 <= t < duration]
    statuses = [a.status for a in run.arrivals]
    capacity = sum((end - start) * q for start, end, q in _phases(scenario))
    latencies = [
        final[1] - run.enqueued[task_id][0]
        for task_id, final in run.finished.items()
        if final[0] == "ok" and task_id in run.enqueued
    ]
    metrics: Metrics = {
        "goodput": len(in_window) / duration,
        "capacity_mean": capacity / duration,
        "goodput_share": len(in_window) / capacity,
        "upstream_calls": len(statuses),
        "upstream_429": statuses.count(429),
        "pct_429": 100.0 * statuses.count(429) / len(statuses) if statuses else None,
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "succeeded": len(latencies),
    }
    samples = [(float(e["t"]) - t0, float(e["r"])) for e in run.of("rate")]
    for i, (start, end, q) in enumerate(_phases(scenario), 1):
        calls = [a for a in run.arrivals if start <= a.t - t0 < end]
        metrics[f"phase{i}_capacity"] = float(q)
        metrics[f"phase{i}_goodput"] = sum(1 for a in calls if a.status == 200) / (end - start)
        metrics[f"phase{i}_429"] = sum(1 for a in calls if a.status == 429)
        rates = [r for t, r in samples if start <= t < end]
        metrics[f"phase{i}_rate_mean"] = sum(rates) / len(rates) if rates else None
        if i > 1 and rates:
            # How long the learned rate took to come within 20 % of the new capacity.
            previous = _phases(scenario)[i - 2][2]
            near = next(
                (
                    t
                    for t, r in samples
                    if start <= t < end and (r <= 1.2 * q if q < previous else r >= 0.8 * q)
                ),
                None,
            )
            metrics[f"phase{i}_follow_s"] = None if near is None else near - start
    ends = [t for _, t in run.finished.values()]
    metrics["drain_after_s"] = max(ends) - (t0 + duration) if ends else None
    return {**_common(run), **metrics}


# -- the list ----------------------------------------------------------------------------------


def scenarios(quick: bool = False) -> list[Scenario]:
    """Every scenario at full size (``make scenarios``) or shortened for a smoke run."""
    a_tasks = 400 if quick else 2000
    drain_n = 400 if quick else 2000
    steady = (2.0, 4.0, 4.0) if quick else (5.0, 10.0, 10.0)  # healthy, down, healthy after
    accuracy_s = 8.0 if quick else 30.0
    noop_n = 600 if quick else 3000
    outage_duration = sum(steady)
    phase = 5.0 if quick else 20.0  # adaptive rate: capacity 100/s, then 30/s, then 100/s again
    outstanding = 40 if quick else 100
    start = ADAPTIVE_POLICY["rate"]["rate"]
    learn = ADAPTIVE_POLICY["rate"]["adaptive"]
    floor_ceiling = f"{learn['floor'].removesuffix('/s')}–{learn['ceiling']}"
    breaker = {
        "key": "service:upstream",
        "minimum_calls": 20,
        "window": 20,
        "failure_rate_threshold": 50,
        "open_for": 1.0,
        "multiplier": 2.0,
        "open_for_max": 4.0,
        "half_open_probes": 3,
    }
    return [
        Scenario(
            name="noisy_neighbour",
            title="Noisy neighbour",
            describe=(
                f"tenant A enqueues {a_tasks} tasks, limited to 50/s per tenant (burst 5); tenant B "
                "enqueues 50 tasks one second later. B's latency, enqueue to end. 2 worker processes."
            ),
            processes=2,
            threads=4,
            timeout=a_tasks / 50 + 25,
            load=_noisy_load(a_tasks, 50),
            analyse=_noisy,
            headline=(
                Headline("b_p95", "noisy neighbour: B p95 latency", "≤ 1 s", lambda v: v <= 1.0, " s"),
                Headline("b_p50", "noisy neighbour: B p50 latency", "", None, " s"),
                Headline("b_max", "noisy neighbour: B max latency", "", None, " s"),
            ),
            policy={"key": "tenant:{tenant}", "rate": {"rate": "50/s", "burst": 5}, "retry": RETRY},
            rate=50.0,
            burst=5,
            quota=55,
        ),
        Scenario(
            name="backlog_drain",
            title="Backlog drain",
            describe=(
                f"{drain_n} tasks for one key limited to 100/s (burst 10), 2 worker processes. "
                f"Drain time (first enqueue to last end) ÷ the ideal {drain_n / 100:g} s."
            ),
            processes=2,
            threads=4,
            timeout=drain_n / 100 + 25,
            load=_backlog_load(drain_n),
            analyse=_drain,
            headline=(Headline("drain_ratio", "backlog drain: time ÷ ideal", "≤ 1.05", lambda v: v <= 1.05),),
            policy={"key": "one-key", "rate": {"rate": "100/s", "burst": 10}, "retry": RETRY},
            rate=100.0,
            burst=10,
            quota=110,
            params={"n": drain_n, "rate": 100.0},
        ),
        Scenario(
            name="outage",
            title="Outage and recovery",
            describe=(
                f"200 tasks/s across 20 tenants for {outage_duration:g} s; the upstream is down from "
                f"{steady[0]:g} s to {steady[0] + steady[1]:g} s. Per-tenant limit 20/s (burst 2); "
                "limitpal adds a breaker on service:upstream (20-call window, 50 %, open 1 s doubling "
                "to 4 s, 3 half-open probes). 4 worker processes."
            ),
            processes=4,
            threads=4,
            timeout=outage_duration + 35,
            load=_steady_load(200.0, outage_duration, 20),
            analyse=_outage,
            headline=(
                Headline("calls_while_down", "outage: calls reaching the upstream while down", "", None, ""),
                Headline(
                    "calls_per_break_per_key",
                    "outage: calls per break period per breaker key (after the trip)",
                    "≤ 3 (half_open_probes)",
                    lambda v: v <= 3,
                ),
                Headline("retries_during_outage", "outage: retries spent during the outage", "", None),
                Headline("herd_factor", "outage: herd factor (max 100 ms ÷ mean, after recovery)", "", None),
                Headline("recovery_to_full_s", "outage: recovery to full throughput", "", None, " s"),
            ),
            policy={
                "key": "tenant:{tenant}",
                "rate": {"rate": "20/s", "burst": 2},
                "breaker": breaker,
                "retry": RETRY,
            },
            rate=20.0,
            burst=2,
            quota=22,
            outage=(steady[0], steady[0] + steady[1]),
            params={"rate": 200.0, "duration": outage_duration},
        ),
        Scenario(
            name="rate_accuracy",
            title="Rate accuracy",
            describe=(
                f"{int(200 * accuracy_s)} tasks for one key limited to 200/s (burst 20), enqueued at "
                f"once: {accuracy_s:g} s of work at the limit. 4 worker processes. Largest count at the "
                "upstream in any 1 s window ÷ (rate + burst); utilization = achieved rate ÷ limit."
            ),
            processes=4,
            threads=4,
            timeout=accuracy_s + 25,
            load=_backlog_load(int(200 * accuracy_s)),
            analyse=_accuracy,
            headline=(
                Headline(
                    "window_ratio",
                    "rate accuracy: max 1 s window ÷ (rate + burst)",
                    "≤ 1.0",
                    lambda v: v <= 1.0,
                ),
                Headline("utilization", "rate accuracy: utilization", "≥ 0.95", lambda v: v >= 0.95),
            ),
            policy={"key": "one-key", "rate": {"rate": "200/s", "burst": 20}, "retry": RETRY},
            rate=200.0,
            burst=20,
            quota=220,
            params={"rate": 200.0},
        ),
        Scenario(
            name="adaptive_rate",
            title="Adaptive rate",
            describe=(
                f"the upstream's capacity is 100/s for {phase:g} s, 30/s for {phase:g} s, 100/s for "
                f"{phase:g} s (429 beyond it, in any sliding second); {outstanding} tasks always "
                f"waiting on one key (a new one for each that ends) for {3 * phase:g} s, then drained. "
                f"limitpal_tasks three ways, side by side: adaptive (start {start}, floor "
                f"{learn['floor']}, ceiling {learn['ceiling']}, increase {learn['increase']:g}/s per s, "
                f"cooldown {learn['cooldown']:g} s, decrease {learn['decrease']:g}), fixed at the ceiling "
                f"{learn['ceiling']}, fixed at the floor {learn['floor']}; a 429 propagates (status_code "
                "429: the overload signal) and is retried (6 attempts). Dramatiq, 2 worker processes each."
            ),
            processes=2,
            threads=4,
            timeout=3 * phase + outstanding / 5 + 20,
            load=_saturating_load(outstanding, 3 * phase, "service:upstream", 0.2, outstanding / 5 + 15),
            analyse=_adaptive,
            headline=(
                Headline(
                    "goodput",
                    f"adaptive rate: goodput, successful calls/s over the {3 * phase:g} s schedule "
                    "(capacity averages 76.7/s)",
                    "",
                    None,
                    "/s",
                ),
                Headline("goodput_share", "adaptive rate: goodput ÷ capacity", "", None),
                Headline("upstream_429", "adaptive rate: 429 answers", "", None),
                Headline("pct_429", "adaptive rate: 429 share of upstream calls", "", None, " %"),
                Headline("latency_p95", "adaptive rate: p95 latency, enqueue → success", "", None, " s"),
                Headline(
                    "phase2_follow_s",
                    "adaptive rate: capacity drops to 30/s → learned rate ≤ 36/s after",
                    "",
                    None,
                    " s",
                ),
                Headline(
                    "phase3_follow_s",
                    "adaptive rate: capacity back to 100/s → learned rate ≥ 80/s after",
                    "",
                    None,
                    " s",
                ),
            ),
            policy=ADAPTIVE_POLICY,
            variants=(
                Variant("adaptive", f"adaptive {floor_ceiling}", policy=ADAPTIVE_POLICY, on_429="raise"),
                Variant(
                    "fixed_ceiling",
                    f"fixed {learn['ceiling']}",
                    policy=_fixed(learn["ceiling"]),
                    on_429="raise",
                ),
                Variant(
                    "fixed_floor", f"fixed {learn['floor']}", policy=_fixed(learn["floor"]), on_429="raise"
                ),
            ),
            frameworks=("dramatiq",),
            steps=((0.0, 100), (phase, 30), (2 * phase, 100)),
            params={"duration": 3 * phase, "outstanding": outstanding},
        ),
        Scenario(
            name="overhead",
            title="Overhead",
            describe=(
                f"{noop_n} no-op tasks over 16 tenants, queued first, then 2 worker processes drain "
                "them: plain framework vs limitpal (breaker + a rate limit that never binds), one after "
                "the other, best of 2 rounds each."
            ),
            processes=2,
            threads=4,
            timeout=60.0,
            load=_noop_load(noop_n),
            analyse=_overhead,
            headline=(
                Headline("tasks_per_s", "overhead: no-op tasks/s", "", None),
                Headline("throughput_ratio", "overhead: throughput ÷ plain", "≥ 0.9", lambda v: v >= 0.9),
            ),
            policy={
                "key": "tenant:{tenant}",
                "breaker": {"minimum_calls": 100, "window": 100},
                "rate": {"rate": "1000000/s", "burst": 1000000},
            },
            noop=True,
            preload=True,
            side_by_side=False,
            rounds=2,
        ),
    ]


def _noop_load(n: int) -> Load:
    def load(send: Send, t0: float) -> None:
        for i, task_id in enumerate(_ids("N", n)):
            send(f"t{i % 16}", task_id)

    return load


SCENARIOS = [s.name for s in scenarios()]
