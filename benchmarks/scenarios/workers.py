"""Starting and stopping real worker processes, each command in a process group of its own.

Every group is registered until it is stopped, and :func:`stop_all` (called at exit and on
SIGTERM/SIGINT by the harness) kills whatever is left, so no worker outlives a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .recorder import SPEC_ENV, WorkerSpec

__all__ = ["BENCH", "WorkerGroup", "stop_all"]

BENCH = Path(__file__).resolve().parents[1]
_LIVE: set[WorkerGroup] = set()


class WorkerGroup:
    """The worker processes of one scenario variant.

    Celery: one ``celery worker --pool=prefork -c N`` (one consumer, so ``rate_limit``, which
    Celery enforces per worker instance, covers all N processes: the baseline's best case).
    Dramatiq: one ``dramatiq --processes N --threads T`` (one consumer per process).
    """

    def __init__(self, spec: WorkerSpec, processes: int, threads: int, log: Path) -> None:
        self.spec = spec
        self.processes = processes
        self.threads = threads
        self.log = log
        self._popen: list[subprocess.Popen[bytes]] = []

    @property
    def expected_ready(self) -> int:
        """How many ``ready`` events mean every process is up (Celery: its main process)."""
        return 1 if self.spec.framework == "celery" else self.processes

    def _commands(self) -> list[list[str]]:
        if self.spec.framework == "celery":
            return [
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "scenarios.celery_app",
                    "worker",
                    "--pool=prefork",
                    "-c",
                    str(self.processes),
                    "-Q",
                    self.spec.queue,
                    "-n",
                    f"{self.spec.queue}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel=WARNING",
                ]
            ]
        return [
            [
                sys.executable,
                "-m",
                "dramatiq",
                "scenarios.dramatiq_app:broker",
                "--processes",
                str(self.processes),
                "--threads",
                str(self.threads),
                "--queues",
                self.spec.queue,
            ]
        ]

    def start(self) -> None:
        env = {
            **os.environ,
            SPEC_ENV: self.spec.to_env(),
            "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p),
        }
        _LIVE.add(self)
        with self.log.open("ab") as out:
            for command in self._commands():
                self._popen.append(
                    subprocess.Popen(
                        command,
                        cwd=BENCH,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own process group: killed as a whole
                    )
                )

    def exited(self) -> list[int]:
        """Exit codes of the commands that already ended (a worker should never end by itself)."""
        return [code for p in self._popen if (code := p.poll()) is not None]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every process group, then SIGKILL to what is still there after ``grace``."""
        for process in self._popen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self._popen:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        for process in self._popen:
            # The group may outlive its leader (forked children): kill it whatever the leader did.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self._popen.clear()
        _LIVE.discard(self)


def stop_all() -> None:
    for group in list(_LIVE):
        group.stop(grace=2.0)
