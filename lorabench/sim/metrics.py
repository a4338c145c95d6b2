"""Per-request and per-step records of a run, and the summary row (serving-benchmark metric names).

ttft = first token - arrival; tpot = (finish - first token) / (output tokens - 1) for requests of more
than one output token; itl = the gaps between consecutive tokens of a request, which are the
durations of the iterations it decoded in (each iteration gives every running request one token),
so their distribution is the step durations weighted by decode tokens; e2el = finish - arrival.
Throughputs are over the makespan, first arrival to last finish. Goodput: requests per second that
met both SLOs (ttft and tpot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lorabench.sim.engine import STEP_FIELDS, RunResult

GIB = 2**30
PERCENTILES = (50, 90, 99)

REQUEST_COLUMNS = ("id", "adapter", "arrival_s", "first_token_s", "finish_s", "prompt_tokens", "output_tokens")
STEP_COLUMNS = STEP_FIELDS

# summary.csv columns, in order (the contract with sweeps and plots)
SUMMARY_COLUMNS = (
    "strategy", "n_loras", "status", "output_throughput", "throughput_vs_single", "request_throughput",
    "total_token_throughput",
    *[f"{m}_{s}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "p50", "p90", "p99")],
    "goodput", "gpu_memory_peak_gib", "memory_weights_gib", "memory_kv_gib", "memory_adapters_gib",
    "adapter_loads", "adapter_load_gib", "load_stall_s", "adapter_hit_rate", "mean_batch_size",
    "mean_distinct_adapters", "device", "model", "workload", "executor", "requests",
)
# and, for a cluster of replicas, after them: load_imbalance is the busiest replica's tokens (prompt +
# output) over the mean replica's (1 = even); the hit rates are the lowest and highest of a replica.
CLUSTER_COLUMNS = ("replicas", "router", "load_imbalance", "replica_hit_rate_min", "replica_hit_rate_max")
REPLICA_COLUMNS = ("replica", "requests", "prompt_tokens", "output_tokens", "busy_s", "steps", "adapter_loads",
                   "adapter_hit_rate", "preemptions", "gpu_memory_peak_gib")


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput (milliseconds)."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0


def _stats(name: str, values_s: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    out = {}
    if len(values_s) == 0:
        return {f"{name}_{s}_ms": float("nan") for s in ("mean", "p50", "p90", "p99")}
    ms = values_s * 1e3
    if weights is None:
        out[f"{name}_mean_ms"] = float(ms.mean())
        for p in PERCENTILES:
            out[f"{name}_p{p}_ms"] = float(np.percentile(ms, p))
        return out
    order = np.argsort(ms)
    ms, w = ms[order], weights[order].astype(np.float64)
    cum = np.cumsum(w) / w.sum()
    out[f"{name}_mean_ms"] = float((ms * w).sum() / w.sum())
    for p in PERCENTILES:
        out[f"{name}_p{p}_ms"] = float(ms[min(np.searchsorted(cum, p / 100), len(ms) - 1)])
    return out


def requests_frame(result: RunResult) -> pd.DataFrame:
    r = result.requests
    values = (r.id, r.adapter, r.arrival_s, result.first_token_s, result.finish_s, r.prompt_tokens, r.output_tokens)
    frame = pd.DataFrame(dict(zip(REQUEST_COLUMNS, values)))
    if result.replica is not None:
        frame["replica"] = result.replica
    return frame


def replicas_frame(result: RunResult) -> pd.DataFrame:
    return pd.DataFrame(result.replica_stats, columns=list(REPLICA_COLUMNS))


def steps_frame(result: RunResult) -> pd.DataFrame:
    return pd.DataFrame(result.steps)


def summarize(result: RunResult, slo: SLO = SLO()) -> dict:
    """The summary row of one strategy (columns of SUMMARY_COLUMNS that depend on the run)."""
    r = result.requests
    ttft = result.first_token_s - r.arrival_s
    e2el = result.finish_s - r.arrival_s
    multi = r.output_tokens > 1
    tpot_all = (result.finish_s - result.first_token_s) / np.maximum(r.output_tokens - 1, 1)
    tpot = tpot_all[multi]
    makespan = float(result.finish_s.max() - r.arrival_s.min())
    st = result.steps
    decode_tokens = st["tokens"] - st["prefill_tokens"]
    iteration_s = st["duration_s"] / st["iterations"]
    good = (ttft * 1e3 <= slo.ttft_ms) & (~multi | (tpot_all * 1e3 <= slo.tpot_ms))
    out = {
        "output_throughput": r.output_tokens.sum() / makespan,
        "request_throughput": len(r) / makespan,
        "total_token_throughput": (r.output_tokens.sum() + r.prompt_tokens.sum()) / makespan,
        **_stats("ttft", ttft), **_stats("tpot", tpot),
        **_stats("itl", iteration_s, decode_tokens), **_stats("e2el", e2el),
        "goodput": float(good.sum()) / makespan,
        "gpu_memory_peak_gib": result.peak_total_bytes / GIB,
        "memory_weights_gib": result.plan.weights / GIB,
        "memory_kv_gib": result.peak_kv_bytes / GIB,
        "memory_adapters_gib": result.peak_adapter_bytes / GIB,
        "adapter_loads": result.adapter_loads,
        "adapter_load_gib": result.adapter_load_bytes / GIB,
        "load_stall_s": result.load_stall_s,
        "adapter_hit_rate": result.adapter_hit_rate,
        "mean_batch_size": float((st["batch_size"] * st["iterations"]).sum() / st["iterations"].sum()),
        "mean_distinct_adapters": float((st["distinct_adapters"] * st["iterations"]).sum() / st["iterations"].sum()),
        "requests": len(r),
    }
    if result.replica_stats is not None:
        tokens = np.array([x["prompt_tokens"] + x["output_tokens"] for x in result.replica_stats], dtype=np.float64)
        hits = [x["adapter_hit_rate"] for x in result.replica_stats]
        out.update(replicas=len(tokens), router=result.router, load_imbalance=float(tokens.max() / tokens.mean()),
                   replica_hit_rate_min=float(np.nanmin(hits)) if not np.isnan(hits).all() else np.nan,
                   replica_hit_rate_max=float(np.nanmax(hits)) if not np.isnan(hits).all() else np.nan)
    return out
