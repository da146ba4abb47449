"""Fixtures of the chaos suite, and the ledger table printed at the end of a run.

Every test records what became of its jobs with ``record_property("ledger", ...)``
(:class:`~.harness.Ledger`); :func:`pytest_terminal_summary` prints them as one table:
jobs enqueued, run, deferred, dead-lettered, failed, lost and duplicated per fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .servers import RedisServer


@pytest.fixture(scope="session")
def recorder() -> Iterator[RedisServer]:
    """A Redis server of our own where workers record what they did; never disturbed by a test."""
    with RedisServer.running_server() as server:
        yield server


def _properties(terminalreporter: Any, wanted: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == wanted:
                    rows.append((report.nodeid, value))
    return rows


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    latencies = _properties(terminalreporter, "latency")
    if latencies:
        terminalreporter.section("chaos: store latency under faults")
        for nodeid, latency in latencies:
            terminalreporter.write_line(f"{nodeid.split('::')[-1][:70]:<72}{latency}")
    rows = _properties(terminalreporter, "ledger")
    if not rows:
        return
    columns = (
        "enqueued",
        "ran",
        "deferred",
        "deferrals",
        "dead_lettered",
        "failed",
        "lost",
        "duplicates",
        "redelivered",
    )
    terminalreporter.section("chaos ledger: what became of the enqueued jobs")
    header = f"{'fault':<58}" + "".join(f"{c[:9]:>10}" for c in columns)
    terminalreporter.write_line(header)
    for _, ledger in sorted(rows, key=lambda row: str(row[1]["fault"])):
        line = f"{str(ledger['fault'])[:57]:<58}" + "".join(f"{ledger[c]:>10}" for c in columns)
        terminalreporter.write_line(line)
        if ledger.get("notes"):
            terminalreporter.write_line(f"{'':<4}{ledger['notes']}")
