"""bench/<strategy>.json against the run's own records: summary.csv's figures, the requests CSV's
per-request values, inter-token latencies consistent with the itl statistics, and the size rule."""

import json

import numpy as np
import pandas as pd
import pytest

import lorabench.outputs.bench_json as bench_json
from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.outputs.bench_json import nested_lists

STRATEGIES = ["single", "per-lora", "paged", "compressed"]


@pytest.fixture(scope="module", params=[False, True], ids=["whole-prefill", "chunked-prefill"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    chunked = dict(chunked_prefill=True, max_num_batched_tokens=512) if request.param else {}
    config = RunConfig(workload="zipf", n_loras=64, requests=120, rate=60.0, seed=5, **chunked)
    run_experiment(config, out_dir=out, progress=False)
    return out


def load(out, name):
    result = json.loads((out / "bench" / f"{name}.json").read_text())
    requests = pd.read_csv(out / "requests" / f"{name}.csv")
    summary = pd.read_csv(out / "summary.csv").set_index("strategy").loc[name]
    return result, requests, summary


@pytest.mark.parametrize("name", STRATEGIES)
def test_figures_are_summary_csvs_and_the_requests(run, name):
    result, req, row = load(run, name)
    assert result["completed"] == len(req) and result["failed"] == 0 and result["num_prompts"] == len(req)
    assert result["request_rate"] == 60.0 and result["burstiness"] == 1.0 and result["model_id"] == "mistral-7b"
    for ours, theirs in [("request_throughput", "request_throughput"), ("output_throughput", "output_throughput"),
                         ("total_token_throughput", "total_token_throughput"), ("request_goodput", "goodput")]:
        assert result[ours] == row[theirs]
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert result[f"mean_{m}_ms"] == row[f"{m}_mean_ms"]
        assert result[f"median_{m}_ms"] == result[f"p50_{m}_ms"] == row[f"{m}_p50_ms"]
        assert result[f"p90_{m}_ms"] == row[f"{m}_p90_ms"] and result[f"p99_{m}_ms"] == row[f"{m}_p99_ms"]
    # totals, duration and the per-request arrays from the requests CSV (float64 numpy)
    ttft = req["first_token_s"] - req["arrival_s"]
    e2el = req["finish_s"] - req["arrival_s"]
    assert result["duration"] == pytest.approx(req["finish_s"].max() - req["arrival_s"].min(), rel=1e-12)
    assert result["total_input_tokens"] == req["prompt_tokens"].sum()
    assert result["total_output_tokens"] == req["output_tokens"].sum()
    np.testing.assert_allclose(result["ttfts"], ttft, rtol=1e-12)
    np.testing.assert_allclose(result["latencies"], e2el, rtol=1e-12)
    np.testing.assert_allclose(result["start_times"], req["arrival_s"], rtol=0)
    assert result["input_lens"] == req["prompt_tokens"].tolist()
    assert result["output_lens"] == req["output_tokens"].tolist()
    assert result["errors"] == [""] * len(req)
    multi = req["output_tokens"] > 1
    tpot = (req["finish_s"] - req["first_token_s"])[multi] / (req["output_tokens"][multi] - 1)
    assert result["std_ttft_ms"] == pytest.approx(np.std(ttft * 1e3), rel=1e-9)
    assert result["std_tpot_ms"] == pytest.approx(np.std(tpot * 1e3), rel=1e-9)
    assert result["std_e2el_ms"] == pytest.approx(np.std(e2el * 1e3), rel=1e-9)
    # a request's ttft, itls and nothing else make up its latency, as in vLLM
    first, finish = req["first_token_s"].to_numpy(), req["finish_s"].to_numpy()
    assert [len(x) for x in result["itls"]] == (req["output_tokens"] - 1).tolist()
    np.testing.assert_allclose([sum(x) for x in result["itls"]], finish - first, rtol=1e-9, atol=1e-12)
    assert result["lorabench"]["strategy"] == name and result["lorabench"]["detailed"] is True


@pytest.mark.parametrize("name", STRATEGIES)
def test_itls_are_the_distribution_of_the_itl_statistics(run, name):
    result, req, row = load(run, name)
    itl_ms = np.concatenate([np.asarray(x, dtype=np.float64) for x in result["itls"]]) * 1e3
    assert itl_ms.mean() == pytest.approx(row["itl_mean_ms"], rel=1e-9)
    assert result["std_itl_ms"] == pytest.approx(itl_ms.std(), rel=1e-9)
    for p in (50, 90, 99):  # summary's percentiles are the lower ones (inverted CDF) of all gaps
        assert row[f"itl_p{p}_ms"] == pytest.approx(np.percentile(itl_ms, p, method="inverted_cdf"), rel=1e-9)
    # and each gap is the duration of an iteration the request was running in
    steps = pd.read_csv(run / "steps" / f"{name}.csv")
    iteration_ms = set(np.round(steps["duration_s"] / steps["iterations"] * 1e3, 9))
    assert set(np.round(itl_ms, 9)) <= iteration_ms


@pytest.mark.parametrize("name", ["single", "paged"])
def test_peak_tokens_and_concurrency_by_brute_force(run, name):
    result, req, _ = load(run, name)
    t0 = req["arrival_s"].min()
    buckets: dict[int, int] = {}
    for first, gaps in zip(req["first_token_s"], result["itls"]):  # every token's time, one at a time
        times = first + np.concatenate([[0.0], np.cumsum(gaps)])
        for b in (times - t0).astype(int):
            buckets[b] = buckets.get(b, 0) + 1
    assert result["max_output_tokens_per_s"] == max(buckets.values())
    arrival, finish = req["arrival_s"].to_numpy(), req["finish_s"].to_numpy()
    in_flight = [((arrival <= t) & (finish > t)).sum() for t in arrival]
    assert result["max_concurrent_requests"] == max(in_flight)


def test_arrays_only_for_small_runs_unless_asked(tmp_path, monkeypatch):
    base = dict(workload="zipf", n_loras=16, requests=40, seed=1, strategies=("compressed",))
    run_experiment(RunConfig(**base), out_dir=tmp_path / "auto", progress=False)
    run_experiment(RunConfig(**base, save_detailed=False), out_dir=tmp_path / "off", progress=False)
    monkeypatch.setattr(bench_json, "DETAILED_MAX_ITLS", 10)
    run_experiment(RunConfig(**base), out_dir=tmp_path / "big", progress=False)
    run_experiment(RunConfig(**base, save_detailed=True), out_dir=tmp_path / "forced", progress=False)
    arrays = {"ttfts", "itls", "latencies", "input_lens", "output_lens", "start_times", "errors"}
    for folder, has in [("auto", True), ("off", False), ("big", False), ("forced", True)]:
        for name in ("single", "compressed"):
            result = json.loads((tmp_path / folder / "bench" / f"{name}.json").read_text())
            assert (arrays <= set(result)) is has and (not arrays & set(result)) is (not has)
            assert result["lorabench"]["detailed"] is has and "mean_itl_ms" in result


def test_a_strategy_that_did_not_run_has_no_result(tmp_path):
    summary = run_experiment(RunConfig(n_loras=64, requests=50, max_loras=100_000, strategies=("per-lora",)),
                             out_dir=tmp_path / "r", progress=False)
    assert summary.loc[1, "status"] != "ok"
    assert sorted(p.name for p in (tmp_path / "r" / "bench").iterdir()) == ["single.json"]


def test_offline_and_trace_runs_say_inf_as_vllm_does(tmp_path):
    run_experiment(RunConfig(workload="offline", n_loras=8, requests=30, strategies=("compressed",)),
                   out_dir=tmp_path / "o", progress=False)
    result = json.loads((tmp_path / "o" / "bench" / "compressed.json").read_text())
    assert result["request_rate"] == "inf" and result["lorabench"]["arrival"] == "offline"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nested_lists_against_slicing_one_by_one(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, size=int(rng.integers(0, 40)))
    counts[rng.random(len(counts)) < 0.3] = 0  # empty entries anywhere
    values = rng.standard_normal(int(counts.sum())) * 10.0 ** rng.integers(-9, 9, int(counts.sum()))
    expected, at = [], 0
    for c in counts:
        expected.append([float(v) for v in values[at:at + c]])
        at += c
    assert nested_lists(values, counts) == expected
