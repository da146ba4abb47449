"""Every script of ``examples/`` runs end to end and reports success.

Each example is run as a user runs it — ``python examples/<script>`` in a fresh process —
against the local Redis (db 0, the examples' database, under a namespace of the test's
own that is deleted afterwards), and its output is checked for the success lines. The
payments examples run twice: all in one command, and piece by piece as
``docker-compose.yml`` runs them (upstream, workers and producer as separate processes,
Celery on RabbitMQ).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
RUN_TIMEOUT = 90.0

ServerCheck = Callable[[str, str, int], None]

SUCCESS = re.compile(
    r"^OK: 84 charges applied exactly once, 84 webhooks delivered, 0 dead letters, in [\d.]+s", re.M
)


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python examples/<script> <args>``, as a user would run it, from the repository root."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=RUN_TIMEOUT,
        check=False,
    )


def _output(completed: subprocess.CompletedProcess[str]) -> str:
    stderr = completed.stderr[-3000:]
    return f"exit {completed.returncode}\n--- stdout\n{completed.stdout}\n--- stderr\n{stderr}"


@contextmanager
def namespace(prefix: str) -> Iterator[str]:
    """A namespace of this test's own; every Redis key under it is deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_engine_tour_shows_the_flood_waiting_and_the_breaker_recovering() -> None:
    """The engine tour (no server) ends with the breaker closed and every tenant served."""
    completed = run("engine_tour.py")
    assert completed.returncode == 0, _output(completed)
    assert "breaker now closed" in completed.stdout
    for tenant in ("noisy", "quiet-a", "quiet-b"):
        assert re.search(rf"^{tenant}\s+p95 wait .*succeeded=\d+", completed.stdout, re.M), tenant


@pytest.mark.parametrize("script", ["celery_payments.py", "dramatiq_payments.py", "payments_upstream.py"])
def test_payments_scripts_explain_themselves(script: str) -> None:
    """``--help`` works without any server and names the commands and options."""
    completed = run(script, "--help")
    assert completed.returncode == 0, _output(completed)
    assert "--port" in completed.stdout if script == "payments_upstream.py" else "worker" in completed.stdout


@pytest.mark.redis
@pytest.mark.dramatiq
def test_dramatiq_app_runs_both_tenants(require_server: ServerCheck) -> None:
    """The small Dramatiq app runs every message of both tenants."""
    require_server("redis", "127.0.0.1", 6379)
    completed = run("dramatiq_app.py")
    assert completed.returncode == 0, _output(completed)
    assert re.search(r"^noisy\s+ran 30 times", completed.stdout, re.M), _output(completed)
    assert re.search(r"^quiet\s+ran\s+5 times", completed.stdout, re.M), _output(completed)


def _assert_payments_report(stdout: str) -> None:
    assert SUCCESS.search(stdout), stdout
    assert "the payments API goes down" in stdout
    assert re.search(r"^breaker:.*service:payments closed->open: \d", stdout, re.M), stdout
    assert re.search(r"^dead-lettered:\s+none$", stdout, re.M), stdout
    for tenant, charges in (("acme", 60), ("globex", 12), ("initech", 12)):
        assert re.search(rf"^{tenant}\s+{charges}\s+{charges}\s", stdout, re.M), tenant


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        pytest.param("celery_payments.py", marks=pytest.mark.celery),
        pytest.param("dramatiq_payments.py", marks=pytest.mark.dramatiq),
    ],
)
def test_payments_example_in_one_command(script: str, require_server: ServerCheck) -> None:
    """``python examples/<framework>_payments.py``: upstream, two workers and producer; every
    charge applied once, every webhook delivered, nothing dead-lettered, exit 0."""
    require_server("redis", "127.0.0.1", 6379)
    with namespace("examples-test") as name:
        completed = run(script, "--namespace", name, "--timeout", "60")
    assert completed.returncode == 0, _output(completed)
    _assert_payments_report(completed.stdout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(args: Sequence[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _delete_queue(url: str, queue: str) -> None:
    from kombu.connection import Connection

    with Connection(url) as connection:  # type: ignore[no-untyped-call]  # kombu is untyped
        connection.default_channel.queue_delete(queue)


@pytest.mark.redis
@pytest.mark.rabbitmq
@pytest.mark.celery
@pytest.mark.dramatiq
@pytest.mark.slow
def test_payments_examples_piece_by_piece_as_compose_runs_them(require_server: ServerCheck) -> None:
    """The docker-compose commands: one upstream, a Celery worker on RabbitMQ and a Dramatiq
    worker on Redis, then the producer of each; both report success."""
    require_server("redis", "127.0.0.1", 6379)
    require_server("rabbitmq", "127.0.0.1", 5672)
    port = _free_port()
    with namespace("examples-celery") as celery_ns, namespace("examples-dramatiq") as dramatiq_ns:
        env = {"LIMITPAL_STORE_URL": REDIS_URL, "UPSTREAM_URL": f"http://127.0.0.1:{port}"}
        celery = ["--broker", RABBITMQ_URL, "--namespace", celery_ns]
        dramatiq = ["--broker", REDIS_URL, "--namespace", dramatiq_ns]
        upstream = ["examples/payments_upstream.py", "--port", str(port)]
        try:
            with (
                _process(upstream, env),
                _process(["examples/celery_payments.py", "worker", *celery], env),
                _process(["examples/dramatiq_payments.py", "worker", *dramatiq], env),
            ):
                produced = [
                    run("celery_payments.py", "produce", *celery, env=env),
                    run("dramatiq_payments.py", "produce", *dramatiq, env=env),
                ]
        finally:
            _delete_queue(RABBITMQ_URL, celery_ns)
    for completed in produced:
        assert completed.returncode == 0, _output(completed)
        _assert_payments_report(completed.stdout)
