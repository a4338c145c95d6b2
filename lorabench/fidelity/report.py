"""Predicted against measured serving runs: the per-run table, its errors per metric (saturated and
unsaturated runs apart), charts, and calibrate's cross-validated report."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lorabench.fidelity.batch import TALLY, Server, simulate_runs
from lorabench.fidelity.real_runs import METRICS, RealRun, saturated
from lorabench.fidelity.replay import ReplaySettings
from lorabench.outputs.results import write_csv_atomic, write_text_atomic
from lorabench.sim.costmodel import Efficiency
from lorabench.sim.engine_model import EngineFile, EngineModel

SETTINGS_COLUMNS = ("run", "n_adapters", "max_loras", "max_lora_rank", "offered_rate")


def validation_table(runs: list[RealRun], predicted: list[dict]) -> pd.DataFrame:
    """One row per run: its settings, each metric's real, predicted and error (pred / real - 1), and
    whether it was saturated, measured and predicted."""
    rows = []
    for run, pred in zip(runs, predicted):
        row = {"run": run.name, "n_adapters": run.n_adapters, "max_loras": run.max_loras,
               "max_lora_rank": run.max_lora_rank, "offered_rate": run.offered_rate}
        for m in METRICS:
            real, p = run.measured.get(m, math.nan), pred.get(m, math.nan)
            row[f"{m}_real"], row[f"{m}_pred"] = real, p
            row[f"{m}_err"] = p / real - 1 if real and math.isfinite(real) and math.isfinite(p) else math.nan
        sat = saturated(run)
        row["saturated_real"] = sat if sat is not None else pd.NA
        row["saturated_pred"] = bool(pred["saturated"])
        rows.append(row)
    return pd.DataFrame(rows)


def error_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean absolute percentage error of each metric over saturated and unsaturated runs (as measured),
    and the share of runs whose saturation was predicted right."""
    out = []
    for label, mask in (("unsaturated", table["saturated_real"] == False), ("saturated", table["saturated_real"] == True),  # noqa: E712
                        ("all", pd.Series(True, index=table.index))):
        part = table[mask.fillna(False).astype(bool)]
        row = {"runs": label, "n": len(part)}
        for m in METRICS:
            errors = part[f"{m}_err"].abs().dropna()
            row[m] = 100 * errors.mean() if len(errors) else math.nan
        known = part.dropna(subset=["saturated_real"])
        row["saturation_right"] = (100 * (known["saturated_real"].astype(bool) == known["saturated_pred"]).mean()
                                   if len(known) else math.nan)
        out.append(row)
    return pd.DataFrame(out)


def format_summary(summary: pd.DataFrame) -> str:
    shown = summary.copy()
    for c in shown.columns[2:]:
        shown[c] = shown[c].map(lambda v: "" if not math.isfinite(v) else f"{v:.1f}%")
    return shown.to_string(index=False)


def charts(table: pd.DataFrame, folder: Path) -> list[Path]:
    """Predicted against real, one panel per metric, log axes, saturated runs apart: DIR/validation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    for ax, m in zip(axes.flat, METRICS):
        for sat, colour in ((False, "tab:blue"), (True, "tab:red")):
            part = table[table["saturated_real"] == sat]
            ax.scatter(part[f"{m}_real"], part[f"{m}_pred"], s=12, c=colour,
                       label="saturated" if sat else "unsaturated")
        values = pd.concat([table[f"{m}_real"], table[f"{m}_pred"]]).replace(0, np.nan).dropna()
        if len(values):
            lo, hi = values.min(), values.max()
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # decades only: minor labels overlap on short ranges
                axis.set_minor_formatter(NullFormatter())
        ax.set_title(m)
        ax.set_xlabel("real")
        ax.set_ylabel("predicted")
    axes.flat[0].legend()
    fig.tight_layout()
    path = folder / "validation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# --- calibrate --cv --------------------------------------------------------------------------------

def folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def cross_validate(runs: list[RealRun], base: Server, settings: ReplaySettings, args, backend, cache: Path,
                   fitted: EngineFile, progress: bool) -> None:
    """K folds: fit on the others, replay the fold's runs at the fold's terms; the ideal engine's
    replays beside them; write <out>.cv.csv and <out>.cv.md."""
    from lorabench.fidelity.calibrate import fit, server_at

    started = time.time()
    whole = dataclasses.replace(settings, window_s=None)  # held-out runs: their whole duration, as measured
    predicted: list[dict | None] = [None] * len(runs)
    fold_of = np.zeros(len(runs), dtype=int)
    for f, held in enumerate(folds_of(len(runs), args.cv, args.seed)):
        train = [runs[i] for i in range(len(runs)) if i not in set(held)]
        terms, _ = fit(train, base, settings, args.passes, backend, cache, progress, label=f"fold {f + 1}/{args.cv} ")
        held_runs = [runs[i] for i in held]
        for i, p in zip(held, simulate_runs(held_runs, server_at(base, terms), whole, backend, cache,
                                            desc=f"fold {f + 1}/{args.cv} held-out", progress=progress)):
            predicted[i], fold_of[i] = p, f + 1
    ideal = Server(base.model, base.device, Efficiency(), EngineModel())
    ideal_pred = simulate_runs(runs, ideal, dataclasses.replace(whole, client_max_inflight=None), backend, cache,
                               desc="ideal engine", progress=progress)
    fitted_table, ideal_table = validation_table(runs, predicted), validation_table(runs, ideal_pred)
    both = pd.concat([fitted_table.assign(engine="vllm-v1 (cross-validated)", fold=fold_of),
                      ideal_table.assign(engine="ideal", fold=0)], ignore_index=True)
    stem = args.out.with_suffix("")
    write_csv_atomic(Path(f"{stem}.cv.csv"), both)
    seconds = time.time() - started
    text = cv_markdown(error_summary(ideal_table), error_summary(fitted_table), fitted, args, seconds)
    write_text_atomic(Path(f"{stem}.cv.md"), text)
    print(text)


def side_by_side(ideal: pd.DataFrame, fitted: pd.DataFrame) -> str:
    """A Markdown table: per metric and run group, the ideal engine's MAPE beside the fitted one's."""
    lines = ["| metric | unsaturated: ideal | unsaturated: vllm-v1 | saturated: ideal | saturated: vllm-v1 |",
             "|---|---|---|---|---|"]
    i, f = ideal.set_index("runs"), fitted.set_index("runs")
    for m in (*METRICS, "saturation_right"):
        cells = [f"{t.at[g, m]:.1f}%" if math.isfinite(t.at[g, m]) else "" for g in ("unsaturated", "saturated")
                 for t in (i, f)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = f"{int(f.at['unsaturated', 'n'])} unsaturated and {int(f.at['saturated', 'n'])} saturated runs"
    return "\n".join(lines) + f"\n\n({n}; saturation_right: runs whose saturation was predicted right.)"


# The kernel figures an engine file may hold (presets.DeviceSpec, costmodel.Efficiency): unit, meaning
KERNEL_TERMS = {
    "bf16_flops": ("FLOP/s", "matmul rate the GEMMs reach on this device"),
    "mem_bandwidth": ("B/s", "device memory bandwidth (the preset's assumption; not fitted)"),
    "lora_memory": ("", "fraction of the bandwidth the LoRA shrink/expand kernels reach"),
    "lora_empty_slot_s": ("s", "per unused LoRA slot, module and layer each step (vLLM sizes the grid by max_loras)"),
}


def terms_table(engine: EngineFile) -> str:
    """A Markdown table of an engine file's terms: value, unit, meaning."""
    rows = [(f.name, getattr(engine.engine, f.name), f.metadata["unit"], f.metadata["meaning"])
            for f in dataclasses.fields(engine.engine) if f.metadata]
    rows += [(k, v, *KERNEL_TERMS.get(k, ("", ""))) for k, v in {**engine.device, **engine.efficiency}.items()]
    return "\n".join(["| term | value | unit | meaning |", "|---|---|---|---|"]
                     + [f"| `{name}` | {value:.4g} | {unit} | {meaning} |" for name, value, unit, meaning in rows])


def cv_markdown(ideal: pd.DataFrame, fitted: pd.DataFrame, engine: EngineFile, args, seconds: float) -> str:
    return f"""# {args.out.name}: {args.cv}-fold cross-validation

Mean absolute percentage error of each metric on runs the fit did not see ({args.cv} folds: each
fitted on the other runs, {args.passes} passes, then its runs replayed), beside the `ideal` engine's
on the same runs; runs grouped by whether they were saturated as measured.

{side_by_side(ideal, fitted)}

Fitted on {engine.fit['n_runs']} runs ({', '.join(engine.fit['runs'])}), {engine.fit['model']} on
{engine.fit['device']}; the fit took {engine.fit['fit_seconds']:.0f} s ({engine.fit['replays']['simulated']}
replays simulated, {engine.fit['replays']['cached']} from the cache; load average
{', '.join(f'{x:.1f}' for x in engine.fit['load_average'])} at its end on this machine's
{os.cpu_count()} cores), the cross-validation {seconds:.0f} s more ({TALLY['simulated']} replays in all, load
average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end), with:

    {engine.fit['command']}

Terms of the full fit:

{terms_table(engine)}
"""
