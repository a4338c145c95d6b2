"""What `lorabench eval` leaves: eval.csv (one row per adapter and version), summary.csv (one row per
version) and a chart of kept improvement against reconstruction error.

Kept improvement of a version: how much of the original adapter's improvement over the base model
it keeps, (base - version) / (base - original), for the loss (lower is better) and for accuracy
(higher is better; the same formula). Summary rows average over the adapters that have rows, each
adapter counting once, and take the kept improvement of those means (a ratio of means is stable
where one adapter barely improves on the base).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from lorabench.outputs.plots import save

METRICS = ("loss", "kl_vs_original", "top1_agreement", "accuracy", "relative_error")


def kept(base: float, original: float, version: float) -> float:
    """(base - version) / (base - original); NaN when the original does not differ from the base."""
    gain = base - original
    return (base - version) / gain if gain != 0 and not math.isnan(gain) else math.nan


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per version: adapters, tokens, mean metrics, kept loss and accuracy improvement."""
    rows = table[table["tokens"] > 0]
    means = rows.groupby("version", sort=False)[list(METRICS)].mean()
    counts = rows.groupby("version", sort=False).agg(adapters=("adapter", "nunique"), tokens=("tokens", "sum"))
    out = counts.join(means)
    if not {"base", "original"} <= set(out.index):
        return out.reset_index()
    for metric in ("loss", "accuracy"):
        b, o = out.loc["base", metric], out.loc["original", metric]
        out[f"kept_{metric}_improvement"] = [kept(b, o, v) for v in out[metric]]
    return out.reset_index()


def per_adapter_kept(table: pd.DataFrame) -> pd.DataFrame:
    """Compressed versions only: adapter, version, relative_error, kept loss and accuracy improvement."""
    rows = table[table["tokens"] > 0]
    wide = {m: rows.pivot(index="adapter", columns="version", values=m) for m in ("loss", "accuracy")}
    out = []
    for version in rows["version"].unique():
        if version in ("base", "original"):
            continue
        for adapter, error in rows[rows["version"] == version].set_index("adapter")["relative_error"].items():
            record = {"adapter": adapter, "version": version, "relative_error": error}
            for metric, w in wide.items():
                record[f"kept_{metric}_improvement"] = kept(w.loc[adapter, "base"], w.loc[adapter, "original"],
                                                            w.loc[adapter, version])
            out.append(record)
    return pd.DataFrame(out)


def chart(table: pd.DataFrame, title: str) -> plt.Figure:
    """Kept loss (left) and accuracy (right) improvement against reconstruction error, one point per
    adapter and compressed version."""
    points = per_adapter_kept(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    markers = "osD^vP*Xh<>p"
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for j, (version, group) in enumerate(points.groupby("version", sort=False) if len(points) else []):
            ax.scatter(group["relative_error"], group[f"kept_{metric}_improvement"], s=14, alpha=0.7,
                       marker=markers[j % len(markers)], label=version)
        ax.axhline(1, color="0.5", lw=0.8, ls="--")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("relative reconstruction error (mean over modules)")
        ax.set_ylabel(f"kept {metric} improvement over the base model")
        ax.set_title(f"{metric}: (base - compressed) / (base - original)", fontsize=9)
        ax.grid(alpha=0.3)
    if len(points):
        axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_outputs(folder: Path, table: pd.DataFrame, title: str) -> pd.DataFrame:
    """eval.csv, summary.csv and charts/kept_improvement.{png,svg} in `folder`; returns the summary."""
    summary = summarize(table)
    table.to_csv(folder / "eval.csv", index=False, float_format="%.6g")
    summary.to_csv(folder / "summary.csv", index=False, float_format="%.6g")
    if (table["version"].isin(["base", "original"]).sum() < len(table)) and (table["tokens"] > 0).any():
        save(chart(table, title), folder / "charts" / "kept_improvement")
    return summary
