"""The measured executor in the simulator's loop, on the CPU with the tiny preset."""

import numpy as np
import pandas as pd
import pytest
import torch

import lorabench.sim.measured as measured
from lorabench.experiments.runner import RunConfig, run_experiment
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
    step = Step("per-lora", np.array([5, 1]), np.array([5, 9]), np.array([5, 4]), np.array([True, False]), 2)
    resident = ex.residency.loads  # the warm-up loaded adapters 0..3 into the 4 slots
    assert ex.step(step) > 0 and ex.residency.loads == resident + 2
    assert ex.engine.kv.num_free_tokens == ex.engine.kv.storage.shape[1]  # rows released after the step


def test_real_collections_load_with_their_exact_deltas(tmp_path):
    """--adapters and --compressed: the model's host layouts carry each file's delta exactly."""
    from lorabench.adapters import ModuleKey, SynthSpec, load_collection, read_adapter, write_synth_collection
    from lorabench.compress.collection import CompressedCollection
    from lorabench.compress.module import CompressConfig
    from lorabench.compress.run import compress_collection
    from lorabench.model.collections import compressed_weights, peft_adapters
    from lorabench.presets import model_preset

    shape, modules = model_preset("tiny"), ("q_proj", "v_proj")
    write_synth_collection(SynthSpec(n=3, ranks=(2, 4), modules=modules, seed=1), tmp_path / "coll", progress=False)
    ours = peft_adapters(tmp_path / "coll", shape, modules, 3)
    for i, adapter in enumerate(load_collection(tmp_path / "coll").adapters):
        config, factors = read_adapter(adapter.folder)
        for (layer, m) in [(0, "q_proj"), (1, "v_proj")]:
            A, B = factors[ModuleKey(layer, m)]
            want = config.scaling(ModuleKey(layer, m)) * B.double() @ A.double()
            a, b = ours[i].modules[m]
            torch.testing.assert_close(ours[i].scale * b[layer].double() @ a[layer].double(), want)
    compress_collection(load_collection(tmp_path / "coll"), CompressConfig(rank=3, clusters=2, max_iter=3),
                        tmp_path / "compressed", progress=False)
    cw = compressed_weights(tmp_path / "compressed", shape, modules, 3)
    coll = CompressedCollection.load(tmp_path / "compressed")
    for m in modules:
        U, V, S, cluster_of = cw.modules[m]
        for layer in range(shape.layers):
            for i in range(3):
                A1, B1 = coll.module(ModuleKey(layer, m)).delta_factors(i)
                k = int(cluster_of[layer, i])
                torch.testing.assert_close(U[layer, k].double() @ S[layer, i].double() @ V[layer, k].double().T,
                                           B1.double() @ A1.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="holds 3 adapters"):
        peft_adapters(tmp_path / "coll", shape, modules, 5)
    with pytest.raises(Exception, match="no weights for layers.0.k_proj"):
        peft_adapters(tmp_path / "coll", shape, ("q_proj", "k_proj"), 3)
