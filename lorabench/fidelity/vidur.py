"""Vidur-format per-operation measurements: reading them, and holding the cost model against them.

Vidur (Microsoft's LLM-inference simulator) profiles one decoder layer's operations on a GPU and
publishes them in this layout, which any folder given to `--from-vidur` / `--vidur` must follow:

    DIR/compute/<device>/<hf model>/mlp.csv   one row per (num_tokens, num_tensor_parallel_workers):
        time_stats.<op>.median (ms per call) for the ops in `OPS`, and the model's shape
        (n_head, n_kv_head, n_embd, n_expanded_embd, vocab_size, use_gated_mlp)
    DIR/network/<device>*/all_reduce.csv      NCCL all-reduce: time_stats.all_reduce.median (ms),
        num_workers, size (bytes), devices_per_node (rows with fewer than num_workers cross nodes)

The measured layer is the sum of the ops' medians; the model's layer is one GPU's non-attention
kernels without communication (`ModeledExecutor.layer_seconds`): Vidur times the row-parallel
GEMMs without their all-reduce. Token counts are grouped in buckets 1-64, 65-128, 129-256, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.outputs.results import read_table
from lorabench.parallel import Parallel
from lorabench.presets import DeviceSpec, ModelShape
from lorabench.sim.costmodel import Efficiency, LoraSetup, ModeledExecutor
from lorabench.sim.physics import KernelPhysics

# Vidur's operation -> lorabench's kernel (lorabench.sim.physics.LAYER_KERNELS)
OPS = {
    "input_layernorm": "input_norm", "attn_pre_proj": "qkv", "attn_rope": "rope", "attn_post_proj": "o",
    "post_attention_layernorm": "post_norm", "mlp_up_proj": "gate_up", "mlp_act": "act",
    "mlp_down_proj": "down", "add": "residual",
}
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size")
ROW_COLUMNS = ("num_tokens", "num_tensor_parallel_workers")
NETWORK_COLUMNS = ("time_stats.all_reduce.median", "num_workers", "size")
SMALLEST_BUCKET = 64  # tokens: 1-64, then 65-128, 129-256, ...


@dataclass(frozen=True)
class ComputeTable:
    """One model's layer measurements on one device: `rows` has tp, num_tokens, one column per op
    (seconds, the median over repeated rows) and `layer` (their sum)."""

    source: Path
    model: ModelShape
    rows: pd.DataFrame


@dataclass(frozen=True)
class NetworkTable:
    """Intra-node all-reduce times: `rows` has gpus, nbytes, seconds."""

    source: Path
    rows: pd.DataFrame


def _numbers(df: pd.DataFrame, columns, path: Path, positive: bool = True) -> pd.DataFrame:
    """The columns (read_table checked they are there) as floats; one clear error naming the first bad
    cell (its line in the file)."""
    out = pd.DataFrame(index=df.index)
    for column in columns:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values) | ((values <= 0) if positive else (values < 0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise LorabenchError(f"{path} line {row + 2}: column {column} must be a {'positive ' if positive else ''}"
                                 f"number, got {df[column].iloc[row]!r}")
        out[column] = values.astype(np.float64)
    return out


def compute_path(root: str | Path, device: str, model: str | None = None) -> Path:
    """DIR/compute/<device>/<model>/mlp.csv; without `model`, the one model measured on `device`."""
    root = Path(root)
    if not root.is_dir():
        raise LorabenchError(f"--vidur {root}: no such folder")
    base = root / "compute" / device
    if not base.is_dir():
        found = sorted(p.name for p in (root / "compute").glob("*") if p.is_dir())
        raise LorabenchError(f"{root}: no compute/{device}/ folder (devices there: {', '.join(found) or 'none'})")
    models = sorted(str(p.parent.relative_to(base)) for p in base.rglob("mlp.csv"))
    if model is not None:
        if model not in models:
            raise LorabenchError(f"{base}: no {model}/mlp.csv (models there: {', '.join(models) or 'none'})")
        return base / model / "mlp.csv"
    if len(models) != 1:
        raise LorabenchError(f"{base}: {'no model folder with an mlp.csv' if not models else 'several models'}"
                             f"{(': ' + ', '.join(models)) if models else ''}; choose one with --model")
    return base / models[0] / "mlp.csv"


def read_compute(path: str | Path, name: str | None = None) -> ComputeTable:
    """A Vidur mlp.csv: the model's shape from its columns, and per (tp, num_tokens) each op's median."""
    path = Path(path)
    op_columns = [f"time_stats.{op}.median" for op in OPS]
    df = read_table(path, (*op_columns, *ROW_COLUMNS, *SHAPE_COLUMNS))
    ops = _numbers(df, op_columns, path)
    where = _numbers(df, ROW_COLUMNS, path)
    shape = _numbers(df, SHAPE_COLUMNS, path)
    if "use_gated_mlp" in df.columns and not df["use_gated_mlp"].astype(str).str.lower().eq("true").all():
        raise LorabenchError(f"{path}: use_gated_mlp is not true on every row; lorabench models gated (SwiGLU) MLPs only")
    if len(shape.drop_duplicates()) != 1:
        raise LorabenchError(f"{path}: the model shape ({', '.join(SHAPE_COLUMNS)}) differs between rows")
    heads, kv_heads, hidden, intermediate, vocab = (int(v) for v in shape.iloc[0])
    if name is None:  # the model folder as Vidur names it: compute/<device>/<org>/<model>/mlp.csv -> <org>/<model>
        parts = path.parent.parts
        compute = max((i for i, part in enumerate(parts) if part == "compute"), default=None)
        name = "/".join(parts[compute + 2:]) if compute is not None and compute + 2 < len(parts) else path.parent.name
    model = ModelShape(name, hidden=hidden, layers=1, heads=heads, kv_heads=kv_heads,
                       intermediate=intermediate, vocab=vocab)
    rows = pd.DataFrame({"tp": where["num_tensor_parallel_workers"].astype(int),
                         "num_tokens": where["num_tokens"].astype(int)})
    for op in OPS:
        rows[op] = ops[f"time_stats.{op}.median"] * 1e-3
    rows = rows.groupby(["tp", "num_tokens"], as_index=False).median()
    rows["layer"] = rows[list(OPS)].sum(axis=1)
    return ComputeTable(path, model, rows)


def network_path(root: str | Path, device: str) -> Path | None:
    """DIR/network/<device>*/all_reduce.csv (e.g. network/h100_dgx/), if there is one."""
    found = sorted((Path(root) / "network").glob(f"{device}*/all_reduce.csv"))
    return found[0] if found else None


def read_network(path: str | Path) -> NetworkTable:
    """A Vidur all_reduce.csv, the rows among GPUs of one node."""
    path = Path(path)
    df = read_table(path, NETWORK_COLUMNS)
    values = _numbers(df, NETWORK_COLUMNS, path)
    if "devices_per_node" in df.columns:
        per_node = _numbers(df, ("devices_per_node",), path)["devices_per_node"]
        values = values[per_node.to_numpy() >= values["num_workers"].to_numpy()]
    values = values[values["num_workers"] > 1]
    if values.empty:
        raise LorabenchError(f"{path}: no all-reduce among 2 or more GPUs of one node")
    rows = pd.DataFrame({"gpus": values["num_workers"].astype(int), "nbytes": values["size"],
                         "seconds": values["time_stats.all_reduce.median"] * 1e-3})
    return NetworkTable(path, rows.reset_index(drop=True))


def bucket(tokens) -> np.ndarray:
    """The token-count bucket of each count: '1-64', '65-128', '129-256', ..."""
    tokens = np.asarray(tokens)
    top = np.maximum(SMALLEST_BUCKET, 2 ** np.ceil(np.log2(np.maximum(tokens, 1)))).astype(int)
    return np.array([f"1-{t}" if t == SMALLEST_BUCKET else f"{t // 2 + 1}-{t}" for t in top])


def executor(model: ModelShape, device: DeviceSpec, tp: int, efficiency: Efficiency | None = None,
             physics: KernelPhysics | None = None) -> ModeledExecutor:
    """A modeled executor of `model` on one GPU of a `tp` group (its LoRA setup is never used here)."""
    lora = LoraSetup("single", np.array([16]), ("q_proj",))
    return ModeledExecutor(model, device, lora, efficiency, parallel=Parallel(tp), physics=physics)


def compare(table: ComputeTable, device: DeviceSpec, efficiency: Efficiency | None = None,
            physics: KernelPhysics | None = None) -> pd.DataFrame:
    """Per (tp, num_tokens) of the table: measured and modeled ms of the layer and their error."""
    modeled = np.empty(len(table.rows))
    for tp, rows in table.rows.groupby("tp"):
        ex = executor(table.model, device, int(tp), efficiency, physics)
        modeled[rows.index] = [ex.layer_seconds(int(n)) for n in rows["num_tokens"]]
    out = pd.DataFrame({"tp": table.rows["tp"], "num_tokens": table.rows["num_tokens"],
                        "bucket": bucket(table.rows["num_tokens"]), "measured_ms": table.rows["layer"] * 1e3,
                        "modeled_ms": modeled * 1e3})
    out["error"] = out["modeled_ms"] / out["measured_ms"] - 1
    return out


def error_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per tensor-parallel size: rows, mean absolute percentage error, the worst bucket and its error."""
    out = []
    for tp, rows in comparison.groupby("tp"):
        by_bucket = rows["error"].abs().groupby(rows["bucket"], sort=False).mean()
        out.append({"tp": int(tp), "rows": len(rows), "mape": rows["error"].abs().mean(),
                    "worst_bucket": by_bucket.idxmax(), "worst_bucket_mape": by_bucket.max()})
    return pd.DataFrame(out)


def bucket_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """Mean absolute percentage error per token bucket (rows, in token order) and tp (columns)."""
    table = comparison.assign(abs_error=comparison["error"].abs()).pivot_table(
        index="bucket", columns="tp", values="abs_error", aggfunc="mean")
    order = sorted(table.index, key=lambda b: int(b.split("-")[1]))
    return table.loc[order].rename(columns=lambda tp: f"tp {tp}")


def percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"
