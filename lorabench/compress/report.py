"""Error reports of a compressed collection: errors.csv, summary.json and the printed table.

errors.csv: one row per adapter and module: adapter, layer, module, cluster, relative_error, norm
(||scaling * B A||_F). summary.json: mean_error and max_error over those rows, bytes_gpu (shared
bases + every core), bytes_uncompressed (every A and B), the same as params_*, seconds, settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from lorabench.adapters.types import ModuleKey
from lorabench.compress.fit import ModuleFit
from lorabench.presets import GIB

ERRORS_FILE = "errors.csv"
SUMMARY_FILE = "summary.json"


def error_rows(key: ModuleKey, names: list[str], fit: ModuleFit) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "adapter": names,
            "layer": key.layer,
            "module": key.module,
            "cluster": fit.cluster_of.cpu().numpy(),
            # an all-zero adapter has no relative error (0 / 0): empty here, and counted apart in the summary
            "relative_error": torch.where(fit.norms2 > 0, fit.errors, torch.nan).cpu().numpy(),
            "norm": fit.norms2.cpu().sqrt().numpy(),
        }
    )


def summarize(errors: pd.DataFrame, modules: list[dict], seconds: float, **settings) -> dict:
    bytes_gpu, bytes_uncompressed = (sum(m[k] for m in modules) for k in ("bytes_gpu", "bytes_uncompressed"))
    zero = errors[errors["norm"] == 0]
    return {
        "mean_error": float(errors["relative_error"].mean()),  # over the adapters that are not all zero
        "max_error": float(errors["relative_error"].max()),
        "zero_norm_rows": len(zero),  # (adapter, module) pairs whose delta is all zero: left out of the errors
        "zero_norm_adapters": sorted(set(zero["adapter"])),
        "bytes_gpu": int(bytes_gpu),
        "bytes_uncompressed": int(bytes_uncompressed),
        "params_gpu": sum(m["params_gpu"] for m in modules),
        "params_uncompressed": sum(m["params_uncompressed"] for m in modules),
        "compression_ratio": bytes_uncompressed / bytes_gpu if bytes_gpu else None,
        "seconds": float(seconds),
        "n_adapters": int(errors["adapter"].nunique()),
        "n_modules": len(modules),
        "clusters_used": sum(m["clusters"] for m in modules) / len(modules),  # mean K over modules
        **settings,
    }


def zero_note(summary: dict) -> list[str]:
    """A line naming the adapters with all-zero modules, which the errors leave out."""
    names = summary.get("zero_norm_adapters") or []
    if not names:
        return []
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return [f"{len(names)} adapter(s) have all-zero modules ({summary['zero_norm_rows']} adapter-modules: {shown}); "
            "their error is undefined and left out of the mean and max"]


def write_reports(folder: Path, errors: pd.DataFrame, summary: dict) -> None:
    errors.to_csv(folder / ERRORS_FILE, index=False, float_format="%.6g")
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def summary_table(errors: pd.DataFrame, modules: list[dict], summary: dict) -> str:
    """Per module type: layers, shape, clusters, mean and max error; then the totals."""
    by_type = pd.DataFrame(modules).assign(module=lambda d: d["name"].str.split(".").str[-1])
    table = by_type.groupby("module", sort=False).agg(
        layers=("name", "size"), d_out=("d_out", "first"), d_in=("d_in", "first"), clusters=("clusters", "mean")
    )
    errs = errors.groupby("module", sort=False)["relative_error"].agg(mean_error="mean", max_error="max")
    table = table.join(errs).reset_index()
    lines = [
        table.to_string(index=False, formatters={
            "clusters": "{:.1f}".format, "mean_error": "{:.4f}".format, "max_error": "{:.4f}".format}),
        "",
        f"adapters {summary['n_adapters']}, modules {summary['n_modules']}: "
        f"mean error {summary['mean_error']:.4f}, max error {summary['max_error']:.4f}",
        *zero_note(summary),
        f"GPU bytes {summary['bytes_gpu'] / GIB:.4f} GiB (bases + cores) vs {summary['bytes_uncompressed'] / GIB:.4f} GiB "
        f"uncompressed ({summary['compression_ratio']:.1f}x smaller), {summary['seconds']:.1f} s",
    ]
    return "\n".join(lines)
