"""The ``limitpal-tasks`` command line, against a real Redis store."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner

from limitpal_tasks import Breaker, DeadLetter, Outcome, Pipeline, Policy, RateLimit, TaskContext
from limitpal_tasks.cli import main
from limitpal_tasks.stores.redis import RedisStore

pytestmark = pytest.mark.redis

URL = "redis://127.0.0.1:6379/7"
PREFIX = "cli-test"


@pytest.fixture
def store(require_server: Callable[[str, str, int], None]) -> Iterator[RedisStore]:
    require_server("redis", "127.0.0.1", 6379)
    store = RedisStore.from_url(URL, prefix=PREFIX)
    store.client.flushdb()
    yield store
    store.client.flushdb()
    store.close()


def run(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--store", URL, "--prefix", PREFIX])
    assert result.exit_code == 0, result.output
    return result.output


def test_trip_forces_the_breaker_open_and_reset_closes_it(store: RedisStore) -> None:
    """``trip`` puts the key's breaker in forced_open for every worker; ``reset`` closes it."""
    run("trip", "service:stripe")
    assert store.status("service:stripe").breaker == "forced_open"
    assert run("status", "service:stripe").splitlines()[1].split()[:3] == [
        "-",
        "service:stripe",
        "forced_open",
    ]

    run("reset", "service:stripe")
    assert store.status("service:stripe").breaker == "closed"


def test_pause_and_resume_a_key(store: RedisStore) -> None:
    """``pause KEY --for 10m`` pauses the key fleet-wide until ``resume``."""
    run("pause", "tenant:acme", "--for", "10m")
    status = store.status("tenant:acme")
    assert status.pause_reason == "operator"
    assert status.paused_until is not None
    assert 590 < status.paused_until - time.time() <= 600.5

    run("resume", "tenant:acme")
    assert store.status("tenant:acme").paused_until is None


def test_dead_list_and_show(store: RedisStore) -> None:
    """``dead list`` shows one line per entry and ``dead show`` the whole entry."""
    store.put_dead(
        DeadLetter(
            id="abc",
            task_name="proj.charge",
            reason="max_attempts",
            policy="payments",
            key="tenant:acme",
            args=(1,),
            dead_at=time.time(),
        )
    )
    listing = run("dead", "list")
    assert tuple(w for w in ("abc", "max_attempts", "proj.charge") if w in listing) == (
        "abc",
        "max_attempts",
        "proj.charge",
    )
    assert '"task_name": "proj.charge"' in run("dead", "show", "abc")


def test_a_bad_duration_names_the_option() -> None:
    """A duration that does not parse is rejected, naming --for and the value."""
    result = CliRunner().invoke(main, ["pause", "k", "--for", "soon", "--store", "memory://"])
    assert result.exit_code != 0
    assert "--for" in result.output
    assert "soon" in result.output


def test_dead_replay_publishes_a_celery_task_once(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dead replay`` re-publishes the task through the app's broker (real Redis), and only once."""
    app = Celery("cli-replay", broker=URL)
    app.conf.task_default_queue = "cli-replay"
    module = types.ModuleType("limitpal_cli_replay_app")
    module.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    store.put_dead(
        DeadLetter(
            id="r1",
            task_name="proj.charge",
            reason="max_attempts",
            policy="payments",
            key="tenant:acme",
            args=("acme", 5),
            kwargs={"note": "x"},
            dead_at=time.time(),
        )
    )

    output = run("dead", "replay", "r1", "--celery-app", "limitpal_cli_replay_app:app")
    again = CliRunner().invoke(
        main,
        [
            "dead",
            "replay",
            "r1",
            "--celery-app",
            "limitpal_cli_replay_app:app",
            "--store",
            URL,
            "--prefix",
            PREFIX,
        ],
    )

    assert "replayed proj.charge r1" in output
    assert again.exit_code != 0
    assert "already replayed" in again.output
    queued = store.client.lrange("cli-replay", 0, -1)
    assert len(queued) == 1, "published exactly once"
    message = json.loads(queued[0])
    assert message["headers"]["task"] == "proj.charge"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == (["acme", 5], {"note": "x"})


# -- status, override, purge, Dramatiq replay ----------------------------------------------

POLICY = Policy(
    "payments",
    key="tenant:{tenant_id}",
    breaker=Breaker(minimum_calls=3, window=5, open_for=60, key="service:stripe"),
    rate=RateLimit("20/s", burst=5),
)


def traffic(store: RedisStore, tenant: str, runs: int, outcome: Outcome) -> None:
    """``runs`` executions of ``tenant`` through a real pipeline on the store, each recorded."""
    pipeline = Pipeline(store)
    for _ in range(runs):
        decision = pipeline.admit(POLICY, TaskContext("charge", kwargs={"tenant_id": tenant}))
        if decision.admitted:
            pipeline.record(decision.ticket, outcome)
    store.flush()


def test_status_without_keys_finds_every_key_and_lists_open_breakers_first(store: RedisStore) -> None:
    """With no KEYS, status SCANs the prefix: a table with the open breaker on the first row."""
    traffic(store, "acme", 2, Outcome.success())
    traffic(store, "initech", 3, Outcome.failure())  # opens the service's breaker
    store.pause("tenant:globex", 600, "operator")

    lines = run("status").splitlines()

    assert lines[0].split()[:3] == ["POLICY", "KEY", "BREAKER"]
    assert lines[1].split()[:3] == ["payments", "service:stripe", "open"]
    assert re.search(r"in (59|60)\.\ds", lines[1]), "open until, relative to the store's clock"
    keys = sorted(line.split()[1] for line in lines[1:])
    assert keys == ["service:stripe", "tenant:acme", "tenant:globex", "tenant:initech"]
    assert "operator" in next(line for line in lines if "tenant:globex" in line)


def test_status_filters_by_policy_and_pattern(store: RedisStore) -> None:
    """--policy keeps the keys that policy used last; --match keeps keys matching a glob."""
    traffic(store, "acme", 1, Outcome.success())
    store.pause("other:1", 60, "operator")  # no policy has used it

    by_policy = [line.split()[1] for line in run("status", "--policy", "payments").splitlines()[1:]]
    by_match = [line.split()[1] for line in run("status", "--match", "other:*").splitlines()[1:]]

    assert sorted(by_policy) == ["service:stripe", "tenant:acme"]
    assert by_match == ["other:1"]


def test_status_json_gives_the_numbers(store: RedisStore) -> None:
    """--json: per key the breaker, the failure rate, and per limit the tokens left."""
    traffic(store, "acme", 2, Outcome.failure())

    (service, tenant) = sorted(json.loads(run("status", "--json")), key=lambda s: s["key"])

    assert (service["key"], service["breaker"], service["failure_rate"]) == ("service:stripe", "closed", 1.0)
    assert (service["calls"], service["failures"], service["policy"]) == (2, 2, "payments")
    (limit,) = tenant["rates"].values()
    assert limit["limit"] == "20/s burst 5"
    assert 3 <= limit["tokens"] <= 5  # 2 taken, refilled at 20/s meanwhile
    assert limit["booked_ahead"] == 0


def test_status_watch_refreshes(store: RedisStore) -> None:
    """--watch prints the table again every interval (here twice, then stops)."""
    store.pause("tenant:acme", 60, "operator")
    output = run("status", "--watch", "0.01", "--times", "2")
    assert output.count("tenant:acme") == 2


def test_override_changes_a_tenants_rate_until_cleared(store: RedisStore) -> None:
    """override KEY RATE --for: status shows it, workers run at it; --clear lifts it."""
    traffic(store, "acme", 1, Outcome.success())
    limit_id = POLICY.rates[0].slot_id

    assert "now runs at 2/s burst 1, for 600s" in run("override", "tenant:acme", "2/s", "--for", "10m")
    override = store.status("tenant:acme").overrides[limit_id]
    assert str(override) == "2/s burst 1"
    assert override.until is not None
    assert 590 < override.until - time.time() <= 600.5
    assert "2/s burst 1 (override)" in run("status", "tenant:acme")

    run("override", "tenant:acme", "--clear")
    assert store.status("tenant:acme").overrides == {}


def test_override_permanent_has_no_end(store: RedisStore) -> None:
    """--permanent keeps the override until --clear, and keeps the key from expiring."""
    traffic(store, "acme", 1, Outcome.success())
    run("override", "tenant:acme", "50/m", "--burst", "3", "--permanent")
    override = next(iter(store.status("tenant:acme").overrides.values()))
    assert (str(override), override.until) == ("50/60s burst 3", None)
    assert store.client.ttl(f"{PREFIX}:{{tenant:acme}}:s") == -1, "no TTL while permanent"

    run("override", "tenant:acme", "--clear")
    assert store.client.ttl(f"{PREFIX}:{{tenant:acme}}:s") > 0, "expires again once lifted"


def test_override_asks_which_limit_when_it_cannot_tell(store: RedisStore) -> None:
    """A key no task has used yet has no known limit: override asks for --limit, naming the key."""
    result = CliRunner().invoke(main, ["override", "tenant:new", "5/s", "--store", URL, "--prefix", PREFIX])
    assert result.exit_code == 2
    assert "tenant:new" in result.output
    assert "--limit" in result.output

    run("override", "tenant:new", "5/s", "--limit", "20/1/5")
    assert "20/1/5" in store.status("tenant:new").overrides


def test_override_rejects_a_bad_rate_naming_it(store: RedisStore) -> None:
    """A rate that does not parse is rejected with its value."""
    result = CliRunner().invoke(main, ["override", "tenant:a", "fast", "--store", URL, "--prefix", PREFIX])
    assert result.exit_code == 2
    assert "fast" in result.output


def test_dead_purge_deletes_every_letter(store: RedisStore) -> None:
    """dead purge --yes empties the dead letter; without --yes it asks first."""
    for n in range(2):
        store.put_dead(DeadLetter(id=f"p{n}", task_name="t", reason="max_attempts", dead_at=time.time()))
    declined = CliRunner().invoke(main, ["dead", "purge", "--store", URL, "--prefix", PREFIX], input="n\n")
    assert declined.exit_code == 1
    assert len(store.list_dead()) == 2

    assert "deleted 2 dead letters" in run("dead", "purge", "--yes")
    assert store.list_dead() == []


def test_dead_replay_runs_a_dramatiq_message_once(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """dead replay --dramatiq-broker: a worker on a real Redis broker runs it once, counters reset."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=URL, namespace="cli-replay")  # type: ignore[no-untyped-call]
    calls: list[tuple[tuple[object, ...], dict[str, object], dict[str, object]]] = []

    class Capture(dramatiq.Middleware):
        def before_process_message(self, broker: Any, message: Any) -> None:
            calls.append((tuple(message.args), dict(message.kwargs), dict(message.options)))

    broker.add_middleware(Capture())
    dramatiq.actor(broker=broker, actor_name="proj.notify", queue_name="cli-replay")(lambda *a, **k: None)
    module = types.ModuleType("limitpal_cli_replay_actors")
    module.broker = broker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    store.put_dead(
        DeadLetter(
            id="d1",
            task_name="proj.notify",
            reason="max_deferrals",
            args=("acme",),
            kwargs={"n": 2},
            headers={"retries": 4, "max_retries": 4, "priority": 3},
            dead_at=time.time(),
        )
    )

    output = run("dead", "replay", "d1", "--dramatiq-broker", "limitpal_cli_replay_actors")
    again = CliRunner().invoke(
        main,
        [
            "dead",
            "replay",
            "d1",
            "--dramatiq-broker",
            "limitpal_cli_replay_actors",
            "--store",
            URL,
            "--prefix",
            PREFIX,
        ],
    )
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        broker.join("cli-replay", timeout=10_000)
        worker.join()
    finally:
        worker.stop()

    assert "replayed proj.notify d1" in output
    assert again.exit_code != 0
    assert [(args, kwargs) for args, kwargs, _ in calls] == [(("acme",), {"n": 2})], "ran exactly once"
    options = calls[0][2]
    assert options.get("retries", 0) == 0
    assert "max_retries" not in options
    assert options["priority"] == 3


def test_the_installed_command_runs_in_a_subprocess(store: RedisStore) -> None:
    """The console script works as users run it, reading the store from LIMITPAL_STORE_URL."""
    store.pause("tenant:acme", 60, "operator")
    env = {**os.environ, "LIMITPAL_STORE_URL": URL, "LIMITPAL_KEY_PREFIX": PREFIX}
    script = Path(sys.executable).with_name("limitpal-tasks")
    result = subprocess.run(
        [str(script), "status", "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    (status,) = json.loads(result.stdout)
    assert (status["key"], status["pause_reason"]) == ("tenant:acme", "operator")


def test_celery_limitpal_subcommand_uses_the_apps_store(store: RedisStore, tmp_path: Path) -> None:
    """``celery -A proj limitpal status`` reads the store URL and prefix from the app's settings."""
    store.pause("tenant:acme", 60, "operator")
    (tmp_path / "limitpal_cli_proj.py").write_text(
        "from celery import Celery\n"
        "app = Celery('proj', broker='memory://')\n"
        f"app.conf.limitpal_store_url = {URL!r}\n"
        f"app.conf.limitpal_key_prefix = {PREFIX!r}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIMITPAL_")}
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("celery")),
            "-A",
            "limitpal_cli_proj",
            "limitpal",
            "status",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (status,) = json.loads(result.stdout)
    assert (status["key"], status["pause_reason"]) == ("tenant:acme", "operator")


def test_status_shows_an_adaptive_rate_and_its_last_change(store: RedisStore) -> None:
    """An adaptive limit's learned rate and its last change appear in the table and the JSON."""
    from limitpal_tasks import AdaptiveRate

    partner = Policy(
        "partner",
        key="partner:{name}",
        rate=RateLimit("100/s", adaptive=AdaptiveRate(floor="10/s", ceiling="200/s")),
    )
    pipeline = Pipeline(store)
    decision = pipeline.admit(partner, TaskContext("call", kwargs={"name": "acme"}))
    assert decision.admitted
    pipeline.record(decision.ticket, Outcome.failure(overload=True))

    row = run("status", "partner:acme").splitlines()[1]
    (status,) = json.loads(run("status", "partner:acme", "--json"))

    assert "adaptive 50/s burst 1 (was 100/s 0s ago)" in row
    (limit,) = status["rates"].values()
    assert (limit["adaptive"]["rate"], limit["adaptive"]["previous"]) == (50.0, 100.0)


def test_parked_list_release_and_purge(store: RedisStore) -> None:
    """parked list shows counts per key and the next due time; release makes them due; purge deletes."""
    from limitpal_tasks.core.parking import ParkedEntry

    for n, delay in enumerate([300.0, 60.0]):
        store.park(
            ParkedEntry("celery", "proj.charge", "payments", "tenant:acme", delay, 0.1, {"n": n}), limit=10
        )
    store.park(ParkedEntry("dramatiq", "notify", "hooks", "tenant:globex", 30.0, 0.0, {}), limit=10)

    listing = run("parked", "list").splitlines()
    (as_json,) = [r for r in json.loads(run("parked", "list", "--json")) if r["key"] == "tenant:acme"]

    assert listing[0].split() == ["PARK", "KEY", "PARKED", "NEXT", "DUE"]
    assert listing[1].split()[:3] == ["celery", "tenant:acme", "2"]
    assert re.search(r"in (59|60)\.\ds", listing[1])
    assert listing[2].split()[:3] == ["dramatiq", "tenant:globex", "1"]
    assert as_json["count"] == 2
    assert "tenant:acme: 2 parked tasks due now" in run("parked", "release", "tenant:acme")
    assert len(store.take_parked("celery", 10, 30.0)) == 1, "due now, paced at the key's interval"
    assert "deleted 3 parked tasks" in run("parked", "purge", "--yes")
    assert "nothing parked" in run("parked", "list")
