"""The ``limitpal-tasks`` command line, against a real Redis store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
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
