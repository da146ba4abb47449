"""Deferral transports side by side: 50,000 tasks deferred during an outage, ``broker`` vs ``park``.

For each transport, one after the other: a real ``celery worker`` (prefork, ``-c 2``,
Redis broker, ``RedisStore``) runs a no-op task behind a policy; the bench pauses the
policy's key (``store.pause(key, S)``: every delivery is deferred until the pause ends),
enqueues every task during the outage, and waits for recovery and the drain.

The outage lasts ``--outage`` seconds (60), or longer when the worker needs longer to
receive (and so defer) every task once: the first column sizes it from the pace of its
warm-up deferrals (twice the time they predict) and the other column reuses it, so both
face the same outage; should tasks still be arriving near its end, it is extended (what
was deferred then comes back and is deferred again). ``--fixed-outage`` keeps it as given.
The policy's ``max_delay`` is 600 s here (the library's default: 300), so that one hop
covers such an outage: each task is deferred once.

Measured: the worker's RSS (the sum over its process group, sampled every 0.25 s) at its
peak against its idle RSS (after 200 runs and 1,000 deferrals of the task: a pool
process's first deferrals cost it memory whatever the transport) and its fresh RSS (after
the runs only); deliveries, redeliveries and executions per task id (so duplicates and
lost tasks are counted, not inferred); the time from recovery to the last task done; the
peak memory of the broker's and the store's Redis; the worker's ERROR and WARNING lines.

By default the bench starts its own ``redis-server`` processes (broker, store, stats) on
free loopback ports in 7400-7499, so their memory is the bench's alone; ``--broker``,
``--store`` and ``--stats`` point it at other servers (their databases are flushed).
Writes results/<name>.json (the table) and results/<name without bench_>_timeline.json.

``python benchmarks/bench_park.py [--tasks N] [--outage S]`` (defaults 50,000 and 60 s).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis

from _table import RESULTS, report
from limitpal_tasks.stores.factory import store_from_url

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024
TRANSPORTS = ("broker", "park")
# The same names as park_bench_app.py (not imported here: it reads its settings from the
# environment at import, and this process only publishes).
QUEUE = "park-bench"
KEY = "upstream"
PREFIX = "park-bench"
STATS_PREFIX = "park-bench-stats"
PARK_MSG = f"{PREFIX}:{{park:celery}}:msg"  # the park's entries (RedisStore's layout)


# -- servers ------------------------------------------------------------------------------


def _free_port(start: int, stop: int) -> int:
    for port in range(start, stop):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {start}-{stop - 1}")


@contextmanager
def _redis_server(name: str, first_port: int) -> Iterator[str]:
    """A private ``redis-server`` on a free loopback port (no persistence); its URL."""
    port = _free_port(first_port, 7500)
    with tempfile.TemporaryDirectory(prefix=f"bench-park-{name}-") as folder:
        server = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""),
                *("--appendonly", "no", "--dir", folder, "--logfile", str(Path(folder) / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(10)


# -- process memory -----------------------------------------------------------------------


def _group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (the worker and its pool children)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp
            found.append(int(entry.name))
    return found


def _rss_proc(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_reader() -> tuple[str, Callable[[int], int]]:
    """psutil's RSS when psutil is installed, else /proc/<pid>/status VmRSS."""
    if importlib.util.find_spec("psutil") is None:
        return "/proc/<pid>/status VmRSS", _rss_proc
    psutil: Any = importlib.import_module("psutil")

    def rss(pid: int) -> int:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0

    return "psutil", rss


RSS_SOURCE, _rss = _rss_reader()


# -- sampling -----------------------------------------------------------------------------


@dataclass
class Peaks:
    rss: int = 0
    rss_main: int = 0
    broker_memory: int = 0
    store_memory: int = 0
    queued: int = 0
    unacked: int = 0
    parked: int = 0
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)


class Sampler(threading.Thread):
    """Samples the worker's RSS and the Redis servers every ``interval`` seconds; keeps peaks."""

    def __init__(self, pgid: int, broker: redis.Redis, store: redis.Redis, interval: float = 0.25) -> None:
        super().__init__(name="bench-park-sampler", daemon=True)
        self.pgid, self.broker, self.store, self.interval = pgid, broker, store, interval
        self.peaks = Peaks()
        self._stop_event = threading.Event()

    def run(self) -> None:
        p = self.peaks
        while not self._stop_event.is_set():
            rss = _group_rss(self.pgid)
            p.rss = max(p.rss, rss)
            p.rss_main = max(p.rss_main, _rss(self.pgid))
            try:
                p.broker_memory = max(p.broker_memory, int(self.broker.info("memory")["used_memory"]))
                p.store_memory = max(p.store_memory, int(self.store.info("memory")["used_memory"]))
                queued = int(self.broker.llen(QUEUE))
                unacked = int(self.broker.hlen("unacked"))
                parked = int(self.store.hlen(PARK_MSG))
            except redis.RedisError:
                queued = unacked = parked = 0
            p.queued, p.unacked, p.parked = (
                max(p.queued, queued),
                max(p.unacked, unacked),
                max(p.parked, parked),
            )
            p.samples.append((round(time.time(), 2), rss, queued, unacked, parked))
            self._stop_event.wait(self.interval)

    def stop(self) -> Peaks:
        self._stop_event.set()
        self.join(10)
        return self.peaks


# -- one transport ------------------------------------------------------------------------


@dataclass
class Urls:
    broker: str
    store: str
    stats: str


@dataclass
class Run:
    transport: str
    tasks: int
    outage: float = 0.0
    extensions: int = 0
    enqueue: float = 0.0
    absorbed: float = 0.0
    planned: float = 0.0
    fresh_rss: int = 0
    idle_rss: int = 0
    idle_main: int = 0
    peaks: Peaks = field(default_factory=Peaks)
    deliveries: int = 0
    redelivered: int = 0
    executions: int = 0
    unique: int = 0
    duplicated_ids: int = 0
    during_outage: int = 0
    drain: float = 0.0
    wall: float = 0.0
    errors: int = 0
    warnings: int = 0
    dead: int = 0
    timeline: list[tuple[float, int, int, int, int]] = field(default_factory=list)

    @property
    def deferrals(self) -> int:
        return self.deliveries - self.executions

    @property
    def duplicates(self) -> int:
        return self.executions - self.unique

    @property
    def lost(self) -> int:
        return self.tasks - self.unique


def _stat(name: str) -> str:
    return f"{STATS_PREFIX}:{name}"


def _worker(transport: str, urls: Urls, args: argparse.Namespace, log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PARK_BENCH_BROKER": urls.broker,
        "PARK_BENCH_STORE": urls.store,
        "PARK_BENCH_STATS": urls.stats,
        "PARK_BENCH_TRANSPORT": transport,
        "PARK_BENCH_VISIBILITY": str(args.visibility_timeout),
        "PARK_BENCH_RATE": args.rate or "",
        "PARK_BENCH_PARK_LIMIT": str(_park_limit(args)),
        "PARK_BENCH_PREFETCH": str(args.prefetch),
        "PARK_BENCH_MAX_DELAY": str(args.max_delay),
        "PARK_BENCH_JITTER": str(args.jitter),
    }
    cmd = [sys.executable, "-m", "celery", "-A", "park_bench_app", "worker", f"--pool={args.pool}"]
    cmd += ["-c", str(args.concurrency), "-Q", QUEUE, "--without-gossip", "--without-mingle"]
    cmd += ["--without-heartbeat", "--loglevel=WARNING"]
    # Its own process group: the RSS is summed over it, and it is stopped as one.
    return subprocess.Popen(cmd, cwd=HERE, env=env, start_new_session=True, stdout=log, stderr=log)


def _park_limit(args: argparse.Namespace) -> int:
    return int(args.park_limit or max(args.tasks + WARM_DEFERRED, 10_000))


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    for pid in _group(worker.pid):  # pool children left behind
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(what: str, check: Callable[[], bool], timeout: float, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:g}s")
        time.sleep(0.1)


def _scores(client: redis.Redis, name: str) -> list[float]:
    """The scores (times) of a stats sorted set."""
    pairs = cast(list[tuple[bytes, float]], client.zrange(_stat(name), 0, -1, withscores=True))
    return [float(score) for _, score in pairs]


def _clear_stats(client: redis.Redis) -> None:
    """Delete the counters (only them: the stats may share a database with the store)."""
    names = list(client.scan_iter(match=f"{STATS_PREFIX}:*"))
    if names:
        client.delete(*names)


def _values(client: redis.Redis, name: str) -> list[int]:
    return [int(v) for v in client.hvals(_stat(name))]


def _group_rss(pgid: int) -> int:
    return sum(_rss(pid) for pid in _group(pgid))


def _idle_rss(pgid: int) -> int:
    """The worker's RSS at rest: the largest of five samples over a second."""
    samples = []
    for _ in range(5):
        samples.append(_group_rss(pgid))
        time.sleep(0.2)
    return max(samples)


WARM_RUN = 200  # tasks run before the fresh idle RSS
WARM_DEFERRED = 1000  # tasks deferred (and run) before the idle RSS; they time the deferrals


def _publish(producer: Any, prefix: str, count: int) -> None:
    for i in range(count):
        producer.send_task("park_bench.noop", (i,), task_id=f"{prefix}{i:06d}")


def run_transport(
    transport: str, urls: Urls, args: argparse.Namespace, log: IO[bytes], planned: float = 0.0
) -> Run:
    """One column: a worker started, warmed up, put through the outage and the drain, stopped.

    ``planned``: the outage's length (default: sized from this worker's warm-up deferrals).

    The worker's output goes to ``log``; its ERROR and WARNING lines are counted.
    """
    started = time.time()
    broker, store_db, stats = (redis.Redis.from_url(u) for u in (urls.broker, urls.store, urls.stats))
    for client in (broker, store_db):
        client.flushdb()
    _clear_stats(stats)
    from celery import Celery  # noqa: PLC0415 - only this function publishes

    producer = Celery("park_bench_producer", broker=urls.broker)
    producer.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)
    store = store_from_url(urls.store, prefix=PREFIX)
    run = Run(transport, args.tasks)
    worker = _worker(transport, urls, args, log)
    try:
        # 1. Every pool process imports, connects and runs the task: the fresh idle RSS.
        _publish(producer, "warm-", WARM_RUN)
        _wait_for("the warm-up", lambda: stats.zcard(_stat("done")) >= WARM_RUN, 120, worker)
        time.sleep(2.0)
        run.fresh_rss = _idle_rss(worker.pid)

        # 2. Defer WARM_DEFERRED tasks through the transport (a short pause), and let them
        # run: the worker's idle RSS then includes what deferring costs a pool process in
        # any case (Celery's Ignore), and the time they took sizes the outage.
        _clear_stats(stats)
        store.pause(KEY, 8.0, "bench warm-up")
        began = time.time()
        _publish(producer, "defer-", WARM_DEFERRED)
        _wait_for("warm-up deferrals", lambda: stats.zcard(_stat("done")) >= WARM_DEFERRED, 300, worker)
        firsts = _scores(stats, "first-delivery")
        deferred = sum(1 for t in firsts if t < began + 8.0) or 1
        rate = deferred / max(0.5, min(max(firsts, default=began + 8.0), began + 8.0) - began)
        time.sleep(3.0)
        run.idle_rss = _idle_rss(worker.pid)
        run.idle_main = _rss(worker.pid)
        _clear_stats(stats)

        # 3. The outage: at least --outage seconds, and long enough for the worker to
        # receive (and defer) every task once, going by the warm-up's pace.
        # The first column sizes it; the others reuse it, so the columns face the same outage.
        if planned:
            run.planned = planned
        elif args.fixed_outage:
            run.planned = args.outage
        else:
            run.planned = max(args.outage, 2.0 * args.tasks / rate + 10)
        run.outage = run.planned
        sampler = Sampler(worker.pid, broker, store_db)
        sampler.start()
        outage_start = time.time()
        store.pause(KEY, run.outage, "bench outage")
        recovery = outage_start + run.outage
        sender = threading.Thread(target=_publish, args=(producer, "t", args.tasks), daemon=True)
        sender.start()
        enqueued = False
        while True:
            now = time.time()
            if not enqueued and not sender.is_alive():
                enqueued, run.enqueue = True, now - outage_start
            seen = int(stats.zcard(_stat("first-delivery")))
            if seen >= args.tasks:
                break
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}) during the outage")
            if not args.fixed_outage and now > recovery - 5.0:
                # Still receiving: extend the outage (what was deferred comes back and is
                # deferred again, as when a real outage outlasts its first estimate).
                pace = max(seen, 1) / max(now - outage_start, 1.0)
                recovery = now + 1.5 * (args.tasks - seen) / pace + 10
                store.pause(KEY, recovery - now, "bench outage, extended")
                run.extensions += 1
            if now > recovery + args.timeout:
                raise TimeoutError(f"{transport}: {seen} of {args.tasks} tasks received")
            time.sleep(0.5)
        run.outage = recovery - outage_start
        sender.join()

        # Until every task ran, or nothing is left anywhere (queued, held, parked) and nothing
        # ran for 15 s after recovery: then what did not run is lost.
        progress, last_done = time.monotonic(), -1
        while (done := int(stats.zcard(_stat("done")))) < args.tasks:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}) during the drain")
            busy = broker.llen(QUEUE) or broker.hlen("unacked") or store_db.hlen(PARK_MSG)
            if done != last_done or busy or time.time() < recovery:
                progress, last_done = time.monotonic(), done
            elif time.monotonic() - progress > 15.0:
                print(f"warning: {transport}: {args.tasks - done} tasks did not run; nothing is left to run")
                break
            if time.time() > recovery + args.timeout:
                missing = args.tasks - done
                print(f"warning: {transport}: {missing} tasks not done {args.timeout:g}s after recovery")
                break
            time.sleep(0.5)

        # Settle: nothing queued, unacknowledged or parked, and no delivery for 3 s, so
        # late redeliveries are counted too.
        quiet_since, last_count = time.monotonic(), -1
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline:
            count = sum(_values(stats, "deliveries"))
            busy = broker.llen(QUEUE) or broker.hlen("unacked") or store_db.hlen(PARK_MSG)
            if count != last_count or busy:
                quiet_since, last_count = time.monotonic(), count
            elif time.monotonic() - quiet_since >= 3.0:
                break
            time.sleep(0.25)
        run.peaks = sampler.stop()
        run.timeline = [(round(t - outage_start, 2), m, q, u, k) for t, m, q, u, k in run.peaks.samples]

        run.absorbed = max(_scores(stats, "first-delivery"), default=outage_start) - outage_start
        run.deliveries = sum(_values(stats, "deliveries"))
        run.redelivered = sum(_values(stats, "redelivered"))
        executions = _values(stats, "executions")
        run.executions, run.unique = sum(executions), len(executions)
        run.duplicated_ids = sum(1 for n in executions if n > 1)
        run.during_outage = int(stats.zcount(_stat("done"), "-inf", recovery))
        run.drain = max(_scores(stats, "done"), default=recovery) - recovery
        run.dead = len(store.list_dead(limit=args.tasks + WARM_DEFERRED))
    except BaseException:
        _stop(worker)
        log.seek(0)
        print(
            f"-- {transport}: the worker's log ends with", *log.read().decode().splitlines()[-40:], sep="\n"
        )
        raise
    finally:
        _stop(worker)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
        run.errors = sum(1 for line in lines if "ERROR/" in line or "CRITICAL/" in line)
        run.warnings = sum(1 for line in lines if "WARNING/" in line)
        store.close()
        for client in (broker, store_db, stats):
            client.close()
    run.wall = time.time() - started
    return run


# -- the report ---------------------------------------------------------------------------


def _mb(n: int) -> float:
    return n / MB


def _rows(runs: Sequence[Run]) -> list[list[object]]:
    def row(label: str, value: Callable[[Run], object]) -> list[object]:
        return [label, *(value(r) for r in runs)]

    return [
        row("tasks enqueued during the outage", lambda r: r.tasks),
        row("outage: key paused for (s)", lambda r: r.outage),
        row("  extended while tasks still arrived", lambda r: r.extensions),
        row("producer done after (s)", lambda r: r.enqueue),
        row("every task received once after (s)", lambda r: r.absorbed),
        row("worker RSS fresh, before deferring (MB)", lambda r: _mb(r.fresh_rss)),
        row("worker RSS idle (MB)", lambda r: _mb(r.idle_rss)),
        row("worker RSS peak (MB)", lambda r: _mb(r.peaks.rss)),
        row("worker RSS peak - idle (MB)", lambda r: _mb(r.peaks.rss - r.idle_rss)),
        row("worker RSS peak - fresh (MB)", lambda r: _mb(r.peaks.rss - r.fresh_rss)),
        row("  main process: idle (MB)", lambda r: _mb(r.idle_main)),
        row("  main process: peak (MB)", lambda r: _mb(r.peaks.rss_main)),
        row("broker Redis peak used_memory (MB)", lambda r: _mb(r.peaks.broker_memory)),
        row("store Redis peak used_memory (MB)", lambda r: _mb(r.peaks.store_memory)),
        row("peak messages queued in the broker", lambda r: r.peaks.queued),
        row("peak messages unacked (held by worker)", lambda r: r.peaks.unacked),
        row("peak tasks parked in the store", lambda r: r.peaks.parked),
        row("deliveries (task_prerun)", lambda r: r.deliveries),
        row("  deferrals (deliveries not run)", lambda r: r.deferrals),
        row("  broker redeliveries (redelivered flag)", lambda r: r.redelivered),
        row("executions", lambda r: r.executions),
        row("duplicates (executions beyond one)", lambda r: r.duplicates),
        row("  task ids run more than once", lambda r: r.duplicated_ids),
        row("lost (never ran)", lambda r: r.lost),
        row("  dead-lettered (e.g. park_full)", lambda r: r.dead),
        row("ran during the outage", lambda r: r.during_outage),
        row("drain: recovery -> last task done (s)", lambda r: r.drain),
        row("worker log: errors / warnings", lambda r: f"{r.errors} / {r.warnings}"),
        row("run time of this column (s)", lambda r: r.wall),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks enqueued during the outage")
    parser.add_argument(
        "--outage",
        type=float,
        default=60.0,
        help="seconds the key is paused, at least (longer if the worker needs longer to receive every task)",
    )
    parser.add_argument("--fixed-outage", action="store_true", help="pause exactly --outage seconds")
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--pool", choices=("prefork", "threads"), default="prefork")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=16, help="worker_prefetch_multiplier")
    parser.add_argument(
        "--visibility-timeout", type=float, default=3600.0, help="the Redis broker's (kombu's default: 3600)"
    )
    parser.add_argument(
        "--max-delay",
        type=float,
        default=600.0,
        help="DeferPolicy.max_delay (the library's default is 300; longer, so that one hop covers an "
        "outage sized for a slow machine and every task is deferred once)",
    )
    parser.add_argument("--jitter", type=float, default=0.1, help="DeferPolicy.jitter")
    parser.add_argument("--rate", default="", help="the policy's rate limit, e.g. 2000/s (default: none)")
    parser.add_argument(
        "--park-limit", type=int, default=0, help="DeferPolicy.park_limit (default: enough for --tasks)"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds after recovery to wait")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait for late redeliveries")
    parser.add_argument("--broker", help="broker URL (default: a private redis-server)")
    parser.add_argument("--store", help="store URL (default: a private redis-server)")
    parser.add_argument("--stats", help="stats URL (default: a private redis-server)")
    parser.add_argument("--name", default="bench_park", help="results/<name>.json")
    args = parser.parse_args()

    began = time.time()
    runs: list[Run] = []
    own = shutil.which("redis-server") is not None
    servers = (
        "redis-servers of the bench's own"
        if own and not (args.broker or args.store or args.stats)
        else "Redis memory: whole servers"
    )
    with ExitStack() as stack:

        def url(given: str | None, name: str, first_port: int, fallback: str) -> str:
            if given:
                return given
            return stack.enter_context(_redis_server(name, first_port)) if own else fallback

        urls = Urls(
            url(args.broker, "broker", 7440, "redis://127.0.0.1:6379/2"),
            url(args.store, "store", 7450, "redis://127.0.0.1:6379/14"),
            url(args.stats, "stats", 7460, "redis://127.0.0.1:6379/14"),
        )
        for transport in args.transports:
            print(f"-- {transport}: {args.tasks:,} tasks, outage of {args.outage:g}s or more", flush=True)
            with tempfile.TemporaryFile() as log:
                runs.append(run_transport(transport, urls, args, log, runs[0].planned if runs else 0.0))
    total = time.time() - began

    report(
        args.name,
        ["measure", *(r.transport for r in runs)],
        _rows(runs),
        notes=(
            f"One worker per column: celery worker --pool={args.pool} -c {args.concurrency}, "
            f"worker_prefetch_multiplier={args.prefetch}, Redis broker (visibility_timeout="
            f"{args.visibility_timeout:g}s), RedisStore ({servers}); a no-op task; "
            f"policy: Breaker(), {'rate ' + args.rate if args.rate else 'no rate limit'}, "
            f"DeferPolicy(transport=<column>, park_limit={_park_limit(args)}, max_delay={args.max_delay:g}, "
            f"jitter={args.jitter:g}). Outage: store.pause(key) before the producer starts; recovery = "
            f"its end. Idle RSS: after {WARM_RUN} runs and {WARM_DEFERRED} deferrals; fresh: after the "
            f"runs only. RSS: {RSS_SOURCE}, summed over the worker's process group every 0.25 s. "
            f"Whole run {total:.0f} s on {os.cpu_count()} CPUs. Command: python benchmarks/bench_park.py"
            f"{''.join(' ' + a for a in sys.argv[1:])}"
        ),
    )
    timeline = {
        r.transport: {"columns": ["s", "rss", "queued", "unacked", "parked"], "samples": r.timeline}
        for r in runs
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name.replace('bench_', '')}_timeline.json").write_text(json.dumps(timeline) + "\n")
    print(f"{args.name} took {total:.0f} s")


if __name__ == "__main__":
    main()
