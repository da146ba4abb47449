"""What every process records, and the settings a worker process is started with.

Each process (the harness and every worker process) appends JSON lines to a file of its
own under the run's folder, one line per event, flushed at once, so a killed worker loses
nothing it recorded. Events: ``ready`` (a worker process is up), ``enq`` (the harness
published a task), ``start``/``end`` (the task body ran; ``o`` is its outcome),
``defer`` (limitpal deferred it: ``r`` reason, ``d`` delay, ``x`` the bound exhausted),
``limited`` (a baseline's rate limiter refused it: a retry spent), ``retry`` (the framework
scheduled a retry after a failure), ``ok``/``fail`` (final: succeeded, or failed for good),
``tr`` (a breaker transition, from limitpal's hooks).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["CELERY_TASK", "DRAMATIQ_ACTOR", "SPEC_ENV", "EventTail", "Recorder", "WorkerSpec"]

SPEC_ENV = "SCENARIO_WORKER_SPEC"
CELERY_TASK = "scenario.call"
DRAMATIQ_ACTOR = "scenario_call"


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker process sets itself up (passed as JSON in ``SCENARIO_WORKER_SPEC``)."""

    framework: str  # "celery" | "dramatiq"
    variant: str  # "limitpal" | "baseline"
    queue: str
    events_dir: str
    broker_url: str
    store_url: str
    key_prefix: str
    upstream_prefix: str | None  # None: no-op tasks that call nothing
    policy: dict[str, Any] | None  # limitpal: Policy.from_dict data
    rate: float | None  # baseline: Celery's per-instance rate_limit, or Dramatiq's per-tenant bucket
    max_retries: int
    backoff: float  # seconds: Celery's retry_backoff, Dramatiq's min_backoff
    backoff_max: float  # seconds
    label: str | None = None  # the variant's name when a scenario runs several limitpal policies
    on_429: str = "cooldown"  # limitpal: a 429 becomes Cooldown(retry_after), or "raise": it propagates

    @property
    def name(self) -> str:
        """The variant's name in results: ``label``, or ``variant``."""
        return self.label or self.variant

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> WorkerSpec:
        raw = os.environ.get(SPEC_ENV)
        if not raw:
            raise SystemExit(f"{SPEC_ENV} is not set: worker modules are started by the scenario harness")
        return cls(**json.loads(raw))


class Recorder:
    """Appends events to ``<dir>/ev-<pid>-<random>.jsonl``, one file per process (fork-safe)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._pid = -1
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"e": event, "t": time.time(), **fields}, separators=(",", ":"))
        with self._lock:
            if self._pid != os.getpid():  # first use in this process, or a forked child
                self._pid = os.getpid()
                name = f"ev-{self._pid}-{uuid.uuid4().hex[:6]}.jsonl"
                self._file = (self.directory / name).open("a", buffering=1, encoding="utf-8")
            assert self._file is not None
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._pid = -1


class EventTail:
    """Reads every event file of a folder incrementally (only complete lines)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}

    def read(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.directory.glob("ev-*.jsonl")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self._offsets[path] = offset + end
            for line in data[:end].splitlines():
                if line.strip():
                    yield json.loads(line)
