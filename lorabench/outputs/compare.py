"""`lorabench compare FILE.json RUN_DIR`: a real `vllm bench serve` result beside a lorabench run.

FILE.json is what `vllm bench serve --save-result` wrote; RUN_DIR a `lorabench run` folder, whose
bench/<strategy>.json has the same fields (bench_json.py). For every metric both have, the table
gives vLLM's figure, lorabench's (each strategy, or --strategy's) and the relative difference
lorabench / vllm - 1. Above it, the settings of both (request rate, burstiness, prompts, mean input
and output tokens, adapters), with a warning for each that differs: the comparison means something
only for the same settings. vLLM's result does not record the adapters; pass
`--metadata n_loras=N` to `vllm bench serve` and compare checks them too.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.outputs.results import write_csv_atomic
from lorabench.strategies import STRATEGIES

# Fields `vllm bench serve --save-result` always writes for a generation run.
REQUIRED = (
    "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput",
    *[f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl") for s in ("mean", "median", "p99")],
)
# Rows of the table, in order; those missing from either side are left out.
COMPARED = (
    "duration", "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    *[f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p90", "p99")],
)
LENGTH_TOLERANCE = 0.05  # mean lengths this close count as the same setting (datasets are sampled)


def read_result(path: str | Path, source: str | None = None) -> dict:
    """A `vllm bench serve` result JSON (or a lorabench bench/*.json), checked for the fields compared."""
    path = Path(path)
    name = source or str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise LorabenchError(f"{name}: cannot read ({err.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        lines = [line for line in text.splitlines() if line.strip()]
        if err.msg == "Extra data" and len(lines) > 1:
            raise LorabenchError(f"{name}: holds {len(lines)} results (vllm bench serve --append-result); keep "
                                 "the one to compare in a file of its own") from None
        raise LorabenchError(f"{name}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise LorabenchError(f"{name}: not a vllm bench serve result (a JSON object)")
    missing = [f for f in REQUIRED if f not in data]
    if missing:
        raise LorabenchError(f"{name}: missing field(s) {', '.join(missing)}; expected the JSON of "
                             "`vllm bench serve --save-result`")
    for f in (*REQUIRED, *(c for c in COMPARED if data.get(c) is not None)):
        if isinstance(data[f], bool) or not isinstance(data[f], (int, float)):
            raise LorabenchError(f"{name}: field {f} must be a number, got {data[f]!r}")
    if not data["completed"]:
        raise LorabenchError(f"{name}: completed is 0: no request of that benchmark was served")
    return data


def run_results(run_dir: str | Path, strategy: str | None) -> dict[str, dict]:
    """The bench results of a run folder by strategy (all that ran, or the one asked for)."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.csv").is_file():
        raise LorabenchError(f"{run_dir}: not a run folder (no summary.csv); give a `lorabench run` folder")
    bench = run_dir / "bench"
    if not bench.is_dir():
        raise LorabenchError(f"{run_dir}: no bench/ folder (the run predates it); rerun it: lorabench run with the "
                             f"settings of {run_dir / 'config.json'}")
    found = {p.stem: p for p in bench.glob("*.json")}
    status = pd.read_csv(run_dir / "summary.csv").set_index("strategy")["status"]
    if strategy is not None:
        if strategy not in found:
            why = f"its status is {status[strategy]!r}" if strategy in status.index else "it was not run"
            raise LorabenchError(f"--strategy {strategy}: no result in {bench} ({why}); there are: "
                                 f"{', '.join(sorted(found)) or 'none'}")
        found = {strategy: found[strategy]}
    if not found:
        raise LorabenchError(f"{bench}: no strategy results (no strategy of the run had status ok)")
    order = sorted(found, key=lambda s: (STRATEGIES.index(s) if s in STRATEGIES else len(STRATEGIES), s))
    return {s: read_result(found[s]) for s in order}


def settings(result: dict) -> dict[str, object]:
    """What a benchmark's settings were, from its result."""
    done = result["completed"]
    return {
        "request rate": result.get("request_rate"),
        "burstiness": result.get("burstiness"),
        "num prompts": result.get("num_prompts", done),
        "mean input tokens": result["total_input_tokens"] / done,
        "mean output tokens": result["total_output_tokens"] / done,
        "adapters": (result.get("lorabench") or {}).get("n_loras", result.get("n_loras")),
    }


def _as_number(value) -> float | None:
    """Rates may be numbers, numeric strings (--metadata) or "inf"; None when unknown."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def differing(vllm: dict, ours: dict) -> list[str]:
    """The settings that differ (unknown ones are not compared)."""
    out = []
    for key in vllm:
        a, b = _as_number(vllm[key]), _as_number(ours[key])
        if a is None or b is None:
            continue
        tolerance = LENGTH_TOLERANCE if key.startswith("mean") else 1e-9
        same = a == b or (math.isfinite(a) and math.isfinite(b) and abs(b - a) <= tolerance * abs(a))
        if not same:
            out.append(f"{key}: vllm {vllm[key]}, lorabench {ours[key]}")
    return out


def compare_table(vllm: dict, ours: dict[str, dict]) -> pd.DataFrame:
    """Long table: metric, vllm, strategy, lorabench, relative_difference (lorabench / vllm - 1)."""
    rows = []
    for metric in COMPARED:
        if vllm.get(metric) is None:
            continue
        for name, result in ours.items():
            if result.get(metric) is None:
                continue
            v, x = float(vllm[metric]), float(result[metric])
            rows.append({"metric": metric, "vllm": v, "strategy": name, "lorabench": x,
                         "relative_difference": x / v - 1 if v else math.nan})
    return pd.DataFrame(rows, columns=["metric", "vllm", "strategy", "lorabench", "relative_difference"])


def _fmt(v) -> str:
    if isinstance(v, str) or v is None:
        return "?" if v is None else v
    return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def format_report(vllm_path: str, run_dir: str, vllm: dict, ours: dict[str, dict], table: pd.DataFrame) -> str:
    first = next(iter(ours.values()))
    ours_settings, vllm_settings = settings(first), settings(vllm)
    about = first.get("lorabench", {})
    lines = [f"vllm bench serve: {vllm_path} (backend {vllm.get('backend', '?')}, model {vllm.get('model_id', '?')}, "
             f"{vllm.get('date', '?')})",
             f"lorabench: {run_dir} ({about.get('executor', '?')} executor, model {first.get('model_id')}, "
             f"device {about.get('device', '?')})", ""]
    frame = pd.DataFrame({"setting": list(vllm_settings), "vllm": [_fmt(v) for v in vllm_settings.values()],
                          "lorabench": [_fmt(v) for v in ours_settings.values()]})
    lines.append(frame.to_string(index=False))
    for diff in differing(vllm_settings, ours_settings):
        lines.append(f"WARNING: settings differ, {diff}")
    cell = {(r.metric, r.strategy): r for r in table.itertuples()}
    metrics = list(dict.fromkeys(table["metric"]))
    shown = pd.DataFrame({"metric": metrics, "vllm": [_fmt(vllm[m]) for m in metrics]})
    for name in ours:
        found = [cell.get((m, name)) for m in metrics]
        shown[name] = [_fmt(c.lorabench) if c else "" for c in found]
        shown[f"{name} vs vllm"] = [f"{c.relative_difference:+.1%}" if c and math.isfinite(c.relative_difference)
                                    else "n/a" if c else "" for c in found]
    lines += ["", shown.to_string(index=False), "",
              "vs vllm: lorabench / vllm - 1 (times in ms, throughputs per second)."]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", metavar="FILE.json", help="a `vllm bench serve --save-result` JSON")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `lorabench run` folder with the same settings")
    p.add_argument("--strategy", help="compare only this strategy (default: every strategy that ran)")
    p.add_argument("--out", type=Path, help="also write the table as CSV (metric, vllm, strategy, lorabench, "
                   "relative_difference)")


def main(args: argparse.Namespace) -> int:
    vllm = read_result(args.result)
    ours = run_results(args.run_dir, args.strategy)
    table = compare_table(vllm, ours)
    print(format_report(args.result, args.run_dir, vllm, ours, table))
    if args.out is not None:
        write_csv_atomic(args.out, table)
        print(f"wrote {args.out}")
    return 0
