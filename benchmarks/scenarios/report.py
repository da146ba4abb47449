"""Tables (printed and Markdown) and the README's generated "Why" section."""

from __future__ import annotations

import math
from typing import Any

from .definitions import Scenario, Variant
from .workers import BENCH

__all__ = ["headline_rows", "notes", "print_details", "print_headline", "write_readme"]

README = BENCH.parent / "README.md"
BEGIN = "<!-- scenarios:begin -->"
END = "<!-- scenarios:end -->"
NAMES = {"celery": "Celery", "dramatiq": "Dramatiq"}

Results = dict[str, dict[str, dict[str, Any]]]


def fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞ (unfinished)"
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return text + unit
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return str(value)


def _columns(scenario: Scenario) -> tuple[Variant, tuple[Variant, ...]]:
    """The variant in the "limitpal" column, and those sharing the "baseline" column."""
    first, *others = scenario.variants
    return first, tuple(others)


def _cell(others: tuple[Variant, ...], text: dict[str, str]) -> str:
    if len(others) == 1:
        return text[others[0].name]
    return "; ".join(f"{v.label}: {text[v.name]}" for v in others)


def headline_rows(scenario: Scenario, results: Results, frameworks: list[str]) -> list[list[str]]:
    """Rows: measure, target, then limitpal and baseline per framework, then met / not met.

    A scenario with more than two variants puts its first in the limitpal column and the
    others, each named, in the baseline column; a framework it does not run reads "not run".
    """
    first, others = _columns(scenario)
    rows = []
    for head in scenario.headline:
        cells = []
        verdicts = []
        for framework in frameworks:
            if framework not in scenario.frameworks:
                cells += ["not run", "not run"]
                continue
            text = {}
            for variant in scenario.variants:
                metrics = results.get(framework, {}).get(variant.name, {}).get("metrics", {})
                value = metrics.get(head.metric)
                text[variant.name] = fmt(value, head.unit)
                if variant is first and head.meets is not None:
                    ok = value is not None and not math.isnan(value) and head.meets(value)
                    verdicts.append(f"{NAMES[framework]}: {'met' if ok else 'NOT met'}")
            cells += [text[first.name], _cell(others, text)]
        rows.append([head.label, head.target or "—", *cells, "; ".join(verdicts) or "—"])
    cells = []
    verdicts = []
    for framework in frameworks:
        if framework not in scenario.frameworks:
            cells += ["not run", "not run"]
            continue
        text = {}
        for variant in scenario.variants:
            accounting = results.get(framework, {}).get(variant.name, {}).get("accounting", {})
            balanced = bool(accounting.get("balanced"))
            text[variant.name] = (
                f"{accounting.get('enqueued', 0)} = {accounting.get('succeeded', 0)} + "
                f"{accounting.get('failed', 0)} + {accounting.get('dead_lettered', 0)}"
                + ("" if balanced else f" NOT exact ({accounting.get('unfinished', 0)} unfinished)")
            )
            if variant is first:
                verdicts.append(f"{NAMES[framework]}: {'met' if balanced else 'NOT met'}")
        cells += [text[first.name], _cell(others, text)]
    rows.append(
        [
            f"{scenario.name.replace('_', ' ')}: nothing lost",
            "enqueued = ok + failed + dead, exactly",
            *cells,
            "; ".join(verdicts),
        ]
    )
    return rows


def _headers(frameworks: list[str]) -> list[str]:
    out = ["measure", "target"]
    for framework in frameworks:
        out += [f"{NAMES[framework]}: limitpal", f"{NAMES[framework]}: baseline"]
    return [*out, "limitpal target"]


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def print_details(scenario: Scenario, results: Results) -> None:
    order = [v.name for v in scenario.variants]
    for framework, variants in results.items():
        names = sorted({m for v in variants.values() for m in v["metrics"]})
        rows = [
            [name, *(fmt(variants.get(v, {}).get("metrics", {}).get(name)) for v in order)] for name in names
        ]
        rows.append(["nothing lost", *(variants.get(v, {}).get("nothing_lost", "n/a") for v in order)])
        print(f"\n{scenario.name} — {NAMES[framework]}")
        _print_table(["metric", *order], rows)


def print_headline(rows: list[list[str]], frameworks: list[str]) -> None:
    print("\nHeadline: limitpal_tasks vs the baseline, side by side in one run")
    _print_table(_headers(frameworks), rows)


def markdown(rows: list[list[str]], frameworks: list[str]) -> str:
    headers = _headers(frameworks)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def notes(summary: dict[str, Any]) -> list[str]:
    """What limits the figures, derived from the run: unfinished runs, and the known causes."""
    out = []
    for name, payload in summary.items():
        for framework, variants in payload["results"].items():
            for variant, result in variants.items():
                accounting = result["accounting"]
                if not accounting["balanced"]:
                    done = accounting["succeeded"] + accounting["failed"] + accounting["dead_lettered"]
                    out.append(
                        f"{NAMES[framework]} {variant}, {name.replace('_', ' ')}: {done} of "
                        f"{accounting['enqueued']} tasks finished before the run's time limit."
                    )
    if any("Celery baseline" in n for n in out):
        out.append(
            "Celery's `rate_limit` on the Redis transport releases about one task per second once "
            "its prefetched messages are used (Celery and kombu 5.7; celery/celery#5927), so the "
            "rate-limited Celery baselines do not finish in time; a 12-line app with only "
            '`rate_limit="100/s"` shows the same.'
        )
    return out


def write_readme(
    rows: list[list[str]], frameworks: list[str], meta: dict[str, Any], remarks: list[str]
) -> None:
    """Replace the text between the markers of README.md (adding the section if it is missing)."""
    adaptive = any(row[0].startswith("adaptive rate:") for row in rows)
    body = "\n".join(
        [
            BEGIN,
            "<!-- generated by `make scenarios` (benchmarks/scenarios/); edits here are overwritten -->",
            "",
            "Real Celery and Dramatiq workers (Redis broker, `RedisStore`) against a simulated upstream "
            "whose health and per-tenant quotas follow a script. Each scenario runs limitpal_tasks and "
            "the baseline a user would otherwise pick side by side in one run: for Celery, the task's "
            "`rate_limit` (enforced per worker instance; each run uses one `prefork -c N` instance) "
            "with `autoretry_for`, "
            "`retry_backoff` and `retry_jitter`; for Dramatiq, a `BucketRateLimiter` per tenant with the "
            "`Retries` middleware. Targets apply to limitpal_tasks; the baselines are measured for "
            "comparison. Definitions, sizes and the raw figures: `benchmarks/scenarios/` and "
            "`benchmarks/results/*.json`.",
            *(
                [
                    "",
                    "The adaptive-rate rows compare three limitpal_tasks policies instead, on Dramatiq "
                    "only, against an upstream whose capacity drops from 100/s to 30/s and comes back: an "
                    "adaptive limit (floor 5/s, ceiling 200/s; the limitpal cells) and fixed limits at its "
                    "ceiling and at its floor (the baseline cells).",
                ]
                if adaptive
                else []
            ),
            "",
            markdown(rows, frameworks),
            "",
            f"Measured {meta['when']} on a shared 2-core machine in {meta['seconds']:.0f} s "
            "(absolute numbers are noisy: re-run `make scenarios` on a quiet machine).",
            "",
            *(f"- {remark}" for remark in remarks),
            *([""] if remarks else []),
            "![Noisy neighbour: tenant B's latency and completions by tenant]"
            "(benchmarks/results/noisy_neighbour.png)",
            *(
                [
                    "",
                    "![Adaptive rate: the learned rate follows the upstream's capacity; goodput and 429 "
                    "answers of the adaptive and fixed limits](benchmarks/results/adaptive_rate.png)",
                ]
                if adaptive
                else []
            ),
            END,
        ]
    )
    text = README.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + body + tail
    else:
        section = f"## Why\n\n{body}\n\n"
        anchor = "## Quick start"
        text = (
            text.replace(anchor, section + anchor, 1) if anchor in text else text.rstrip() + "\n\n" + section
        )
    README.write_text(text, encoding="utf-8")
