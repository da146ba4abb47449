"""Fault 3: a worker is SIGKILLed while it holds a half-open probe slot and a bulkhead lease.

The ``probe`` task is ``acks_late``: the delivery a killed worker held is never
acknowledged, so the broker hands it out again (Celery's Redis transport after its
visibility timeout, Dramatiq's Redis broker once the dead worker's heartbeat is stale).
Meanwhile the dead worker's slots stay taken until their ``lease`` ends (a second probe is
refused), then the breaker is not wedged: the redelivered task (or another one of the key)
is admitted as the probe once the lease is over, the breaker closes, and every task of the
key completes exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from limitpal_tasks import Admitted, Deferred, Outcome, Pipeline, Policy, TaskContext
from limitpal_tasks.stores.redis import RedisStore

from .chaos_common import POLICIES, PROBE_LEASE
from .harness import FRAMEWORKS, Chaos, Framework, RecordProperty
from .servers import RedisServer

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.slow]

# Redeliveries come quickly: a short Celery visibility timeout (still above the policy's
# max_delay of 3 s) and a short Dramatiq heartbeat timeout.
REDELIVERY_ENV = {"LPC_VISIBILITY": "6", "LPC_HEARTBEAT_MS": "4000"}
TENANT = "upstream"
KEY = f"svc:{TENANT}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_killed_worker_holding_a_probe_and_a_lease_is_redelivered_and_completes_once(
    framework: Framework, recorder: RedisServer, tmp_path: Path, record_property: RecordProperty
) -> None:
    """SIGKILL mid-probe: the slots expire after ``lease``, the broker redelivers, the task completes once."""
    policy = Policy.from_dict(POLICIES["probe"], name="probe")
    context = TaskContext("probe", kwargs={"tenant": TENANT})
    with RedisServer.running_server() as broker, RedisServer.running_server() as store_server:
        chaos = Chaos(
            tmp_path, broker_url=broker.url(), store_url=store_server.url(), recorder_url=recorder.url()
        )
        store = RedisStore.from_url(store_server.url(), prefix=chaos.prefix)
        pipeline = Pipeline(store)
        try:
            first = chaos.start(framework, env=REDELIVERY_ENV)
            for _ in range(2):  # Given an open breaker (two failures out of two calls)
                decision = pipeline.admit(policy, context)
                assert isinstance(decision, Admitted)
                pipeline.record(decision.ticket, Outcome.failure(0.1))
            assert store.status(KEY).breaker == "open"

            held = chaos.send(framework, "probe", TENANT, job="held-" + framework)
            chaos.hold(held.job)
            chaos.wait_until(lambda: bool(chaos.records("holding")), 30, "the probe to start and hold")
            status = store.status(KEY)
            assert (status.breaker, status.probes_in_flight, status.in_flight) == ("half_open", 1, 1)

            # When the worker is killed mid-probe
            first.kill()
            killed_at = time.time()
            refused = pipeline.admit(policy, context)
            assert isinstance(refused, Deferred), "a second probe got in while the first one's lease holds"
            assert refused.reason == "half_open_busy"
            chaos.release(held.job)
            chaos.start(framework, env=REDELIVERY_ENV)
            # Sent only now: a message the killed worker had just popped off a Redis list, but
            # not yet recorded as unacknowledged, would be lost with it (kombu's Redis transport).
            followers = [chaos.send(framework, "probe", TENANT) for _ in range(2)]

            # Then the task is redelivered, admitted once the lease is over, and completes once
            jobs = [held, *followers]
            chaos.wait_finished(jobs, 45, "the redelivered probe and the followers to complete")
            chaos.wait_until(
                lambda: store.status(KEY).breaker == "closed" and store.status(KEY).in_flight == 0,
                10,
                "the breaker to close and the leases to be given back",
            )
            [holding] = chaos.records("holding")
            key_runs = chaos.runs(jobs)
            runs = chaos.runs([held])
            starts = [s for s in chaos.records("starts") if s["job"] == held.job]
            ledger = chaos.ledger(f"worker SIGKILLed holding probe+lease (acks_late), {framework}")
            ledger.notes = {
                "held_body_started": len(starts),
                "admitted_again_after_s": round(starts[-1]["t"] - holding["t"], 2),
                "lease_s": PROBE_LEASE,
            }
            record_property("ledger", ledger.as_dict())
            crashes = [c for c in chaos.crashes() if "worker 0 " not in c]  # worker 0 is the one we killed
        finally:
            store.close()
            chaos.close()

    assert len(runs) == 1, runs
    assert len(starts) == 2, "the killed delivery and the redelivered one"
    assert runs[0]["t"] > killed_at
    lease_end = starts[0]["admitted_at"] + PROBE_LEASE  # the store's clock, which leases run on
    assert starts[-1]["admitted_at"] >= lease_end - 0.001, "admitted before the dead worker's lease ended"
    others = [r["admitted_at"] for r in key_runs if r["job"] != held.job]
    assert min(others) >= lease_end - 0.001, (
        "a task of the key was admitted while the dead worker's lease held"
    )
    outcome = (ledger.ran, ledger.lost, ledger.duplicates, ledger.failed, ledger.dead_lettered)
    assert outcome == (3, 0, 0, 0, 0), ledger
    assert ledger.redelivered == 1, "only the killed delivery may run again (the broker's at-least-once)"
    assert crashes == []
