"""Fault 6c: malformed or forged ``limitpal`` headers on messages, through real workers.

The ``limitpal`` header (a Celery message header, a Dramatiq message option) carries a
deferred task's state: deferral count, first-seen time, booked rate-limit slots. Anyone
who can publish to the broker can put anything there. Whatever it holds must be treated as
absent: the worker survives, the task runs once, its deferral bounds start from zero, and
a forged reservation cannot buy a way around the rate limit (the store's execution
schedule checks it).

One scenario (a module fixture) sends every case to a Celery and a Dramatiq worker at
once; each case's tenant is paused for a moment first, so every task is deferred once and
re-published with the state the library made of the forged header. Parsing happens in
``integrations/_runtime.message_state``; the known bugs there are ``xfail(strict=True)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from limitpal_tasks.stores.redis import RedisStore

from .chaos_common import GUARDED_RATE
from .harness import FRAMEWORKS, Chaos, Framework, RecordProperty, Sent
from .servers import RedisServer

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.redis,
    pytest.mark.celery,
    pytest.mark.dramatiq,
    pytest.mark.slow,
]

PAUSE = 2.0
"""Each case's tenant is paused this long before its task arrives: one deferral, for sure."""
OBSERVE = 15.0
"""How long the scenario waits for every case to settle (a case that never does is a finding)."""
SLOT = "5/1/1"  # the slot id of the guarded policy's "5/s" limit
INTERVAL = 1 / GUARDED_RATE

NEGATIVE_BUG = (
    "limitpal bug: message_state takes a negative deferral count as is, so a forged header buys "
    "deferrals beyond max_deferrals"
)
HUGE_BUG = "limitpal bug: message_state takes a huge deferral count as is: the task is dead-lettered at once"
INF_BUG = (
    "limitpal bug: message_state does int(float('inf')), whose OverflowError it does not catch: "
    "Celery fails the task before admission, Dramatiq runs it without admission (see the bypass test)"
)
FIRST_SEEN_BUG = (
    "limitpal bug: message_state takes any float as first_seen (NaN, the far past, the far future): "
    "a forged one dead-letters the task at once (deadline) or lets it outlive its deadline"
)
FAR_SLOT_BUG = (
    "limitpal bug: a carried reservation is not bounded by reserve_ahead: a forged slot in the far "
    "future defers the task again and again (max_delay per hop, not counted as deferrals, so never "
    "dead-lettered), and it never runs"
)


@dataclass(frozen=True)
class Case:
    id: str
    header: Any
    bug: str | None = None
    paused: bool = True


def _res(tenant: str, slot: float) -> dict[str, Any]:
    return {"reservations": {f"hdr:{tenant}|{SLOT}": slot}}


CASES = [
    Case("not-a-mapping", "junk"),
    Case("a-list", [1, 2, 3]),
    Case("deferrals-text", {"deferrals": "many"}),
    Case("deferrals-list", {"deferrals": [1]}),
    Case("deferrals-nan", {"deferrals": math.nan}),
    Case("deferrals-mapping", {"deferrals": {"n": 1}}),
    Case("first-seen-text", {"first_seen": "yesterday"}),
    Case("reservations-text", {"reservations": "slot"}),
    Case("reservations-list", {"reservations": [1, 2]}),
    Case("reservation-text", {"reservations": {f"hdr:?|{SLOT}": "soon"}}),
    Case("reservation-none", {"reservations": {f"hdr:?|{SLOT}": None}}),
    Case(
        "everything-wrong", {"deferrals": {}, "first_seen": [], "reservations": {"x": {}}, "pad": "x" * 65536}
    ),
    Case("deferrals-negative", {"deferrals": -1000}, NEGATIVE_BUG),
    Case("deferrals-huge", {"deferrals": 10**18}, HUGE_BUG),
    Case("deferrals-infinite", {"deferrals": math.inf}, INF_BUG),
    Case("first-seen-far-past", {"first_seen": -1e18}, FIRST_SEEN_BUG),
    Case("first-seen-far-future", {"first_seen": 1e18}, FIRST_SEEN_BUG),
    Case("first-seen-nan", {"first_seen": math.nan}, FIRST_SEEN_BUG),
    Case("reservation-far-future", "far-slot", FAR_SLOT_BUG, paused=False),
]
FORGED_BATCH = 10
"""Jobs per framework sent at once to one tenant, each with a forged reservation for 'now'
(and, to another tenant, each with a deferral count of infinity)."""
BYPASS_CELERY = (
    "limitpal bug: a header that makes message_state raise (deferrals=Infinity: OverflowError) "
    "fails the Celery task before admission: a publisher can fail any task it likes"
)
BYPASS_DRAMATIQ = (
    "limitpal bug: a header that makes message_state raise (deferrals=Infinity: OverflowError) makes "
    "LimitpalMiddleware.before_process_message raise an exception that is no MiddlewareError; Dramatiq's "
    "emit_before logs it and runs the actor anyway: the task skips the pipeline (rate limit, breaker, "
    "bulkhead), whatever the fail mode"
)


@dataclass
class Scenario:
    chaos: Chaos
    sent: dict[tuple[str, Framework], Sent] = field(default_factory=dict)
    sent_at: float = 0.0
    batches: dict[Framework, list[Sent]] = field(default_factory=dict)
    bypass: dict[Framework, list[Sent]] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)


def _tenant(case: Case, framework: Framework) -> str:
    return f"{case.id}-{framework}"


def _header(case: Case, tenant: str, now: float) -> Any:
    if case.header == "far-slot":
        return _res(tenant, now + 1e9)
    if isinstance(case.header, dict) and "reservations" in case.header:
        reservations = case.header["reservations"]
        if isinstance(reservations, dict):
            return {
                **case.header,
                "reservations": {k.replace("?", tenant): v for k, v in reservations.items()},
            }
    return case.header


@pytest.fixture(scope="module")
def forged(recorder: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Send every case to both frameworks at once, plus a batch of forged reservations; let them settle."""
    logs = tmp_path_factory.mktemp("forged-headers")
    with RedisServer.running_server() as broker, RedisServer.running_server() as store_server:
        chaos = Chaos(
            logs, broker_url=broker.url(), store_url=store_server.url(), recorder_url=recorder.url()
        )
        store = RedisStore.from_url(store_server.url(), prefix=chaos.prefix)
        try:
            chaos.start_both()
            scenario = Scenario(chaos)
            for case in CASES:
                for framework in FRAMEWORKS:
                    if case.paused:
                        store.pause(f"hdr:{_tenant(case, framework)}", PAUSE, "test")
            seconds, micros = store.client.time()
            now = seconds + micros / 1e6
            scenario.sent_at = time.time()
            for case in CASES:
                for framework in FRAMEWORKS:
                    tenant = _tenant(case, framework)
                    header = _header(case, tenant, now)
                    scenario.sent[case.id, framework] = chaos.send(framework, "guarded", tenant, header)
            for framework in FRAMEWORKS:
                tenant = f"forger-{framework}"
                scenario.batches[framework] = [
                    chaos.send(framework, "guarded", tenant, _res(tenant, now)) for _ in range(FORGED_BATCH)
                ]
                scenario.bypass[framework] = [
                    chaos.send(framework, "guarded", f"bypass-{framework}", {"deferrals": math.inf})
                    for _ in range(FORGED_BATCH)
                ]
            everything = list(scenario.sent.values()) + [
                s for batches in (scenario.batches, scenario.bypass) for b in batches.values() for s in b
            ]
            deadline = time.monotonic() + OBSERVE
            chaos.wait_until(
                lambda: len(chaos.finished(everything)) == len(everything) or time.monotonic() > deadline,
                OBSERVE + 10,
                "every forged-header job to settle",
            )
            scenario.crashes = chaos.crashes()
            yield scenario
        finally:
            store.close()
            chaos.close()


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    if case.bug is None:
        return []
    return [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.bug)]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_a_forged_header_is_treated_as_absent(forged: Scenario, case: Case, framework: Framework) -> None:
    """The task runs once; its deferral count restarts at zero and its first-seen time is its own."""
    chaos = forged.chaos
    sent = forged.sent[case.id, framework]

    runs = chaos.runs([sent])
    failures = [f for f in chaos.records("failures") if f["job"] == sent.job]
    deads = [d for d in chaos.records("deads") if d["job"] == sent.job]
    assert failures == [], f"the task failed: {failures}"
    assert deads == [], f"the task was dead-lettered: {deads}"
    assert len(runs) == 1, f"ran {len(runs)} times in {OBSERVE:g}s"
    if case.paused:
        header = runs[0]["header"] or {}
        assert header.get("deferrals") == 1, f"deferral count after one deferral: {header.get('deferrals')!r}"
        first_seen = header.get("first_seen")
        assert isinstance(first_seen, float)
        assert forged.sent_at - 5 <= first_seen <= forged.sent_at + PAUSE + 5, f"first_seen {first_seen!r}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_forged_reservations_cannot_skip_the_rate_limit(
    forged: Scenario, framework: Framework, record_property: RecordProperty
) -> None:
    """Ten tasks each carrying a forged 'booked slot' for now still run at the tenant's rate."""
    batch = forged.batches[framework]
    runs = forged.chaos.runs(batch)
    times = sorted(r["admitted_at"] for r in runs)  # the store's clock: no worker scheduling noise
    record_property(
        "latency", {"fault": f"forged reservations, {framework}", "span_s": round(times[-1] - times[0], 3)}
    )

    assert len(runs) == FORGED_BATCH
    # The execution schedule lets two through at once (the slot they claim, and the next), then the rate.
    assert times[-1] - times[0] >= (FORGED_BATCH - 2) * INTERVAL * 0.9, times
    for start in times:
        assert sum(1 for t in times if start <= t < start + INTERVAL * 0.9) <= 2, times


@pytest.mark.parametrize(
    "framework",
    [
        pytest.param(
            "celery", marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=BYPASS_CELERY)
        ),
        pytest.param(
            "dramatiq", marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=BYPASS_DRAMATIQ)
        ),
    ],
)
def test_a_header_that_breaks_its_parsing_neither_fails_the_task_nor_frees_it_from_the_rate(
    forged: Scenario, framework: Framework, record_property: RecordProperty
) -> None:
    """Ten tasks with ``deferrals: Infinity`` for one tenant all run, at the tenant's rate."""
    chaos = forged.chaos
    batch = forged.bypass[framework]
    jobs = {s.job for s in batch}
    failures = [f for f in chaos.records("failures") if f["job"] in jobs]
    times = sorted(r["admitted_at"] or r["t"] for r in chaos.runs(batch))  # unadmitted runs have none
    record_property(
        "latency",
        {
            "fault": f"deferrals=Infinity, {framework}",
            "ran": len(times),
            "failed": len(failures),
            "span_s": round(times[-1] - times[0], 3) if times else None,
        },
    )

    assert failures == [], f"{len(failures)} tasks failed: {failures[0]['exc_type']}: {failures[0]['error']}"
    assert len(times) == FORGED_BATCH
    assert times[-1] - times[0] >= (FORGED_BATCH - 1) * INTERVAL * 0.9, (
        f"ran {len(times)} in {times[-1] - times[0]:.3f}s"
    )


def test_no_worker_crashed_on_any_forged_header(forged: Scenario, record_property: RecordProperty) -> None:
    """Both workers are alive after every forged header, and every job is accounted for."""
    chaos = forged.chaos
    for framework in FRAMEWORKS:
        jobs = [s for (_, fw), s in forged.sent.items() if fw == framework]
        jobs += forged.batches[framework] + forged.bypass[framework]
        ledger = chaos.ledger(f"forged/malformed limitpal headers, {framework}", jobs)
        record_property("ledger", ledger.as_dict())
    assert forged.crashes == []
