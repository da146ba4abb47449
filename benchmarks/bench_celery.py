"""Celery with and without limitpal, side by side: no-op throughput, and a rate-limited drain.

Starts real ``celery worker`` processes (prefork, ``-c 2``) on the Redis broker with a
``RedisStore``. Run with ``make bench`` or ``python benchmarks/bench_celery.py [-n N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis

from _table import report

HERE = Path(__file__).resolve().parent

BROKER = "redis://127.0.0.1:6379/1"
STATS = "redis://127.0.0.1:6379/2"
STORE = "redis://127.0.0.1:6379/3"


def _worker(queue: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BENCH_BROKER": BROKER, "BENCH_STATS": STATS, "BENCH_STORE": STORE}
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_bench_app",
        "worker",
        "--pool=prefork",
        "-c",
        "2",
        "-Q",
        queue,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel=WARNING",
    ]
    return subprocess.Popen(cmd, cwd=HERE, env=env)


def _wait(stats: redis.Redis, name: str, n: int, timeout: float) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if int(stats.get(f"{name}:count") or 0) >= n:
            return float(stats.get(f"{name}:last") or 0)
        time.sleep(0.02)
    done = int(stats.get(f"{name}:count") or 0)
    raise TimeoutError(f"{name}: {done} of {n} done after {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    for url in (BROKER, STATS, STORE):
        redis.Redis.from_url(url).flushdb()
    stats = redis.Redis.from_url(STATS)
    from celery_bench_app import limited, plain, protected  # noqa: PLC0415 - after the flush

    rows: list[list[object]] = []
    rates: dict[str, float] = {}
    for name, task in (("plain", plain), ("protected", protected)):
        worker = _worker(name)
        try:
            start = time.time()
            for i in range(args.n):
                task.apply_async((f"t{i % 16}",), queue=name)
            last = _wait(stats, name, args.n, 120)
            rates[name] = args.n / (last - start)
        finally:
            worker.terminate()
            worker.wait(30)
    rows.append(["no-op tasks/s, plain Celery", rates["plain"], 1.0])
    rows.append(
        [
            "no-op tasks/s, limitpal (breaker + rate, RedisStore)",
            rates["protected"],
            rates["protected"] / rates["plain"],
        ]
    )

    worker = _worker("limited")
    try:
        start = time.time()
        for _ in range(args.n):
            limited.apply_async(("one",), queue="limited")
        last = _wait(stats, "limited", args.n, 120)
        times = sorted(float(t) for t in stats.lrange("limited:times", 0, -1))
    finally:
        worker.terminate()
        worker.wait(30)
    ideal = args.n / 100.0
    drain = last - start
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    rows.append([f"drain of {args.n} tasks at 100/s (s)", drain, drain / ideal])
    rows.append(["largest count in any 1 s window", worst, worst / 110])
    report(
        "bench_celery",
        ["measure", "value", "ratio"],
        rows,
        notes=(
            f"{args.n} tasks each; Redis broker, prefork -c 2, RedisStore, one run. Ratios: throughput "
            f"to plain Celery; drain to the ideal {ideal:.0f} s; window count to rate + burst (110)."
        ),
    )


if __name__ == "__main__":
    main()
