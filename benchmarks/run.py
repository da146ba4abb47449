"""Run every benchmark in this folder (``make bench``); each prints a table and writes results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        failed += subprocess.call([sys.executable, str(script), *sys.argv[1:]]) != 0
    print(f"\nresults written to {HERE / 'results'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
