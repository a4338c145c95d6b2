"""`vllm bench serve`-compatible results: bench/<strategy>.json in every run folder.

`vllm bench serve --save-result` writes one JSON object per run; a run folder gets one per strategy
that ran (none for a strategy whose status is not ok: summary.csv says why), with vLLM's field names
and units, so tools that read theirs read ours:

    date, backend ("lorabench"), label ("lorabench-<strategy>"), model_id, tokenizer_id (null),
    num_prompts, request_rate ("inf" for offline and trace replays, as vLLM writes for a run without
    a rate), burstiness (gamma shape), max_concurrency (null), duration (s), completed, failed (0:
    every request of a strategy that runs is served), total_input_tokens, total_output_tokens,
    request_throughput, request_goodput, output_throughput, total_token_throughput (per s),
    max_output_tokens_per_s (most output tokens in one second), max_concurrent_requests,
    {mean,median,std,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms

and with per-request detail (vLLM's --save-detailed), in seconds: input_lens, output_lens,
start_times (arrival), ttfts, itls (one list per request), latencies (e2el), errors (""). A
"lorabench" object adds what vLLM has no field for (strategy, adapters, workload, executor, SLOs).

The figures are summary.csv's (mean, p50 = median, p90, p99; goodput against the run's SLOs); std is
the population standard deviation of the same values. A request's inter-token latencies are the
durations of the iterations between its first token and its finish, which are the iterations it
decoded in (every running request decodes once per iteration), so all requests' itls together are
the distribution summary.csv's itl figures describe. With --kv-policy preempt, a preempted
request's list also holds the iterations it sat out (they still add up to e2el - ttft).

Per-request arrays grow with the run: a zipf run of 100,000 requests has about 17 million
inter-token latencies, 370 MB of JSON per strategy and about 20 s to write each. As vLLM drops them
unless --save-detailed, they are written only when a strategy has at most DETAILED_MAX_ITLS
inter-token latencies (about 2 MB of JSON and 0.1 s), unless RunConfig.save_detailed
(--save-detailed / --no-save-detailed) says otherwise.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from lorabench import __version__

DETAILED_MAX_ITLS = 100_000
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)  # those summary.csv has


def detailed(config, requests: pd.DataFrame) -> bool:
    """Whether the per-request arrays go in: the config says, else only for runs of modest size."""
    if config.save_detailed is not None:
        return config.save_detailed
    return int(np.maximum(requests["output_tokens"].to_numpy() - 1, 0).sum()) <= DETAILED_MAX_ITLS


def write_bench_result(folder: Path, row: pd.Series, requests: pd.DataFrame, steps: pd.DataFrame, config, workload,
                       model, created: datetime) -> None:
    """bench/<strategy>.json of a strategy that ran: `row` is its summary row (named by the strategy)."""
    path = folder / "bench" / f"{row.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bench_result_text(row, requests, steps, config, workload, model, created))


def bench_result_text(row: pd.Series, requests: pd.DataFrame, steps: pd.DataFrame, config, workload, model,
                      created: datetime) -> str:
    """The JSON text of one strategy's result (compact, as vLLM writes it)."""
    arrival = requests["arrival_s"].to_numpy()
    first = requests["first_token_s"].to_numpy()
    finish = requests["finish_s"].to_numpy()
    prompt = requests["prompt_tokens"].to_numpy()
    output = requests["output_tokens"].to_numpy()
    ttft, e2el = first - arrival, finish - arrival
    multi = output > 1
    tpot = (finish - first)[multi] / (output[multi] - 1)
    iteration_s, decode_tokens = _iterations(steps)

    result = {
        "date": created.strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "lorabench",
        "backend": "lorabench",
        "label": f"lorabench-{row.name}",
        "model_id": model.name,
        "tokenizer_id": None,
        "num_prompts": len(requests),
        **_traffic(workload),
        "max_concurrency": None,
        "duration": float(finish.max() - arrival.min()),
        "completed": len(requests),
        "failed": 0,
        "total_input_tokens": int(prompt.sum()),
        "total_output_tokens": int(output.sum()),
        "request_throughput": _number(row["request_throughput"]),
        "request_goodput": _number(row["goodput"]),
        "output_throughput": _number(row["output_throughput"]),
        "total_token_throughput": _number(row["total_token_throughput"]),
        "max_output_tokens_per_s": _peak_tokens_per_s(arrival, first, steps),
        "max_concurrent_requests": _peak_concurrency(arrival, finish),
    }
    spread = {"ttft": np.std(ttft), "tpot": np.std(tpot) if tpot.size else np.nan,
              "itl": _weighted_std(iteration_s, decode_tokens), "e2el": np.std(e2el)}
    for m in METRICS:
        result[f"mean_{m}_ms"] = _number(row[f"{m}_mean_ms"])
        result[f"median_{m}_ms"] = _number(row[f"{m}_p50_ms"])
        result[f"std_{m}_ms"] = _number(spread[m] * 1e3)
        for p in PERCENTILES:
            result[f"p{p}_{m}_ms"] = _number(row[f"{m}_p{p}_ms"])
    with_detail = detailed(config, requests)
    result["lorabench"] = {
        "strategy": row.name, "n_loras": int(row["n_loras"]), "workload": workload.name,
        "arrival": workload.arrival.kind, "popularity": workload.popularity.kind, "executor": row["executor"],
        "device": row["device"], "slo_ms": {"ttft": config.ttft_slo_ms, "tpot": config.tpot_slo_ms},
        "detailed": with_detail, "version": __version__,
    }
    if with_detail:
        result.update({
            "input_lens": prompt.tolist(),
            "output_lens": output.tolist(),
            "start_times": arrival.tolist(),
            "ttfts": ttft.tolist(),
            "itls": _itls(requests, steps),
            "latencies": e2el.tolist(),
            "errors": [""] * len(requests),
        })
    return json.dumps(result) + "\n"


def _traffic(workload) -> dict:
    """vLLM's request_rate and burstiness for the workload's arrival process."""
    a = workload.arrival
    if a.kind in ("offline", "trace"):
        return {"request_rate": "inf", "burstiness": 1.0}
    burstiness = {"poisson": 1.0, "gamma": a.burstiness, "constant": "inf"}[a.kind]
    return {"request_rate": a.rate, "burstiness": burstiness}


def _number(x) -> float | None:
    """A float for JSON; NaN (no such requests) as null."""
    x = float(x)
    return None if np.isnan(x) else x


def _iterations(steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per step row: the duration of one of its iterations, and its decode tokens (all iterations)."""
    iterations = steps["iterations"].to_numpy()
    return (steps["duration_s"].to_numpy() / iterations,
            (steps["tokens"] - steps["prefill_tokens"]).to_numpy())


def _weighted_std(values: np.ndarray, weights: np.ndarray) -> float:
    if weights.sum() == 0:
        return np.nan
    w = weights.astype(np.float64)
    mean = (values * w).sum() / w.sum()
    return float(np.sqrt((w * (values - mean) ** 2).sum() / w.sum()))


def _itls(requests: pd.DataFrame, steps: pd.DataFrame) -> list[list[float]]:
    """Each request's inter-token latencies: the iterations of its replica (the only one without a
    cluster) from its first token to its finish."""
    if "replica" not in steps:
        return _itls_of_one_replica(requests, steps)
    itls: list = [None] * len(requests)
    for g, on_g in requests.groupby("replica", sort=False):
        for i, itl in zip(on_g.index, _itls_of_one_replica(on_g, steps[steps["replica"] == g])):
            itls[i] = itl
    return itls


def _itls_of_one_replica(requests: pd.DataFrame, steps: pd.DataFrame) -> list[list[float]]:
    iteration_s, _ = _iterations(steps)
    lo, hi = _decode_windows(steps, requests["first_token_s"].to_numpy(), requests["finish_s"].to_numpy())
    return nested_lists(_gather(np.repeat(iteration_s, steps["iterations"].to_numpy()), lo, hi), hi - lo)


def _decode_windows(steps: pd.DataFrame, first: np.ndarray, finish: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each request, the range [lo, hi) of iterations (merged rows expanded) from its first token
    to its finish. The step after a first token starts at that instant, and no step runs idle while a
    request is running, so comparing with step starts is exact."""
    start = steps["start_s"].to_numpy()
    ends = np.concatenate([[0], np.cumsum(steps["iterations"].to_numpy())])
    return ends[np.searchsorted(start, first, "left")], ends[np.searchsorted(start, finish, "left")]


def _gather(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """values[lo[0]:hi[0]], values[lo[1]:hi[1]], ... concatenated."""
    counts = hi - lo
    offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    return values[np.arange(counts.sum()) + offsets]


def nested_lists(values: np.ndarray, counts: np.ndarray) -> list[list[float]]:
    """A list of lists, entry j holding the next counts[j] values. Writing the floats as JSON text is
    nearly all the cost (about 1 us each); slicing one list per entry adds under 5%."""
    flat, ends = values.tolist(), np.cumsum(counts).tolist()
    return [flat[end - c:end] for end, c in zip(ends, counts.tolist())]


def _peak_tokens_per_s(arrival: np.ndarray, first: np.ndarray, steps: pd.DataFrame) -> float:
    """Most output tokens in one second (vLLM's buckets: whole seconds since the first arrival):
    first tokens at their time, decode tokens at the end of their iteration."""
    k = steps["iterations"].to_numpy()
    duration = steps["duration_s"].to_numpy() / k
    within = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k) + 1  # 1 .. k in each merged row
    ends = np.repeat(steps["start_s"].to_numpy(), k) + within * np.repeat(duration, k)
    tokens = np.repeat((steps["tokens"] - steps["prefill_tokens"]).to_numpy() // k, k)
    t0 = arrival.min()
    buckets = np.concatenate([(first - t0).astype(np.int64), (ends - t0).astype(np.int64)])
    counts = np.bincount(buckets, weights=np.concatenate([np.ones(len(first)), tokens]))
    return float(counts.max())


def _peak_concurrency(arrival: np.ndarray, finish: np.ndarray) -> int:
    """Most requests in flight at once, over [arrival, finish) (a finish before an arrival at one instant)."""
    times = np.concatenate([arrival, finish])
    delta = np.concatenate([np.ones(len(arrival), np.int64), -np.ones(len(finish), np.int64)])
    order = np.lexsort((delta, times))
    return int(np.cumsum(delta[order]).max())
