"""Servers the chaos tests own: ``redis-server`` and RabbitMQ nodes on loopback ports 7100-7199.

Nothing here touches the shared servers (Redis on 6379, RabbitMQ on 5672): every server is
a child process this test process started, in a temporary directory, on a port of the
chaos range, so it can be killed, frozen (``SIGSTOP``), flushed and restarted on the same
port without disturbing anyone. A missing binary skips the test loudly locally and fails
it in CI (:func:`require_binaries`, the rule of ``tests/conftest.py:require_server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import redis

__all__ = [
    "CHAOS_PORTS",
    "RabbitNode",
    "RedisServer",
    "chaos_port",
    "in_ci",
    "release_port",
    "require_binaries",
    "wait_for",
]

CHAOS_PORTS = range(7100, 7200)
"""The loopback ports the chaos suite may listen on (and nothing else)."""

_START_TIMEOUT = 15.0
_RABBIT_START_TIMEOUT = 90.0
_taken: set[int] = set()
_taken_lock = threading.Lock()


def in_ci() -> bool:
    """Whether the tests run in CI (the rule of ``tests/conftest.py:in_ci``, not importable here)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_binaries(*names: str) -> None:
    """Skip (locally, loudly) or fail (in CI) unless every binary in ``names`` is on ``PATH``."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    problem = f"{', '.join(missing)} not found on PATH"
    if in_ci():
        pytest.fail(f"{problem}; CI must run the chaos tests, so install it in .ci/run", pytrace=False)
    pytest.skip(f"SKIPPED ON PURPOSE - {problem}; install it to run the chaos tests")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def chaos_port() -> int:
    """A port of :data:`CHAOS_PORTS` that nobody listens on and this process has not handed out."""
    with _taken_lock:
        for port in CHAOS_PORTS:
            if port not in _taken and _bindable(port):
                _taken.add(port)
                return port
    problem = f"no free loopback port in {CHAOS_PORTS.start}-{CHAOS_PORTS.stop - 1}"
    if in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(f"SKIPPED ON PURPOSE - {problem}; stop what listens there to run the chaos tests")


def release_port(port: int) -> None:
    """Give ``port`` back to :func:`chaos_port` (its server is gone)."""
    with _taken_lock:
        _taken.discard(port)


def _answers(port: int, **options: Any) -> bool:
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5, **options
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisServer:
    """A ``redis-server`` child process on a chaos port, in a directory of its own.

    ``persistent=True`` turns on the append-only file with an fsync per write, so a
    SIGKILL loses nothing (a broker that is restarted keeps its queues); otherwise a
    restart starts empty, as a crashed cache would. ``extra`` adds server arguments.
    """

    def __init__(self, directory: Path, *, persistent: bool = False, extra: Sequence[str] = ()) -> None:
        self.directory = directory
        self.port = chaos_port()
        self.persistent = persistent
        self.extra = tuple(extra)
        self.log = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, **options: Any) -> redis.Redis:
        """A client of the default user (the test's own, for setup and inspection)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (again, on the same port, with the same data directory) and wait for it."""
        assert self._process is None, "already running"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else []
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *persistence,
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log),
            *self.extra,
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._up, _START_TIMEOUT, f"redis-server on port {self.port}")

    def _up(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            pytest.fail(f"redis-server on port {self.port} exited with {self._process.returncode}")
        return _answers(self.port)

    def kill(self) -> None:
        """SIGKILL: the server disappears at once, connections reset, unsaved data gone."""
        if self._process is None:
            return
        if self._frozen:
            self.thaw()
        with suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=_START_TIMEOUT)
        self._process = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a stalled host)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT: a frozen server goes on where it stopped."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._frozen = False

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it lingers), and reap it."""
        if self._process is None:
            return
        if self._frozen:
            self.thaw()
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
    def running_server(cls, *, persistent: bool = False, extra: Sequence[str] = ()) -> Iterator[RedisServer]:
        """A started server in a temporary directory; stopped, its port released, on exit."""
        require_binaries("redis-server")
        with tempfile.TemporaryDirectory(prefix="limitpal-chaos-redis-") as directory:
            server = cls(Path(directory), persistent=persistent, extra=extra)
            try:
                server.start()
                yield server
            finally:
                server.stop()
                release_port(server.port)


def _rabbitmq_script() -> str | None:
    """The ``rabbitmq-server`` script that runs the node as the calling user.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the ``rabbitmq``
    user when called as root, which then cannot write our temporary directory; the script
    it wraps does not switch.
    """
    unwrapped = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if unwrapped.exists():
        return str(unwrapped)
    return shutil.which("rabbitmq-server")


class RabbitNode:
    """A RabbitMQ node of our own: its own name, ports, database, logs and Erlang cookie.

    The node registers with the host's ``epmd`` like any Erlang node (starting one if none
    runs) and shares nothing else with the shared RabbitMQ: its database and logs live in a
    temporary directory, its configuration file replaces the system one, no plugin is
    enabled, and it listens on two chaos ports (AMQP and Erlang distribution).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = chaos_port()
        self.dist_port = chaos_port()
        self.name = f"limitpal-chaos-{self.port}@localhost"
        self.log = directory / "rabbitmq.out"
        self._process: subprocess.Popen[bytes] | None = None
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (directory / "rabbitmq-env.conf").write_text("")
        (directory / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"  # vhost "/" for kombu and pika alike

    def _env(self) -> dict[str, str]:
        d = self.directory
        return {
            **os.environ,
            "HOME": str(d),  # the Erlang cookie is created here, not in the user's home
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        """Start the node (again, with the same database) and wait until AMQP clients connect."""
        assert self._process is None, "already running"
        script = _rabbitmq_script()
        assert script is not None
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                [script], env=self._env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(self._up, _RABBIT_START_TIMEOUT, f"RabbitMQ node {self.name}", interval=0.1)

    def _up(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            pytest.fail(f"RabbitMQ node {self.name} exited with {self._process.returncode}:\n{tail}")
        import pika  # type: ignore[import-untyped]  # pika ships no type information

        try:
            connection = pika.BlockingConnection(
                pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{self.port}/%2F?connection_attempts=1")
            )
        except pika.exceptions.AMQPError:
            return False
        connection.close()
        return True

    def kill(self) -> None:
        """SIGKILL to the node's process group: the broker vanishes mid-conversation."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=_START_TIMEOUT)
        self._process = None

    def stop(self) -> None:
        """SIGTERM to the node (a clean shutdown), SIGKILL to its group if it lingers."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=_START_TIMEOUT)
        self._process = None

    @classmethod
    @contextmanager
    def running_node(cls) -> Iterator[RabbitNode]:
        """A started node in a temporary directory; stopped, its ports released, on exit."""
        require_binaries("rabbitmq-server", "erl")
        with tempfile.TemporaryDirectory(prefix="limitpal-chaos-rabbitmq-") as directory:
            node = cls(Path(directory))
            try:
                node.start()
                yield node
            finally:
                node.stop()
                release_port(node.port)
                release_port(node.dist_port)
