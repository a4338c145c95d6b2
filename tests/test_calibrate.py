"""`lorabench calibrate` and `validate --real`: planted engine terms recovered from runs simulated with
them, the runs' readers (CSV, vllm bench JSON + TOML) and their errors, validate's table."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from lorabench.cli import main as cli
from lorabench.errors import LorabenchError
from lorabench.experiments.points import InProcess
from lorabench.fidelity.batch import Server, simulate_runs
from lorabench.fidelity.calibrate import fit, fitted_parts
from lorabench.fidelity.real_runs import METRICS, RealRun, read_bench_run, read_runs_csv
from lorabench.fidelity.replay import ReplaySettings, requests_of
from lorabench.presets import device_preset, model_preset
from lorabench.sim.costmodel import Efficiency
from lorabench.sim.engine_model import VLLM_V1

PLANTED = dict(step_s=4e-3, request_s=6e-5, adapter_s=3e-4, waiting_scan_s=2e-5)


def tiny_run(i: int, n: int, max_loras: int, rate: float, duration: float = 120.0) -> RealRun:
    return RealRun(name=f"tiny-{i}", n_adapters=n, adapter_ranks=(8,), max_lora_rank=8, max_loras=max_loras,
                   max_num_seqs=64, max_num_batched_tokens=256, gpu_memory_utilization=0.9,
                   adapter_rates=tuple([rate / n] * n), duration_s=duration, mean_input_tokens=40.0,
                   mean_output_tokens=30.0)


def tiny_server(**engine) -> Server:
    return Server(model_preset("tiny"), device_preset("h100-64gb"), Efficiency(), dataclasses.replace(VLLM_V1, **engine))


def test_calibrate_recovers_planted_engine_terms():
    """Runs simulated with planted host terms (tiny model: unsaturated and saturated, few and many
    adapters per batch) are the measurements; seven passes from the default start find the planted
    terms again within 5%."""
    runs = [tiny_run(0, 2, 2, 40.0), tiny_run(1, 16, 2, 20.0), tiny_run(2, 32, 32, 20.0), tiny_run(3, 4, 4, 80.0),
            tiny_run(4, 32, 4, 80.0), tiny_run(5, 64, 64, 40.0), tiny_run(6, 2, 2, 2.0)]
    settings = ReplaySettings(seed=3, client_max_inflight=500)
    truth = simulate_runs(runs, tiny_server(**PLANTED), settings, InProcess(), None, progress=False)
    assert any(t["saturated"] for t in truth) and not all(t["saturated"] for t in truth)
    measured = [dataclasses.replace(r, measured={k: v for k, v in t.items() if k in METRICS or k == "mean_num_waiting"})
                for r, t in zip(runs, truth)]
    terms, history = fit(measured, tiny_server(), settings, 7, InProcess(), None, progress=False, free=tuple(PLANTED))
    found = fitted_parts(terms)["engine"]
    for name, value in PLANTED.items():
        assert found[name] == pytest.approx(value, rel=0.05), (name, found[name], value)
    assert history[-1]["rms_log_error_replayed"] < history[0]["rms_log_error_replayed"]


def test_replayed_lengths_have_the_runs_means_and_filter():
    run = tiny_run(0, 4, 4, 50.0, duration=400.0)
    run = dataclasses.replace(run, mean_input_tokens=223.0, mean_output_tokens=191.0)
    reqs = requests_of(run, 400.0, seed=1)
    assert reqs.prompt_tokens.min() >= 4 and reqs.prompt_tokens.max() <= 1024 and reqs.output_tokens.min() >= 4
    assert (reqs.prompt_tokens + reqs.output_tokens).max() <= 2048
    assert abs(reqs.prompt_tokens.mean() / 223 - 1) < 0.05 and abs(reqs.output_tokens.mean() / 191 - 1) < 0.05
    assert abs(len(reqs) / 20_000 - 1) < 0.05  # Poisson count of 50 req/s over 400 s
    assert np.all(np.diff(reqs.arrival_s) >= 0)


# --- the runs' readers --------------------------------------------------------------------------------

COLUMNS = dict(n_adapters=8, adapter_ranks="8 16", max_lora_rank=16, max_loras=8, max_cpu_loras=8, max_num_seqs=2048,
               gpu_memory_utilization=0.9, adapter_rates="0.025 0.05 0.1", adapter_rate_counts="2 3 3",
               offered_rate=0.5, duration_s=60.0, successful_requests=28, mean_input_tokens=60.0, mean_output_tokens=40.0,
               request_throughput=0.47, output_throughput=18.7, ttft_mean_ms=30.0, ttft_median_ms=29.0,
               tpot_mean_ms=14.0, tpot_median_ms=13.9, tpot_p99_ms=16.0, mean_num_running=1.2, mean_num_waiting=0.0,
               source="a/b")


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_runs_csv_settings_and_rates(tmp_path):
    runs = read_runs_csv(write_csv(tmp_path / "r.csv", [COLUMNS]))
    (run,) = runs
    assert run.adapter_rates == (0.1, 0.05, 0.025, 0.1, 0.05, 0.025, 0.1, 0.05)
    assert list(run.ranks()) == [8, 16] * 4 and run.max_num_batched_tokens == 2048
    assert run.measured["tpot_mean_ms"] == 14.0 and math.isclose(run.offered_rate, 0.5)


@pytest.mark.parametrize("change, message", [
    (dict(adapter_rate_counts="2 3"), "line 2: adapter_rate_counts '2 3' must give one count per rate"),
    (dict(max_loras="eight"), "line 2: max_loras must be a positive int, got 'eight'"),
    (dict(adapter_ranks="8 32"), "line 2: adapter_ranks '8 32' exceed max_lora_rank 16"),
    (dict(tpot_mean_ms="fast"), "line 2: tpot_mean_ms must be a number, got 'fast'"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization must be in \\(0, 1\\]"),
])
def test_a_bad_csv_row_is_one_clear_error(tmp_path, change, message):
    path = write_csv(tmp_path / "r.csv", [{**COLUMNS, **change}])
    with pytest.raises(LorabenchError, match=message):
        read_runs_csv(path)


def test_a_csv_without_a_setting_column_is_one_clear_error(tmp_path):
    path = write_csv(tmp_path / "r.csv", [{k: v for k, v in COLUMNS.items() if k != "duration_s"}])
    with pytest.raises(LorabenchError, match="missing column\\(s\\) duration_s"):
        read_runs_csv(path)


BENCH = {"duration": 100.0, "completed": 200, "total_input_tokens": 24_000, "total_output_tokens": 20_000,
         "request_throughput": 2.0, "output_throughput": 200.0, "total_token_throughput": 440.0,
         "request_rate": 2.0, **{f"{s}_{m}_ms": 10.0 for m in ("ttft", "tpot", "itl") for s in ("mean", "median", "p99")}}


def test_bench_json_needs_its_settings_toml(tmp_path):
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(BENCH))
    with pytest.raises(LorabenchError, match="vllm.json: no server settings beside it; write vllm.toml"):
        read_bench_run(path)
    (tmp_path / "vllm.toml").write_text("n_adapters = 4\nmax_loras = 2\nmax_lora_rank = 16\nmax_num_seqs = 128\n")
    run = read_bench_run(path)
    assert run.adapter_rates == (0.5,) * 4 and run.mean_input_tokens == 120 and run.mean_output_tokens == 100
    assert run.max_num_seqs == 128 and run.measured["tpot_p99_ms"] == 10.0
    (tmp_path / "vllm.toml").write_text("n_adapters = 4\nmax_loras = 2\nmax_lora_rank = 16\nmax_seqs = 128\n")
    with pytest.raises(LorabenchError, match="unknown field\\(s\\) max_seqs"):
        read_bench_run(path)


# --- validate --real ----------------------------------------------------------------------------------

def test_validate_real_writes_its_table_and_errors(tmp_path, capsys):
    """Two short runs replayed with an engine file: validation.csv has every metric real, predicted
    and their error, and saturation both ways; the errors table is the mean of |pred / real - 1|."""
    rows = [COLUMNS, {**COLUMNS, "adapter_rates": "0.5 1 2", "offered_rate": 7.0, "successful_requests": 400,
                      "source": "a/c"}]
    csv = write_csv(tmp_path / "runs.csv", rows)
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"engine": dataclasses.replace(VLLM_V1, step_s=2e-3).to_dict(),
                                  "fit": {"device": "h100-64gb"}}))
    out = tmp_path / "val"
    assert cli(["validate", "--real", str(csv), "--engine", str(engine), "--model", "qwen2.5-7b", "--device",
                "h100-64gb", "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out / "validation.csv")
    for m in METRICS:
        assert {f"{m}_real", f"{m}_pred", f"{m}_err"} <= set(table.columns)
        assert np.allclose(table[f"{m}_err"], table[f"{m}_pred"] / table[f"{m}_real"] - 1, equal_nan=True)
    assert {"saturated_real", "saturated_pred"} <= set(table.columns)
    errors = pd.read_csv(out / "errors.csv").set_index("runs")
    expected = 100 * table["tpot_mean_ms_err"].abs().mean()
    assert errors.at["all", "tpot_mean_ms"] == pytest.approx(expected)
    assert (out / "validation.png").is_file()
    assert "tpot_mean_ms" in capsys.readouterr().out
    assert cli(["validate", "--real", str(csv), "--engine", str(engine), "--model", "qwen2.5-7b", "--device", "h200",
                "--out", str(out), "--no-progress"]) == 2  # fitted on another device: one clear error


# --- what the runs' columns say ------------------------------------------------------------------------

def test_memory_reservation_read_off_the_kv_usage_of_runs():
    """Runs on a server that kept R bytes from a 60 GiB budget: the KV cache left by s slots holds
    (budget - R - s x slot) / (300 tokens x 56 KiB) requests; their mean running / KV usage says so,
    and fit_memory finds R again (the sampler's share: R less the CUDA context and activations)."""
    from lorabench.fidelity.traits import fit_memory

    model, device = model_preset("qwen2.5-7b"), device_preset("h100-64gb")
    engine = VLLM_V1
    slot = engine.lora_slot_bytes(model, 16)
    reserved = 5.5 * 2**30
    kv0 = device.memory_bytes * 0.9 - model.params * 2 - reserved
    per_request = 300 * 2 * 28 * 512 * 2  # tokens x K and V of 28 layers x 512 x bf16
    runs = []
    for i, loras in enumerate((8, 32, 128, 256)):
        capacity = (kv0 - loras * slot) / per_request
        runs.append(dataclasses.replace(tiny_run(i, loras, loras, 1.0), max_lora_rank=16, adapter_ranks=(16,),
                                        max_num_seqs=2048, max_num_batched_tokens=2048,
                                        measured={"mean_num_running": 0.5 * capacity, "mean_kv_usage": 0.5}))
    fitted, info = fit_memory(runs, engine, model, device)
    assert info["reserved_gib"] == pytest.approx(5.5, rel=1e-6)
    rows = 2048 * model.vocab
    sampler = (reserved - engine.non_torch_bytes - engine.activation_bytes(model, 2048)) / rows
    assert fitted.sampler_bytes_per_logit == pytest.approx(sampler, abs=1e-3)


def test_client_limit_from_the_most_saturated_runs():
    """A queue that fills at 338 req/s to a limit L and stays there averages L (1 - f / 2) open
    requests over the hour, f = L / (338 x 3600): 20,000 on average means L = 20,166 (to 100s)."""
    from lorabench.fidelity.traits import client_limit

    run = dataclasses.replace(tiny_run(0, 4, 4, 358.0, duration=3600.0),
                              measured={"mean_num_waiting": 19_500.0, "mean_num_running": 500.0,
                                        "request_throughput": 20.0})
    quiet = dataclasses.replace(tiny_run(1, 4, 4, 5.0, duration=3600.0),
                                measured={"mean_num_waiting": 0.0, "mean_num_running": 3.0, "request_throughput": 5.0})
    assert client_limit([run, quiet]) == 20_200
    assert client_limit([quiet]) is None
