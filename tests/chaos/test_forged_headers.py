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
``integrations/_runtime.message_state``. Negative, huge and infinite counts, absurd
first-seen times and far-future slots used to be trusted, or to fail the task (Celery) or
let it skip the pipeline (Dramatiq); the cases below pin their fix (009a2c2).
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

PAUSE = 4.0
"""Each case's tenant is paused this long before its task arrives: deferred for sure (the
workers pick up the ~80 messages well within it, even on a busy machine)."""
OBSERVE = 20.0
"""The longest the scenario waits for every case to settle (a case that never does is a finding)."""
SLOT = "5/1/1"  # the slot id of the guarded policy's "5/s" limit
INTERVAL = 1 / GUARDED_RATE


@dataclass(frozen=True)
class Case:
    id: str
    header: Any
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
    Case("deferrals-negative", {"deferrals": -1000}),
    Case("deferrals-huge", {"deferrals": 10**18}),
    Case("deferrals-infinite", {"deferrals": math.inf}),
    Case("first-seen-far-past", {"first_seen": -1e18}),
    Case("first-seen-far-future", {"first_seen": 1e18}),
    Case("first-seen-nan", {"first_seen": math.nan}),
    Case("reservation-far-future", "far-slot", paused=False),
]
FORGED_BATCH = 10
"""Jobs per framework sent at once to one tenant, each with a forged reservation for 'now'
(and, to another tenant, each with a deferral count of infinity)."""


@dataclass
class Scenario:
    chaos: Chaos
    sent: dict[tuple[str, Framework], Sent] = field(default_factory=dict)
    sent_at: float = 0.0
    batches: dict[Framework, list[Sent]] = field(default_factory=dict)
    bypass: dict[Framework, list[Sent]] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


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
            unpaused = [s for (cid, _), s in scenario.sent.items() if not _case(cid).paused]
            everything = [s for s in scenario.sent.values() if s not in unpaused] + [
                s for batches in (scenario.batches, scenario.bypass) for b in batches.values() for s in b
            ]
            deadline = time.monotonic() + OBSERVE
            chaos.wait_until(
                lambda: len(chaos.finished(everything)) == len(everything) or time.monotonic() > deadline,
                OBSERVE + 10,
                "every forged-header job to settle",
            )
            # Unpaused jobs would run at once: a few seconds after they were sent is plenty.
            chaos.wait_until(
                lambda: len(chaos.finished(unpaused)) == len(unpaused) or time.time() > scenario.sent_at + 8,
                20,
                "the unpaused forged-header jobs to settle",
            )
            scenario.crashes = chaos.crashes()
            yield scenario
        finally:
            store.close()
            chaos.close()


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_a_forged_header_is_treated_as_absent(forged: Scenario, case: Case, framework: Framework) -> None:
    """The task runs once; its deferral count starts from zero and its first-seen time is its own."""
    chaos = forged.chaos
    sent = forged.sent[case.id, framework]

    runs = chaos.runs([sent])
    failures = [f for f in chaos.records("failures") if f["job"] == sent.job]
    deads = [d for d in chaos.records("deads") if d["job"] == sent.job]
    assert failures == [], f"the task failed: {failures}"
    assert deads == [], f"the task was dead-lettered: {deads}"
    assert len(runs) == 1, f"ran {len(runs)} times in {OBSERVE:g}s"
    if case.paused:
        deferred = [d for d in chaos.records("defers") if d["job"] == sent.job]
        assert deferred, "the task arrived after its tenant's pause: the scenario did not test the header"
        header = runs[0]["header"] or {}
        counted = header.get("deferrals")
        assert counted == len(deferred), f"deferral count after {len(deferred)} deferrals: {counted!r}"
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


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_header_that_breaks_its_parsing_neither_fails_the_task_nor_frees_it_from_the_rate(
    forged: Scenario, framework: Framework, record_property: RecordProperty
) -> None:
    """Ten tasks with ``deferrals: Infinity`` for one tenant all run, at the tenant's rate (this used
    to fail them on Celery and, on Dramatiq, to run them all at once, outside the pipeline)."""
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
