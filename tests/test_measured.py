"""The measured executor in the simulator's loop, on the CPU with the tiny preset."""

import numpy as np
import pandas as pd
import pytest
import torch

import lorabench.sim.measured as measured
from lorabench.runner import RunConfig, run_experiment
from lorabench.sim.executor import Step

THREADS = torch.get_num_threads()

# Short requests of mixed ranks: a few hundred steps in all.
WORKLOAD = """
name = "tiny-zipf"
n_loras = 6
requests = 12
seed = 3
[arrival]
kind = "poisson"
rate = 400.0
[popularity]
kind = "zipf"
alpha = 1.0
[prompt]
kind = "uniform"
lo = 4
hi = 40
[output]
kind = "uniform"
lo = 2
hi = 12
[adapters]
ranks = [4, 8]
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
compressed_rank = 16
"""


@pytest.fixture
def small(tmp_path, monkeypatch):
    torch.set_num_threads(1)  # steadier on a shared CPU; restored below
    path = tmp_path / "tiny-zipf.toml"
    path.write_text(WORKLOAD)
    yield dict(workload=str(path), model="tiny", max_num_seqs=8, max_num_batched_tokens=512)
    torch.set_num_threads(THREADS)


@pytest.fixture
def executors(monkeypatch):
    """Every executor the runner makes, by strategy."""
    made = {}
    real = measured.make_executor

    def spy(config, model, device, lora):
        made[lora.strategy] = ex = real(config, model, device, lora)
        return ex

    monkeypatch.setattr(measured, "make_executor", spy)
    return made


def test_measured_run_completes_conserves_tokens_and_records_step_times(tmp_path, small, executors):
    config = RunConfig(**small, executor="measured")
    summary = run_experiment(config, out_dir=tmp_path / "run", progress=False)
    assert (summary["status"] == "ok").all(), summary[["strategy", "status"]]
    assert list(summary["strategy"]) == ["single", "per-lora", "paged", "compressed"]
    assert summary["device"].str.startswith("cpu (eager").all()
    for strategy, ex in executors.items():
        req = pd.read_csv(tmp_path / "run" / "requests" / f"{strategy}.csv")
        steps = pd.read_csv(tmp_path / "run" / "steps" / f"{strategy}.csv")
        assert len(req) == 12 and req["finish_s"].notna().all()
        # every prompt token is read once; every output token but the first comes from one decode
        assert steps["tokens"].sum() == req["prompt_tokens"].sum() + (req["output_tokens"] - 1).sum()
        assert steps["prefill_tokens"].sum() == req["prompt_tokens"].sum()
        times = np.array([r["seconds"] for r in ex.records])
        assert len(times) == steps["iterations"].sum() and (times > 0).all()
        if strategy in ("single", "compressed"):  # no adapter loads: the clock moved by the step times alone
            assert steps["duration_s"].sum() == pytest.approx(times.sum(), rel=1e-9)
    assert executors["per-lora"].adapter_loads >= 1


def test_load_is_a_real_timed_copy(small):
    config = RunConfig(**small, executor="measured", strategies=("single",))
    from lorabench.presets import device_preset, model_preset
    from lorabench.sim.costmodel import LoraSetup

    lora = LoraSetup("per-lora", np.full(6, 8), ("q_proj", "v_proj"), resident_slots=4)
    ex = measured.make_executor(config, model_preset("tiny"), device_preset("h200"), lora)
    seconds = ex.load(3 * 2**20, copies=4)
    assert seconds > 0 and ex.load_records[-1] == dict(nbytes=3 * 2**20, copies=4, seconds=seconds)
    assert ex.load(0) == 0.0
    # a step with adapters not yet resident loads them (untimed: the simulator charged the load)
    step = Step("per-lora", np.array([5, 1]), np.array([5, 9]), np.array([2, 4]), np.array([True, False]), 2)
    assert ex.step(step) > 0 and ex.residency.loads == 2
    assert ex.engine.kv.num_free_tokens == ex.engine.kv.storage.shape[1]  # rows released after the step
