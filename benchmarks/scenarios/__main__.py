"""Run the scenario benchmarks: ``make scenarios`` or ``cd benchmarks && python -m scenarios``.

Options: ``--quick`` (short smoke sizes), ``--only NAME`` (repeatable), ``--framework
celery|dramatiq`` (repeatable), ``--serial`` (run limitpal and the baseline one after the
other instead of side by side), ``--no-readme``, ``--report-only`` (rebuild the tables and
the README section from the last full run's JSON and any scenario measured on its own since,
starting no worker). Writes ``benchmarks/results/<scenario>.json``, ``<scenario>.png``,
``scenarios.json`` (whole runs only: a partial one leaves it), prints the tables, and (full
runs) regenerates the README's "Why" section. Raw events stay under
``benchmarks/results/scenarios-raw/``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from .definitions import (
    BACKOFF,
    BACKOFF_MAX,
    CELERY_MAX_RETRIES,
    DRAMATIQ_MAX_RETRIES,
    SCENARIOS,
    Scenario,
    Variant,
    scenarios,
)
from .harness import BROKER_URL, STORE_URL, RunData, RunPlan, flush, run_side_by_side
from .plots import plot
from .recorder import WorkerSpec
from .report import headline_rows, notes, print_details, print_headline, write_readme
from .workers import BENCH, stop_all

RESULTS = BENCH / "results"
RAW = RESULTS / "scenarios-raw"
FRAMEWORKS = ("celery", "dramatiq")


def plan(scenario: Scenario, framework: str, variant: Variant, round_: int = 0) -> RunPlan:
    limitpal = variant.limitpal
    tag = f"{framework}-{variant.name}"
    rate = scenario.rate  # Celery: rate_limit of the one worker instance; Dramatiq: per tenant
    events = RAW / scenario.name / (tag if not round_ else f"{tag}-r{round_}")
    spec = WorkerSpec(
        framework=framework,
        variant="limitpal" if limitpal else "baseline",
        queue=f"scn-{scenario.name}-{tag}",
        events_dir=str(events),
        broker_url=BROKER_URL,
        store_url=STORE_URL,
        key_prefix=f"scn-{tag}",
        upstream_prefix=None if scenario.noop else f"up-{tag}",
        policy=(variant.policy or scenario.policy) if limitpal else None,
        rate=None if limitpal else rate,
        max_retries=CELERY_MAX_RETRIES if framework == "celery" else DRAMATIQ_MAX_RETRIES,
        backoff=BACKOFF,
        backoff_max=BACKOFF_MAX,
        label=variant.name,
        on_429=variant.on_429,
    )
    events.mkdir(parents=True, exist_ok=True)
    return RunPlan(
        scenario=scenario.name,
        spec=spec,
        processes=scenario.processes,
        threads=scenario.threads,
        load=scenario.load,
        timeout=scenario.timeout,
        quota=scenario.quota,
        outage=scenario.outage,
        preload=scenario.preload,
        steps=scenario.steps,
    )


def run_scenario(scenario: Scenario, frameworks: list[str], serial: bool) -> dict[str, dict[str, RunData]]:
    runs: dict[str, dict[str, RunData]] = {}
    for framework in frameworks:
        if framework not in scenario.frameworks:
            continue
        print(f"  {framework}", flush=True)
        if scenario.side_by_side and not serial:
            found = run_side_by_side([plan(scenario, framework, v) for v in scenario.variants])
            runs[framework] = {run.plan.spec.name: run for run in found}
            continue
        best: dict[str, RunData] = {}
        for round_ in range(scenario.rounds):
            for variant in scenario.variants:
                (run,) = run_side_by_side([plan(scenario, framework, variant, round_)])
                name = variant.name
                if name not in best or _throughput(run) > _throughput(best[name]):
                    best[name] = run
        runs[framework] = best
    return runs


def _throughput(run: RunData) -> float:
    starts = [float(e["t"]) for e in run.of("start")]
    ends = [float(e["t"]) for e in run.of("end")]
    return len(ends) / (max(ends) - min(starts)) if starts and ends and max(ends) > min(starts) else 0.0


def analyse(scenario: Scenario, runs: dict[str, dict[str, RunData]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for framework, variants in runs.items():
        out[framework] = {}
        for variant, run in variants.items():
            metrics = scenario.analyse(run, scenario)
            out[framework][variant] = {
                "metrics": metrics,
                "accounting": {**vars(run.accounting), "balanced": run.accounting.balanced},
                "nothing_lost": run.accounting.summary(),
                "timed_out": run.timed_out,
                "worker_exits": run.worker_exits,
                "workers": {"processes": run.plan.processes, "threads": run.plan.threads},
                "policy": run.plan.spec.policy,
                "baseline_rate": run.plan.spec.rate,
                "max_retries": run.plan.spec.max_retries if run.plan.spec.variant == "baseline" else None,
            }
        if scenario.name == "overhead" and {"limitpal", "baseline"} <= set(out[framework]):
            plain = out[framework]["baseline"]["metrics"].get("tasks_per_s") or math.nan
            for variant in out[framework]:
                tps = out[framework][variant]["metrics"].get("tasks_per_s") or math.nan
                out[framework][variant]["metrics"]["throughput_ratio"] = tps / plain
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _unclean(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if isinstance(value, dict):
        return {k: _unclean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unclean(v) for v in value]
    return value


def report_only() -> int:
    """Rebuild the tables and the README section from the last full run's JSON files (no workers)."""
    meta = json.loads((RESULTS / "scenarios.json").read_text())
    if meta.get("quick"):
        print("the last run was --quick: run `make scenarios` first", file=sys.stderr)
        return 1
    frameworks = meta["frameworks"]
    summary: dict[str, Any] = {}
    rows: list[list[str]] = []
    separate: list[str] = []
    for scenario in scenarios():
        path = RESULTS / f"{scenario.name}.json"
        if path.exists():
            payload = _unclean(json.loads(path.read_text()))
            if payload.get("quick"):
                print(f"{path.name}: a --quick run, left out (run it at full size)", file=sys.stderr)
                continue
            summary[scenario.name] = payload
            rows.extend(headline_rows(scenario, payload["results"], frameworks))
            if _later(payload.get("when"), meta.get("when")):
                commit = (payload.get("library") or {}).get("commit")
                separate.append(
                    f"{scenario.title}: measured on its own (`--only {scenario.name}`) at "
                    f"{payload['when']} in {payload['seconds']:.0f} s"
                    + (f", limitpal_tasks at commit {commit[:7]}." if commit else ".")
                )
    print_headline(rows, frameworks)
    remarks = notes(summary) + separate
    for remark in remarks:
        print(f"- {remark}")
    meta.update(headline=rows, notes=remarks)
    (RESULTS / "scenarios.json").write_text(json.dumps(_clean(meta), indent=2) + "\n")
    write_readme(rows, frameworks, meta, remarks)
    print("README.md: the Why section was regenerated from benchmarks/results/*.json")
    return 0


def _library() -> dict[str, Any]:
    """Which limitpal_tasks the run measured: its folder, and its commit when known.

    Other changes may be in progress in the working tree: a run against the editable install
    says whether ``src/`` differed from its commit (``dirty``); a run against a snapshot
    (``git archive HEAD src | tar -x -C DIR``, then ``PYTHONPATH=DIR/src``) names the commit
    written to ``DIR/COMMIT``.
    """
    import limitpal_tasks  # noqa: PLC0415

    folder = Path(limitpal_tasks.__file__).resolve().parent
    info: dict[str, Any] = {"path": str(folder)}
    snapshot = folder.parent.parent / "COMMIT"
    if snapshot.exists():
        info.update(commit=snapshot.read_text().strip(), snapshot=True)
        return info

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if commit:
        info.update(commit=commit, dirty=bool(git("status", "--porcelain", "--", ".")))
    return info


def _later(when: str | None, than: str | None) -> bool:
    """Whether timestamp ``when`` (``%Y-%m-%dT%H:%M:%S%z``) comes after ``than``."""
    if not when or not than:
        return False
    pattern = "%Y-%m-%dT%H:%M:%S%z"
    return datetime.strptime(when, pattern) > datetime.strptime(than, pattern)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke sizes (no README update)")
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--framework", action="append", choices=FRAMEWORKS, help="run only these frameworks")
    parser.add_argument("--serial", action="store_true", help="limitpal and baseline one after the other")
    parser.add_argument("--no-readme", action="store_true", help="do not regenerate README's Why section")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild tables and README from the last results"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        return report_only()

    atexit.register(stop_all)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    frameworks = args.framework or list(FRAMEWORKS)
    chosen = [s for s in scenarios(args.quick) if not args.only or s.name in args.only]
    RESULTS.mkdir(exist_ok=True)
    library = _library()
    started = time.time()
    summary: dict[str, Any] = {}
    all_rows: list[list[str]] = []
    try:
        for scenario in chosen:
            print(f"== {scenario.name}: {scenario.describe}", flush=True)
            t = time.time()
            runs = run_scenario(scenario, frameworks, args.serial)
            results = analyse(scenario, runs)
            print_details(scenario, results)
            rows = headline_rows(scenario, results, frameworks)
            all_rows.extend(rows)
            payload = {
                "scenario": scenario.name,
                "title": scenario.title,
                "describe": scenario.describe,
                "quick": args.quick,
                "side_by_side": scenario.side_by_side and not args.serial,
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - t, 1),
                "library": library,
                "results": results,
            }
            (RESULTS / f"{scenario.name}.json").write_text(json.dumps(_clean(payload), indent=2) + "\n")
            plot(scenario, runs, RESULTS / f"{scenario.name}.png")
            summary[scenario.name] = payload
    finally:
        stop_all()
        flush()
    elapsed = time.time() - started
    print_headline(all_rows, frameworks)
    remarks = notes(summary)
    for remark in remarks:
        print(f"- {remark}")
    print(f"\n{len(chosen)} scenario(s) in {elapsed:.0f} s; results in {RESULTS}")
    full = not args.quick and not args.only and not args.framework and not args.serial
    if args.only or args.framework or args.serial:
        # scenarios.json describes the last whole run (what --report-only builds the README from):
        # a partial run leaves it; its own <scenario>.json files join the next --report-only.
        print("scenarios.json kept (partial run): `python -m scenarios --report-only` rebuilds the README")
        return 0
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "frameworks": frameworks,
        "headline": all_rows,
        "notes": remarks,
    }
    (RESULTS / "scenarios.json").write_text(json.dumps(_clean(meta), indent=2) + "\n")
    if full and not args.no_readme:
        write_readme(all_rows, frameworks, meta, remarks)
        print("README.md: the Why section was regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
