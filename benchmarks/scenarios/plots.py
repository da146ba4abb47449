"""PNG plots of the scenario runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from .definitions import Scenario
from .harness import RunData
from .measures import bins

__all__ = ["plot"]

Runs = dict[str, dict[str, RunData]]  # framework -> variant -> run
STYLE: dict[str, dict[str, Any]] = {
    "limitpal": {"color": "tab:blue", "ls": "-"},
    "baseline": {"color": "tab:red", "ls": "--"},
    "adaptive": {"color": "tab:blue", "ls": "-"},
    "fixed_ceiling": {"color": "tab:red", "ls": "--"},
    "fixed_floor": {"color": "tab:green", "ls": "-."},
}
LABEL = {"limitpal": "limitpal_tasks", "baseline": "baseline"}


def plot(scenario: Scenario, runs: Runs, path: Path) -> None:
    drawer = {
        "noisy_neighbour": _noisy,
        "backlog_drain": _drain,
        "outage": _outage,
        "rate_accuracy": _accuracy,
        "overhead": _overhead,
        "adaptive_rate": _adaptive,
    }[scenario.name]
    frameworks = list(runs)
    if not frameworks:
        return
    rows = 2 if scenario.name in ("noisy_neighbour", "adaptive_rate") else 1
    width = 10.0 if scenario.name == "adaptive_rate" else 6.0  # one framework, a minute of time
    fig, axes = plt.subplots(
        rows, len(frameworks), figsize=(width * len(frameworks), 4.2 * rows), squeeze=False
    )
    for column, framework in enumerate(frameworks):
        drawer(scenario, framework, runs[framework], [axes[r][column] for r in range(rows)])
    fig.suptitle(f"{scenario.title}: {scenario.describe}", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _noisy(scenario: Scenario, framework: str, runs: dict[str, RunData], axes: list[Axes]) -> None:
    top, bottom = axes
    for variant, run in runs.items():
        latencies = sorted(
            (run.finished[i][1] - t) if i in run.finished else math.inf
            for i, (t, k) in run.enqueued.items()
            if k == "B"
        )
        finite = [v for v in latencies if math.isfinite(v)]
        share = [(i + 1) / len(latencies) for i in range(len(finite))]
        label = f"{LABEL[variant]} ({len(finite)} of {len(latencies)} done)"
        top.step(finite, share, where="post", label=label, **STYLE[variant])
        ends = {
            tenant: [
                run.finished[i][1] - run.t0
                for i, (_, k) in run.enqueued.items()
                if k == tenant and i in run.finished
            ]
            for tenant in "AB"
        }
        end = max((max(v) for v in ends.values() if v), default=1.0)
        for tenant, alpha in (("A", 0.45), ("B", 1.0)):
            counts = bins(ends[tenant], 0.0, end + 1.0, 1.0)
            bottom.plot(
                [i + 0.5 for i in range(len(counts))],
                counts,
                alpha=alpha,
                label=f"{LABEL[variant]}: tenant {tenant}",
                **STYLE[variant],
            )
    top.axvline(1.0, color="grey", lw=0.8, ls=":", label="target p95 ≤ 1 s")
    top.set_xscale("log")
    top.set_xlabel("tenant B latency, enqueue → end (s, log)")
    top.set_ylabel("share of B's tasks done")
    top.set_title(f"{framework}: tenant B's latency")
    top.legend(fontsize=7)
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel("tasks finished per second")
    bottom.set_title(f"{framework}: completions by tenant")
    bottom.legend(fontsize=7)


def _drain(scenario: Scenario, framework: str, runs: dict[str, RunData], axes: list[Axes]) -> None:
    (ax,) = axes
    rate = scenario.params["rate"]
    for variant, run in runs.items():
        first = min((t for t, _ in run.enqueued.values()), default=run.t0)
        ends = sorted(t - first for _, t in run.finished.values())
        ax.plot(ends, range(1, len(ends) + 1), label=LABEL[variant], **STYLE[variant])
    n = scenario.params["n"]
    ax.plot([0, n / rate], [0, n], color="grey", lw=0.8, ls=":", label=f"ideal: {rate:g}/s")
    ax.set_xlabel("seconds since the first enqueue")
    ax.set_ylabel("tasks done")
    ax.set_title(f"{framework}: backlog drain")
    ax.legend(fontsize=7)


def _outage(scenario: Scenario, framework: str, runs: dict[str, RunData], axes: list[Axes]) -> None:
    (ax,) = axes
    end = 0.0
    for variant, run in runs.items():
        times = [a.t - run.t0 for a in run.arrivals]
        end = max(end, max(times, default=0.0))
        counts = bins(times, 0.0, end + 0.1, 0.1)
        ax.plot(
            [i * 0.1 for i in range(len(counts))],
            [c * 10 for c in counts],
            label=LABEL[variant],
            lw=0.8,
            **STYLE[variant],
        )
        window = run.outage_window
        if window is not None and variant == "limitpal":
            ax.axvspan(
                window[0] - run.t0, window[1] - run.t0, color="grey", alpha=0.15, label="upstream down"
            )
    ax.axhline(scenario.params["rate"], color="grey", lw=0.8, ls=":", label="offered load")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("upstream calls/s (100 ms bins)")
    ax.set_title(f"{framework}: outage and recovery")
    ax.legend(fontsize=7)


def _accuracy(scenario: Scenario, framework: str, runs: dict[str, RunData], axes: list[Axes]) -> None:
    (ax,) = axes
    rate = scenario.params["rate"]
    for variant, run in runs.items():
        times = [a.t - run.t0 for a in run.arrivals]
        counts = bins(times, 0.0, max(times, default=0.0) + 0.1, 0.1)
        sliding = [sum(counts[max(0, i - 9) : i + 1]) for i in range(len(counts))]
        ax.plot(
            [i * 0.1 + 0.1 for i in range(len(sliding))],
            sliding,
            label=LABEL[variant],
            lw=0.9,
            **STYLE[variant],
        )
    ax.axhline(rate + scenario.burst, color="grey", lw=0.8, ls=":", label="rate + burst")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("calls in the last second")
    ax.set_title(f"{framework}: one key at {rate:g}/s")
    ax.legend(fontsize=7)


def _overhead(scenario: Scenario, framework: str, runs: dict[str, RunData], axes: list[Axes]) -> None:
    (ax,) = axes
    names, values = [], []
    for variant, run in runs.items():
        starts = [float(e["t"]) for e in run.of("start")]
        ends = [float(e["t"]) for e in run.of("end")]
        elapsed = max(ends) - min(starts) if starts and ends else math.nan
        names.append("plain" if variant == "baseline" else LABEL[variant])
        values.append(len(ends) / elapsed if elapsed else 0.0)
    ax.bar(names, values, color=["tab:blue" if n != "plain" else "tab:red" for n in names])
    ax.set_ylabel("no-op tasks per second")
    ax.set_title(f"{framework}: overhead")


def _adaptive(scenario: Scenario, framework: str, runs: dict[str, RunData], axes: list[Axes]) -> None:
    top, bottom = axes
    labels = {v.name: v.label for v in scenario.variants}
    end = scenario.params["duration"]
    for run in runs.values():
        end = max(end, max((a.t - run.t0 for a in run.arrivals), default=0.0))
    xs = [i + 0.5 for i in range(math.ceil(end))]
    steps = scenario.steps
    cap_x = [at for at, _ in steps] + [scenario.params["duration"]]
    cap_y = [q for _, q in steps] + [steps[-1][1]]
    top.step(cap_x, cap_y, where="post", color="black", lw=2.2, alpha=0.35, label="upstream capacity")
    for variant, run in runs.items():
        style = STYLE.get(variant, {})
        ok = [a.t - run.t0 for a in run.arrivals if a.status == 200]
        rejected = [a.t - run.t0 for a in run.arrivals if a.status == 429]
        top.plot(xs, bins(ok, 0.0, len(xs), 1.0), lw=1.0, label=f"{labels[variant]}: goodput", **style)
        bottom.plot(xs, bins(rejected, 0.0, len(xs), 1.0), lw=1.0, label=labels[variant], **style)
        samples = [(float(e["t"]) - run.t0, float(e["r"])) for e in run.of("rate")]
        if samples:
            top.plot(
                [t for t, _ in samples],
                [r for _, r in samples],
                color="tab:purple",
                lw=1.0,
                ls=":",
                label=f"{labels[variant]}: learned rate (store)",
            )
    top.set_ylim(0, 160)
    top.set_xlabel("seconds since start")
    top.set_ylabel("calls/s (1 s bins)")
    top.set_title(f"{framework}: capacity, learned rate and goodput")
    top.legend(fontsize=7, loc="upper right")
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel("429 answers/s (1 s bins, symlog)")
    bottom.set_title(f"{framework}: overload answers")
    bottom.legend(fontsize=7, loc="upper right")
