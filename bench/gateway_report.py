"""The gateway benchmark's report: the rounds of each gateway combined (medians, and the added latency against the
direct run of the same round), the Markdown tables, the targets, and the plot."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ensure_venv
from gateway_measure import CONCURRENCIES, MODES, CellResult, Run, fmt

TARGET_ADDED_P50_C1_MS = 2.0


def combine(name: str, runs: list[Run], directs: list[Run] | None = None) -> Run:
    """Rounds of one gateway (or of the direct baseline) as one: the median of each cell's numbers over the rounds.

    With ``directs`` (the direct run of each round, in the same order), the added latencies are the median, the
    smallest and the largest of the rounds' differences (gateway minus the direct run just before it).
    """
    measured = [run for run in runs if run.cells]
    first = runs[0]
    out = Run(name, first.version, first.settings)
    out.problem = next((run.problem for run in runs if run.problem), None)
    if measured:
        out.startup = statistics.median(run.startup for run in measured)
        out.idle_rss_mb = statistics.median(run.idle_rss_mb for run in measured)
    out.peak_rss_mb = max((run.peak_rss_mb for run in runs), default=0.0)
    out.processes = max((run.processes for run in runs), default=0)
    concurrencies = sorted({cell.concurrency for run in runs for cell in run.cells})
    for stream in MODES:
        for concurrency in concurrencies:
            pairs = [
                (cell, direct.cell(stream, concurrency) if directs else None)
                for run, direct in zip(runs, directs or [None] * len(runs), strict=True)
                if (cell := run.cell(stream, concurrency)) is not None
            ]
            if not pairs:
                continue
            cells = [cell for cell, _ in pairs]
            cpu = [c.cpu_ms for c in cells if c.cpu_ms is not None]
            combined = CellResult(
                stream,
                concurrency,
                sum(c.requests for c in cells),
                sum(c.errors for c in cells),
                sum(c.seconds for c in cells),
                statistics.median(c.rps for c in cells),
                statistics.median(c.p50 for c in cells),
                statistics.median(c.p99 for c in cells),
                statistics.median(c.mean for c in cells),
                statistics.median(cpu) if cpu else None,
                statistics.median(loads) if (loads := [c.loadgen_cores for c in cells if c.loadgen_cores]) else None,
                max((c.foreign for c in cells if c.foreign is not None), default=None),
                next((c.first_error for c in cells if c.first_error), None),
            )
            added50 = [cell.p50 - base.p50 for cell, base in pairs if base is not None]
            added99 = [cell.p99 - base.p99 for cell, base in pairs if base is not None]
            if added50:
                combined.added_p50 = statistics.median(added50)
                combined.added_p99 = statistics.median(added99)
                combined.added_p50_min, combined.added_p50_max = min(added50), max(added50)
            out.cells.append(combined)
    return out


def markdown(direct: Run, runs: list[Run], machine: str, rounds: int) -> str:
    lines = [
        f"Machine: {machine}. Each number: the median over {rounds} round(s).",
        "",
        "| gateway | mode | concurrency | req/s | p50 ms | p99 ms | added p50 ms | added p50 min..max | added p99 ms | "
        "gateway CPU ms/req | errors | foreign cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stream in MODES:
        for run in [direct, *runs]:
            for concurrency in CONCURRENCIES:
                cell = run.cell(stream, concurrency)
                mode = "stream" if stream else "whole"
                if cell is None:
                    lines.append(f"| {run.name} | {mode} | {concurrency} |" + " — |" * 9)
                    continue
                spread = (
                    f"{cell.added_p50_min:.2f}..{cell.added_p50_max:.2f}"
                    if cell.added_p50_min is not None and cell.added_p50_max is not None
                    else "—"
                )
                lines.append(
                    f"| {run.name} | {mode} | {concurrency} | {cell.rps:.0f} | {fmt(cell.p50)} | {fmt(cell.p99)} | "
                    f"{fmt(cell.added_p50)} | {spread} | {fmt(cell.added_p99)} | {fmt(cell.cpu_ms)} | "
                    f"{cell.errors}/{cell.requests} | {fmt(cell.foreign)} |"
                )
    lines += [
        "",
        "| gateway | version | startup s | idle RSS MiB | peak RSS MiB (process tree) | processes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.version} | {run.startup:.1f} | {run.idle_rss_mb:.0f} | "
            f"{run.peak_rss_mb:.0f} | {run.processes} |"
        )
    problems = [run for run in runs if run.problem]
    if problems:
        lines.append("")
        lines += [f"- {run.name}: not measured: {run.problem}" for run in problems]
    lines += ["", "Settings:", ""] + [f"- {run.name}: {run.settings}" for run in runs]
    lines += ["", *targets(direct, runs)]
    return "\n".join(lines) + "\n"


def targets(direct: Run, runs: list[Run]) -> list[str]:
    polychat = next((r for r in runs if r.name == "polychat" and r.cells), None)
    others = [r for r in runs if r.name != "polychat" and r.cells]
    if polychat is None:
        return ["Targets: polychat was not measured."]
    out = ["Targets:", ""]
    for stream in MODES:
        mode = "stream" if stream else "whole"
        cell = polychat.cell(stream, 1)
        if cell and cell.added_p50 is not None:
            added = cell.added_p50
            verdict = "met" if added < TARGET_ADDED_P50_C1_MS else "MISSED"
            out.append(
                f"- {mode}: added p50 at concurrency 1 = {added:.2f} ms (target < {TARGET_ADDED_P50_C1_MS} ms): "
                f"{verdict}"
            )
        for concurrency in CONCURRENCIES:
            mine = polychat.cell(stream, concurrency)
            if mine is None:
                continue
            theirs = [(r.name, c) for r in others if (c := r.cell(stream, concurrency)) is not None]
            if not theirs:
                continue
            faster = all(mine.rps > c.rps for _, c in theirs)
            lower = all((mine.added_p50 or 0.0) < (c.added_p50 or 0.0) for _, c in theirs)
            out.append(
                f"- {mode}, concurrency {concurrency}: highest req/s {'met' if faster else 'MISSED'}, "
                f"lowest added p50 {'met' if lower else 'MISSED'} "
                f"(polychat {mine.rps:.0f} req/s, +{fmt(mine.added_p50)} ms; "
                + ", ".join(f"{name} {c.rps:.0f} req/s, +{fmt(c.added_p50)} ms" for name, c in theirs)
                + ")"
            )
    return out


PLOT_CODE = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(2, 2, figsize=(11, 8))
for row, mode in enumerate(("whole", "stream")):
    for name, series in data["series"].items():
        xs = [p["c"] for p in series[mode]]
        axes[row][0].plot(xs, [p["added_p50"] for p in series[mode]], marker="o", label=name)
        axes[row][1].plot(xs, [p["rps"] for p in series[mode]], marker="o", label=name)
    xs = [p["c"] for p in data["direct"][mode]]
    axes[row][1].plot(xs, [p["rps"] for p in data["direct"][mode]], marker="x", linestyle="--", color="grey",
                      label="direct (no gateway)")
    axes[row][0].set_title(f"added p50 latency, {mode} answers")
    axes[row][1].set_title(f"requests/s, {mode} answers")
    axes[row][0].set_ylabel("ms (log)")
    axes[row][1].set_ylabel("req/s (log)")
    for ax in axes[row]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(data["concurrencies"])
        ax.set_xticklabels([str(c) for c in data["concurrencies"]])
        ax.set_xlabel("concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
fig.suptitle(data["title"], fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def plot(direct: Run, runs: list[Run], path: Path, title: str) -> str:
    data: dict[str, Any] = {"title": title, "concurrencies": list(CONCURRENCIES), "series": {}, "direct": {}}
    for stream in MODES:
        mode = "stream" if stream else "whole"
        data["direct"][mode] = [{"c": c.concurrency, "rps": c.rps} for c in direct.cells if c.stream == stream]
        for run in runs:
            points = []
            for concurrency in CONCURRENCIES:
                cell = run.cell(stream, concurrency)
                if cell and cell.added_p50 is not None:
                    points.append({"c": concurrency, "rps": cell.rps, "added_p50": max(cell.added_p50, 1e-3)})
            if points:
                data["series"].setdefault(run.name, {"whole": [], "stream": []})[mode] = points
    try:
        import matplotlib  # noqa: F401

        python = sys.executable
    except ImportError:
        python = str(ensure_venv("tools", "matplotlib", "python") / "bin" / "python")
        check = subprocess.run([python, "-c", "import matplotlib"], capture_output=True)
        if check.returncode != 0:
            subprocess.run([python, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(data, handle)
    try:
        subprocess.run([python, "-c", PLOT_CODE, handle.name, str(path)], check=True)
    finally:
        os.unlink(handle.name)
    return python
