"""Helpers for the Redis-specific tests: the shared server, throwaway servers and a cluster.

This module defines no fixtures (a fixture imported into a test module reads as an unused,
then redefined, name to the linters); each test module wraps the helpers below in the few
fixtures it needs. Every test that needs the shared server calls ``require_server`` (from
``tests/conftest.py``), which skips outside CI and fails in CI; every test that starts its
own ``redis-server`` calls :func:`require_binaries`, which does the same for the binaries.

- The shared server (``LIMITPAL_REDIS_HOST``/``LIMITPAL_REDIS_PORT``, default
  ``127.0.0.1:6379``): each test module owns one database number (never 0), flushed before
  each test by :func:`fresh_db`.
- :class:`LocalRedis`: a ``redis-server`` of our own on a free loopback port, for tests
  that flush everything, pause, kill or restart the server, or count its commands.
- :func:`local_cluster`: a real three-master Redis Cluster on free loopback ports.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from limitpal_tasks import Admitted, Decision, Deferred, KeyStatus

__all__ = [
    "REDIS_HOST",
    "REDIS_PORT",
    "ClusterInfo",
    "CountingConnection",
    "LocalRedis",
    "ServerCheck",
    "decision_summary",
    "free_port",
    "fresh_db",
    "local_cluster",
    "max_overlap",
    "prefixed_keys",
    "redis_url",
    "require_binaries",
    "require_shared_server",
    "status_summary",
    "wait_until",
]

REDIS_HOST = os.environ.get("LIMITPAL_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("LIMITPAL_REDIS_PORT", "6379"))

ServerCheck = Callable[[str, str, int], None]
"""The ``require_server`` fixture of ``tests/conftest.py``: ``check(name, host, port)``."""

# Starting a process and forming a cluster take real time; these bound the waits.
_START_TIMEOUT = 10.0
_CLUSTER_TIMEOUT = 30.0


def redis_url(db: int) -> str:
    """The URL of database ``db`` of the shared server."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def require_shared_server(check: ServerCheck) -> None:
    """Skip (locally) or fail (in CI) unless the shared Redis server answers."""
    check("Redis", REDIS_HOST, REDIS_PORT)


def fresh_db(check: ServerCheck, db: int) -> str:
    """Check the shared server, empty database ``db`` and return its URL.

    Database 0 is never used: it may hold a developer's own data.
    """
    if not 1 <= db <= 15:
        raise ValueError(f"test databases are 1..15, never 0; got {db}")
    require_shared_server(check)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_url(db)


def _in_ci() -> bool:
    # The same rule as tests/conftest.py:in_ci (which is not importable from here).
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_binaries(*names: str) -> None:
    """Skip (locally) or fail (in CI) unless every binary in ``names`` is on ``PATH``."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    problem = f"{', '.join(missing)} not found on PATH"
    if _in_ci():
        pytest.fail(f"{problem}; CI must run the Redis server tests, so install redis-server", pytrace=False)
    pytest.skip(f"SKIPPED ON PURPOSE - {problem}; install Redis to run these tests")


def free_port(also_free: int | None = None) -> int:
    """A loopback TCP port nobody listens on (and, if given, ``port + also_free`` too)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if also_free is None:
            return port
        if port + also_free < 65536 and _port_is_free(port + also_free):
            return port
    raise RuntimeError("no free loopback port found")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    Only for waits on something outside the test's control that takes real time: a
    process starting, a cluster forming, Redis expiring keys.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class LocalRedis:
    """A standalone ``redis-server`` this test process started, on a free loopback port.

    It runs in the foreground of a child process we hold, so it can be paused, killed and
    started again on the same port; :meth:`stop` (or leaving :meth:`running`) removes it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        assert self._process is None, "already running"
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._alive_and_answering, _START_TIMEOUT, f"redis-server on port {self.port}")

    def _alive_and_answering(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            pytest.fail(f"redis-server on port {self.port} exited with {self._process.returncode}")
        return _answers(self.port)

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL to the process we started) and reap it."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=_START_TIMEOUT)
        self._process = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers) and reap it."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):
            self._process.terminate()
        try:
            self._process.wait(timeout=_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=_START_TIMEOUT)
        self._process = None

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[LocalRedis]:
        """A started server in a temporary directory; stopped and removed on exit."""
        require_binaries("redis-server")
        with tempfile.TemporaryDirectory(prefix="limitpal-redis-") as directory:
            server = cls(Path(directory))
            try:
                server.start()
                yield server
            finally:
                server.stop()


@dataclass(frozen=True)
class ClusterInfo:
    """A running cluster: its master ports and a URL for ``RedisStore.from_url``."""

    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port)


def _cluster_ok(ports: tuple[int, ...]) -> bool:
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
        try:
            info = cast(Any, client).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or "cluster_known_nodes:3" not in text:
                return False
        except redis.RedisError:
            return False
        finally:
            client.close()
    return True


def _stop_daemons(ports: list[int], directory: Path) -> None:
    """Stop the daemonized nodes we started: SIGTERM by pidfile, SIGKILL if one lingers.

    A node removes its pidfile as it exits (its process is not our child, so it cannot be
    waited for).
    """
    pids: dict[Path, int] = {}
    for port in ports:
        pidfile = directory / f"redis-{port}.pid"
        with suppress(OSError, ValueError):
            pids[pidfile] = int(pidfile.read_text().strip())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids.values():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + _START_TIMEOUT / 2
        while time.monotonic() < deadline and any(pidfile.exists() for pidfile in pids):
            time.sleep(0.02)
        if not any(pidfile.exists() for pidfile in pids):
            return


@contextmanager
def local_cluster(masters: int = 3) -> Iterator[ClusterInfo]:
    """Start ``masters`` cluster-enabled servers on free loopback ports and join them.

    Each node runs daemonized in a temporary directory; on exit every node is shut down
    and the directory removed.
    """
    require_binaries("redis-server", "redis-cli")
    with tempfile.TemporaryDirectory(prefix="limitpal-cluster-") as name:
        directory = Path(name)
        ports: list[int] = []
        while len(ports) < masters:
            port = free_port(also_free=10_000)  # the cluster bus listens on port + 10000
            if port not in ports and port + 10_000 not in ports:
                ports.append(port)
        try:
            for port in ports:
                subprocess.run(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--daemonize",
                        "yes",
                        "--bind",
                        "127.0.0.1",
                        "--dir",
                        str(directory),
                        "--pidfile",
                        str(directory / f"redis-{port}.pid"),
                        "--logfile",
                        str(directory / f"redis-{port}.log"),
                    ],
                    check=True,
                    timeout=_START_TIMEOUT,
                    stdout=subprocess.DEVNULL,
                )
            for port in ports:
                wait_until(functools.partial(_answers, port), _START_TIMEOUT, f"cluster node {port}")
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                timeout=_CLUSTER_TIMEOUT,
                stdout=subprocess.DEVNULL,
            )
            frozen = tuple(ports)
            wait_until(lambda: _cluster_ok(frozen), _CLUSTER_TIMEOUT, "cluster_state:ok on every node")
            yield ClusterInfo(frozen)
        finally:
            _stop_daemons(ports, directory)


class CountingConnection(redis.Connection):
    """A connection that counts what it sends and every attempt to open a socket.

    The counts are class-wide; subclass it per test (``type(...)``) or call :meth:`reset`.
    """

    sent = 0
    connects = 0

    @classmethod
    def reset(cls) -> None:
        cls.sent = 0
        cls.connects = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        cast(Any, super()).send_packed_command(command, check_health)

    def _connect(self) -> socket.socket:
        type(self).connects += 1
        sock: socket.socket = cast(Any, super())._connect()
        return sock


def prefixed_keys(client: redis.Redis, prefix: str) -> list[str]:
    """Every key under ``prefix:`` in the client's database."""
    return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000))


def decision_summary(decision: Decision) -> tuple[object, ...]:
    """What two stores must agree on about a decision (ticket ids are per store)."""
    if isinstance(decision, Admitted):
        ticket = decision.ticket
        return (
            "admitted",
            ticket.generations,
            ticket.probe,
            ticket.admitted_at,
            ticket.fallback,
            decision.transitions,
        )
    assert isinstance(decision, Deferred)
    return (
        "deferred",
        decision.reason,
        decision.delay,
        dict(decision.reservations),
        decision.exhausted,
        decision.deferrals,
        decision.first_seen,
        decision.transitions,
    )


def status_summary(status: KeyStatus) -> KeyStatus:
    """A status with its rates as a plain dict, so two stores' snapshots compare equal."""
    return KeyStatus(
        status.key,
        status.breaker,
        status.generation,
        status.open_until,
        status.calls,
        status.failures,
        status.slow_calls,
        status.in_flight,
        status.probes_in_flight,
        status.paused_until,
        status.pause_reason,
        dict(status.rates),
    )


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals ``[start, end)`` open at one instant (an end before a start on ties)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak
