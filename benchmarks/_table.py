"""Shared output for the benchmarks: a printed table and a JSON file under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(name: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: str = "") -> None:
    """Print ``rows`` as an aligned table and write them to ``results/<name>.json``."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(f"\n{name}\n{line}\n{'  '.join('-' * w for w in widths)}")
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if notes:
        print(notes)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "headers": list(headers),
        "rows": [list(row) for row in rows],
        "notes": notes,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
