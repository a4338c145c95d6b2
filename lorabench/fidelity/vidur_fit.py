"""Fit a device's kernel physics and GPU link to Vidur-format measurements (`lorabench profile --from-vidur`).

What is fitted is physics, not the table: the `KernelPhysics` factors of lorabench.sim.physics (how
much of an SM's tensor-core rate a tile sustains, a tile's and a kernel's fixed costs, the fractions
of memory bandwidth GEMMs and elementwise kernels stream at, one thread block's bandwidth), and
which of the device's library tile shapes (DeviceSpec.gemm_tiles) explains the measured steps best.
Least squares on log(modeled / measured) of every op and of the layer's sum, with a robust loss (a
few odd kernels must not drag the fit) and every token bucket (1-64, 65-128, ...) weighted alike, so
the 200 prefill-sized rows do not drown the decode-sized ones.

By default only the rows of one GPU (tp 1) are fitted; the tp 2, 4 and 8 rows (other GEMM shapes)
are then a held-out check. Two more cross-checks refit on part of the data and score the rest: every
other token count, and every op but the largest GEMM (mlp_up_proj). The link: latency + 2 (n - 1) / n
x bytes / bus bandwidth, fitted to the intra-node all-reduce rows.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from tqdm.auto import tqdm

from lorabench import __version__
from lorabench.errors import LorabenchError
from lorabench.fidelity import vidur
from lorabench.parallel import shard
from lorabench.presets import DeviceSpec
from lorabench.sim import physics
from lorabench.sim.physics import KernelPhysics

# Fitted KernelPhysics fields with their bounds (fractions; seconds; bytes/s).
BOUNDS = {
    "gemm_flops": (0.05, 1.0), "gemm_tile_s": (1e-8, 1e-4), "gemm_memory": (0.05, 1.0),
    "gemm_kernel_s": (1e-8, 1e-4), "elementwise_memory": (0.05, 1.0), "row_kernel_s": (1e-8, 1e-4),
    "row_bandwidth": (1e8, 1e12), "flat_kernel_s": (1e-8, 1e-4),
}
LOSS_SCALE = 0.05  # residuals (log ratios) beyond about 5% count linearly, not squared
HELD_OUT_OP = "mlp_up_proj"  # the op left out by the op cross-check


def predict_ops(table: vidur.ComputeTable, device: DeviceSpec, kernel_physics: KernelPhysics) -> pd.DataFrame:
    """Modeled seconds of every op (Vidur's names) for every row of the table."""
    return pd.DataFrame(_predict(table, device, kernel_physics), index=table.rows.index, columns=list(vidur.OPS))


def _predict(table: vidur.ComputeTable, device: DeviceSpec, kernel_physics: KernelPhysics) -> np.ndarray:
    """`predict_ops` as an array (rows x ops, in the order of vidur.OPS)."""
    out = np.empty((len(table.rows), len(vidur.OPS)))
    tps = table.rows["tp"].to_numpy()
    tokens = table.rows["num_tokens"].to_numpy()
    for tp in np.unique(tps):
        where = tps == tp
        kernels = physics.layer_kernels(tokens[where], shard(table.model, int(tp)), device, kernel_physics)
        out[where] = np.column_stack([kernels[kernel] for kernel in vidur.OPS.values()])
    return out


def _bucket_weights(rows: pd.DataFrame) -> np.ndarray:
    """Per row, 1 / sqrt(rows in its (tp, bucket)): each bucket weighs alike in a squared loss."""
    groups = [rows["tp"], vidur.bucket(rows["num_tokens"])]
    return 1 / np.sqrt(rows.groupby(groups)["num_tokens"].transform("count").to_numpy())


def fit_kernels(table: vidur.ComputeTable, device: DeviceSpec, rows: pd.Series | None = None,
                ops: tuple[str, ...] = tuple(vidur.OPS), on_tile=None) -> KernelPhysics:
    """The KernelPhysics (tile among device.gemm_tiles, factors within BOUNDS) that best explains the
    table's selected `rows` (a boolean mask; default all) through `ops` and the layer sums.
    `on_tile()` is called after each tile's fit (progress)."""
    chosen = table.rows if rows is None else table.rows[rows.to_numpy()]
    if chosen.empty:
        raise LorabenchError(f"{table.source}: no rows to fit")
    fitted = vidur.ComputeTable(table.source, table.model, chosen)
    weights = _bucket_weights(chosen)
    measured = np.log(chosen[list(ops)].to_numpy())
    layer = np.log(chosen["layer"].to_numpy())
    columns = [list(vidur.OPS).index(op) for op in ops]
    names = list(BOUNDS)
    low, high = (np.log([BOUNDS[n][i] for n in names]) for i in (0, 1))
    best = None
    for tile in device.gemm_tiles:
        def residuals(x, tile=tile):
            guess = KernelPhysics(gemm_tile=tile, **dict(zip(names, np.exp(x))))
            predicted = _predict(fitted, device, guess)
            ops_error = np.log(predicted[:, columns]) - measured
            layer_error = np.log(predicted.sum(axis=1)) - layer
            return np.concatenate([(ops_error * weights[:, None]).ravel(), layer_error * weights])

        start = np.clip([np.log(getattr(KernelPhysics(), n)) for n in names], low + 1e-9, high - 1e-9)
        result = least_squares(residuals, start, bounds=(low, high), loss="soft_l1", f_scale=LOSS_SCALE)
        if on_tile is not None:
            on_tile()
        if best is None or result.cost < best[0]:
            best = (result.cost, KernelPhysics(gemm_tile=tile, **dict(zip(names, np.exp(result.x)))))
    return best[1]


def fit_link(network: vidur.NetworkTable) -> tuple[float, float, float]:
    """(latency s, bus bandwidth bytes/s, mean absolute error) of the all-reduce model on the table."""
    rows = network.rows
    share = 2 * (rows["gpus"] - 1) / rows["gpus"] * rows["nbytes"]

    def residuals(x):
        return np.log(np.exp(x[0]) + share / np.exp(x[1])) - np.log(rows["seconds"])

    result = least_squares(residuals, np.log([2e-5, 2e11]), loss="soft_l1", f_scale=0.1)
    latency, bandwidth = np.exp(result.x)
    error = (latency + share / bandwidth) / rows["seconds"] - 1
    return float(latency), float(bandwidth), float(error.abs().mean())


def _summary(comparison: pd.DataFrame) -> dict:
    return {f"tp {int(r.tp)}": {"rows": int(r.rows), "mape": round(float(r.mape), 4), "worst_bucket": r.worst_bucket,
                                "worst_bucket_mape": round(float(r.worst_bucket_mape), 4)}
            for r in vidur.error_summary(comparison).itertuples()}


def _held_out_mape(comparison: pd.DataFrame, held_out: np.ndarray) -> float:
    return round(float(comparison.loc[held_out, "error"].abs().mean()), 4)


def cross_checks(table: vidur.ComputeTable, device: DeviceSpec, fit_rows: pd.Series, on_tile=None) -> dict:
    """Refit on part of the fitted rows and score the rest (module docstring)."""
    fit_rows = fit_rows.to_numpy()
    counts = np.sort(table.rows.loc[fit_rows, "num_tokens"].unique())
    even = table.rows["num_tokens"].isin(counts[::2]).to_numpy()
    half = fit_kernels(table, device, pd.Series(fit_rows & even), on_tile=on_tile)
    tokens = vidur.compare(table, device, physics=half)
    ops = tuple(op for op in vidur.OPS if op != HELD_OUT_OP)
    no_op = fit_kernels(table, device, pd.Series(fit_rows), ops=ops, on_tile=on_tile)
    predicted = predict_ops(table, device, no_op)[HELD_OUT_OP]
    op_error = (predicted / table.rows[HELD_OUT_OP] - 1)[fit_rows].abs().mean()
    return {
        "tokens": {"fitted on": "every other token count of the fitted rows",
                   "held-out mape": _held_out_mape(tokens, fit_rows & ~even)},
        "op": {"fitted on": f"every op but {HELD_OUT_OP}", f"{HELD_OUT_OP} mape": round(float(op_error), 4),
               "layer mape": _held_out_mape(vidur.compare(table, device, physics=no_op), fit_rows)},
    }


def fit_profile(root, device: DeviceSpec, model: str | None = None, fit_tp: tuple[int, ...] | None = (1,),
                command: str = "", progress: bool = True) -> dict:
    """The profile JSON (device link figures, kernel physics, meta with fidelity and cross-checks) of
    `device` from the Vidur-format folder `root`. `fit_tp`: the tensor-parallel sizes whose rows are
    fitted (None: all); the others are held out."""
    started = time.perf_counter()
    table = vidur.read_compute(vidur.compute_path(root, device.name, model), model)
    if fit_tp is None:
        fit_rows = pd.Series(True, index=table.rows.index)
    else:
        fit_rows = table.rows["tp"].isin(fit_tp)
        if not fit_rows.any():
            raise LorabenchError(f"{table.source}: no rows with tensor-parallel size {', '.join(map(str, fit_tp))}")
    bar = tqdm(total=3 * len(device.gemm_tiles), desc=f"fit {device.name}", unit="fit", disable=not progress or None)
    kernels = fit_kernels(table, device, fit_rows, on_tile=bar.update)
    checks = cross_checks(table, device, fit_rows, on_tile=bar.update)
    bar.close()
    comparison = vidur.compare(table, device, physics=kernels)
    profile = {"device": {}, "kernels": {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in dataclasses.asdict(kernels).items()}}
    sizes = "every tensor-parallel size" if fit_tp is None else "tp " + ", ".join(map(str, fit_tp))
    meta = {
        "source": f"Vidur-format measurements in {root}",
        "compute": str(table.source), "model": table.model.name, "device": device.name,
        "fitted_on": f"{int(fit_rows.sum())} rows ({sizes}; {table.rows['num_tokens'].min()}-"
                     f"{table.rows['num_tokens'].max()} tokens)",
        "held_out": "none" if fit_rows.all() else f"{int((~fit_rows).sum())} rows of the other tensor-parallel sizes",
        "fidelity": _summary(comparison),
        "cross_checks": checks,
    }
    link = vidur.network_path(root, device.name)
    if link is not None:
        network = vidur.read_network(link)
        latency, bandwidth, error = fit_link(network)
        profile["device"] = {"link_latency_s": latency, "link_bandwidth": bandwidth}
        meta["link"] = {"source": str(network.source), "rows": len(network.rows), "gpus": sorted(
            int(g) for g in network.rows["gpus"].unique()), "mape": round(error, 4)}
    meta.update(command=command, lorabench_version=__version__, date=time.strftime("%Y-%m-%d"),
                seconds=round(time.perf_counter() - started, 1))
    profile["meta"] = meta
    return profile
