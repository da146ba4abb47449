"""The ``limitpal-tasks`` command line, against a real Redis store."""

from __future__ import annotations

import base64
import json
import sys
import time
import types
from collections.abc import Callable, Iterator

import pytest
from celery import Celery
from click.testing import CliRunner

from limitpal_tasks import DeadLetter
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
    assert "breaker forced_open" in run("status", "service:stripe")

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
