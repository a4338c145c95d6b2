"""The tables of sweep and capacity folders, as charts and reports read them.

The experiments that write these folders (experiments/sweep.py, experiments/capacity.py) import the
column lists from here, so a reader (outputs/plots.py, outputs/report.py) never imports an
experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.outputs.results import read_table

# The columns every chart and the report read; a sweep.csv without one of them is refused.
REQUIRED_COLUMNS = (
    "strategy", "n_loras", "status", "output_throughput", "throughput_vs_single",
    "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
    "memory_weights_gib", "memory_kv_gib", "memory_adapters_gib",
    "device", "model", "workload", "executor",
)

# capacity.csv columns, in order; the chart reads the first ones and the context columns
CAPACITY_COLUMNS = (
    "strategy", "n_loras", "replicas", "status", "max_rate", "request_throughput", "output_throughput", "ttft_p99_ms",
    "tpot_p99_ms", "goodput_fraction", "bound_by", "failing_rate", "iterations", "objectives",
    "device", "model", "workload", "executor", "requests",
)


def point_dir(out: Path, n: int) -> Path:
    """The run folder of a sweep's point with `n` adapters."""
    return out / "points" / str(n)


def read_sweep(folder: str | Path) -> tuple[pd.DataFrame, dict]:
    """(sweep table, config) of a sweep folder, with a clear error for anything that is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorabenchError(f"{folder}: no such folder (expected a sweep folder from `lorabench sweep`)")
    path = folder / "sweep.csv"
    if not path.exists():
        hint = " (it is a single run folder: sweep it with `lorabench sweep`)" if (folder / "summary.csv").exists() else ""
        raise LorabenchError(f"{folder}: no sweep.csv, not a sweep folder{hint}")
    table = read_table(path, REQUIRED_COLUMNS)
    if not pd.api.types.is_numeric_dtype(table["n_loras"]) or table["n_loras"].isna().any():
        raise LorabenchError(f"{path}: column n_loras must hold integers")
    config = {}
    if (folder / "config.json").exists():
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError as err:
            raise LorabenchError(f"{folder / 'config.json'}: not JSON ({err})") from None
    return table, config


def read_capacity(folder: str | Path) -> pd.DataFrame:
    """The capacity.csv of a capacity folder, with a clear error for anything that is not one."""
    folder = Path(folder)
    path = folder / "capacity.csv"
    if not path.exists():
        raise LorabenchError(f"{folder}: no capacity.csv, not a folder of `lorabench capacity`")
    return read_table(path, CAPACITY_COLUMNS)


def format_number(value: float) -> str:
    """A table figure as `lorabench run` prints it: 3 significant digits below 10, else a whole
    number with thousands separators (0.896, 36, 6,313)."""
    return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"


def why_nothing_ran(table: pd.DataFrame) -> str:
    """One line for a table (summary, sweep or capacity) in which no row has status "ok": the first
    reason, with the strategies it stopped, and which others could not run either."""
    reasons = list(dict.fromkeys(table["status"].astype(str)))
    first = table[table["status"].astype(str) == reasons[0]]
    stopped = list(dict.fromkeys(first["strategy"]))
    others = [s for s in dict.fromkeys(table["strategy"]) if s not in stopped]
    line = f"{', '.join(stopped)}: {reasons[0]}" if others or len(reasons) > 1 else reasons[0]
    if others:
        line += f" ({', '.join(others)} could not run either)"
    elif len(reasons) > 1:
        line += " (and other reasons elsewhere: see the status column)"
    return line


def require_results(table: pd.DataFrame, path: Path) -> None:
    """Refuse to chart or report a table whose every row failed (one line saying why)."""
    if not (table["status"] == "ok").any():
        raise LorabenchError(f"{path}: nothing to show, no strategy ran: {why_nothing_ran(table)}")
