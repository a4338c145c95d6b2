"""`lorabench report DIR`: one Markdown page for a sweep folder — what ran, the table, the charts.

The charts are rendered into DIR/charts/ (PNG and SVG) and the page links the PNGs by relative
path, so the folder can be moved, committed or served as is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pandas as pd

from lorabench.outputs.plots import render, title_line
from lorabench.outputs.results import write_text_atomic
from lorabench.outputs.tables import read_sweep

# (column, header, format) of the report's table; the full table is sweep.csv.
TABLE_COLUMNS = (
    ("n_loras", "adapters", "{:,.0f}"),
    ("strategy", "strategy", "{}"),
    ("output_throughput", "output tok/s", "{:,.0f}"),
    ("throughput_vs_single", "vs single", "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.2f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.2f}"),
    ("gpu_memory_peak_gib", "peak GiB", "{:.1f}"),
    ("adapter_loads", "loads", "{:,.0f}"),
    ("status", "status", "{}"),
)

CHART_CAPTIONS = {
    "relative": "Output throughput relative to single-LoRA at each number of adapters; the dashed line "
                "is the paper's headline (0.8 at over 1,000 adapters).",
    "throughput": "Output tokens/s against the number of adapters.",
    "latency": "Time to first token and time per output token, p50 and p99.",
    "memory": "GPU memory at its peak, split into base weights, KV cache and adapters.",
    "cdf": "Latency distributions of every request at one point.",
    "compression": "Reconstruction error of the jointly compressed adapters.",
}


def cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = fmt.format(value)
    return text.replace("|", "\\|")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of TABLE_COLUMNS (columns the table lacks are left out)."""
    columns = [(c, h, f) for c, h, f in TABLE_COLUMNS if c in table.columns]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if f != "{}" else "---" for _, _, f in columns) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(cell(row[c], f) for c, _, f in columns) + " |")
    return "\n".join(lines)


def describe_config(config: dict) -> str:
    run = config.get("run", {})
    if not run:
        return ""
    shown = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in run.items() if v is not None)
    return f"Run settings (from `config.json`): {shown}.\n"


def unfinished_note(config: dict, done: list[int]) -> str:
    """A warning when the sweep's grid (config.json) has points that sweep.csv does not hold yet."""
    missing = sorted(set(config.get("n_loras", [])) - set(done))
    if not missing:
        return ""
    return (f"**Unfinished sweep:** {len(missing)} of {len(missing) + len(done)} points have not run yet "
            f"({', '.join(f'{n:,}' for n in missing)} adapters); rerun the `lorabench sweep` command to finish it.\n")


def write_report(folder: str | Path, out: Path | None = None) -> Path:
    """Render the charts and write the Markdown page (default FOLDER/report.md); return its path."""
    folder = Path(folder)
    table, config = read_sweep(folder)
    out = Path(out) if out else folder / "report.md"
    charts = render(folder, "all", folder / "charts")
    modeled = set(table["executor"]) == {"modeled"}
    ns = sorted(table["n_loras"].unique())
    parts = [
        f"# lorabench sweep: {title_line(table)}\n",
        f"Every strategy served the same request stream at each of {len(ns)} points "
        f"({', '.join(f'{n:,}' for n in ns)} adapters).",
        ("Figures are **modeled** (a cost model of the device, not a run on it)."
         if modeled else "Executor(s): " + ", ".join(sorted(set(table["executor"]))) + "."),
        "Full table: [`sweep.csv`](sweep.csv); each point's run folder: `points/<n>/`.\n",
        describe_config(config),
        unfinished_note(config, ns),
        "## Charts\n",
    ]
    for kind in ("relative", "throughput", "latency", "memory", "cdf", "compression"):
        if kind in charts:
            png, svg = (Path(os.path.relpath(p, out.parent)).as_posix() for p in charts[kind])
            parts.append(f"![{kind}]({png})\n\n{CHART_CAPTIONS[kind]} ([SVG]({svg}))\n")
    not_ok = table[table["status"] != "ok"]
    parts += ["## Table\n", markdown_table(table), ""]
    if not not_ok.empty:
        parts.append(f"{len(not_ok)} row(s) have no result; their status column says why.\n")
    write_text_atomic(out, "\n".join(parts))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a sweep folder from `lorabench sweep`")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file (default: FOLDER/report.md)")


def main(args: argparse.Namespace) -> int:
    path = write_report(args.folder, args.out)
    print(f"wrote {path} (charts in {Path(args.folder) / 'charts'})")
    return 0
