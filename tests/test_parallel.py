"""Tensor parallelism and FP8: memory per GPU, adapter bytes, all-reduce traffic against hand-worked
figures for the tiny model, and one clear error for each impossible request."""

import numpy as np
import pytest

from lorabench.errors import LorabenchError
from lorabench.experiments.runner import Experiment, RunConfig, run_experiment
from lorabench.parallel import Parallel, check_fits, shard
from lorabench.presets import DEVICES, MODELS, device_preset, model_preset
from lorabench.sim.costmodel import LoraSetup, ModeledExecutor
from lorabench.sim.executor import Step
from lorabench.strategies import build_strategy

TINY = model_preset("tiny")  # hidden 64, 2 layers, 4 heads (head_dim 16), 2 KV heads, MLP 176, vocab 256


def test_tiny_at_tp_2_holds_half_of_every_sharded_weight():
    sh = shard(TINY, 2)
    assert (sh.heads, sh.kv_heads, sh.intermediate, sh.vocab) == (2, 1, 88, 128)
    # per layer, by hand: q 64x32, k 64x16, v 64x16, o 32x64, gate 64x88, up 64x88, down 88x64
    linear = 64 * 32 + 64 * 16 + 64 * 16 + 32 * 64 + 64 * 88 + 64 * 88 + 88 * 64
    norms = 2 * 64
    embeddings = 2 * 128 * 64  # input embedding and LM head, each 128 of the 256 vocabulary rows
    assert sh.weight_bytes() == 2 * (2 * (linear + norms) + embeddings + 64)
    assert sh.weight_bytes(1) == 2 * linear + 2 * (2 * norms + embeddings + 64)  # FP8: one byte per linear weight


def test_kv_heads_are_replicated_past_their_count():
    # 2 KV heads: tp 2 keeps one each, tp 4 still one each (a copy), so the KV cache stops shrinking
    assert [shard(TINY, tp).kv_dim for tp in (1, 2, 4)] == [32, 16, 16]
    assert shard(TINY, 4).module_shape("k_proj") == (64, 16)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_gpu_in_bf16_holds_every_parameter_in_two_bytes(name):
    assert shard(MODELS[name], 1).weight_bytes(2) == MODELS[name].params * 2


def test_fp8_halves_the_linear_weights_of_a_real_model():
    model = model_preset("llama-3.1-70b")
    linear = sum(d_in * d_out for d_in, d_out in map(model.module_shape, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj")))
    for tp in (1, 2, 4, 8):
        sh = shard(model, tp)
        assert sh.weight_bytes(2) - sh.weight_bytes(1) == model.layers * linear // tp


def test_adapter_bytes_per_gpu_follow_vllm_sharding():
    ranks = np.array([8, 16])
    one = build_strategy("single", TINY, ranks, ("q_proj", "o_proj"), 64, 1)
    two = build_strategy("single", TINY, ranks, ("q_proj", "o_proj"), 64, 1, tp=2)
    # tp 1: per rank and layer, q 64 + 64, o 64 + 64; tp 2: q keeps A (64) and half of B (32), o half of A and all of B
    assert list(one.adapter_bytes) == [r * 2 * 256 * 2 for r in (8, 16)]
    assert list(two.adapter_bytes) == [r * 2 * (64 + 32 + 32 + 64) * 2 for r in (8, 16)]


def test_a_decode_step_pays_two_all_reduces_per_layer_and_the_logits_gather():
    device = device_preset("h100")
    lora = LoraSetup("single", np.array([16]), ("q_proj",))
    batch = 6
    step = Step("single", np.ones(batch, dtype=np.int64), np.full(batch, 100), np.zeros(batch, dtype=np.int64),
                np.zeros(batch, dtype=bool), 1)
    assert shard(TINY, 2).all_reduce_bytes(batch) == batch * 64 * 2 and shard(TINY, 1).all_reduce_bytes(batch) == 0
    for tp in (2, 4):
        parts = ModeledExecutor(TINY, device, lora, parallel=Parallel(tp)).breakdown(step)
        all_reduce = device.link_latency_s + 2 * (tp - 1) / tp * (batch * 64 * 2) / device.link_bandwidth
        gather = device.link_latency_s + (tp - 1) / tp * (batch * 256 * 2) / device.link_bandwidth
        assert parts["communication"] == pytest.approx(2 * 2 * all_reduce + gather, rel=1e-12)
    assert ModeledExecutor(TINY, device, lora).breakdown(step)["communication"] == 0


def test_the_parts_of_a_step_add_up_to_it():
    device = device_preset("h100")
    rng = np.random.default_rng(0)
    for strategy in ("single", "per-lora", "paged", "compressed"):
        lora = LoraSetup(strategy, rng.choice([8, 16], 32), ("q_proj", "v_proj"), 16, np.zeros(32, dtype=np.int64), 8)
        ex = ModeledExecutor(model_preset("llama-3.1-8b"), device, lora, parallel=Parallel(2, "fp8", "fp8"))
        tokens = np.array([1] * 20 + [300])
        step = Step(strategy, tokens, rng.integers(300, 2000, 21), rng.integers(0, 32, 21), tokens > 1, 12)
        assert sum(ex.breakdown(step).values()) == pytest.approx(ex.step(step), rel=1e-12)


def test_a_70b_run_at_tp_4_fits_where_tp_1_does_not(tmp_path):
    config = dict(workload="zipf", n_loras=8, requests=40, model="llama-3.1-70b", device="h100",
                  strategies=("per-lora",))
    with pytest.raises(LorabenchError, match=r"does not fit h100 GPUs at --tp 1.*--tp 4"):
        run_experiment(RunConfig(**config), progress=False)
    summary = run_experiment(RunConfig(**config, tp=4), out_dir=tmp_path / "run", progress=False)
    assert list(summary["status"]) == ["ok", "ok"]
    # per GPU: a quarter of the weights, plus KV cache and adapters within 0.9 x 80 GiB
    weights = shard(model_preset("llama-3.1-70b"), 4).weight_bytes() / 2**30
    assert weights < summary["gpu_memory_peak_gib"].min() <= 0.9 * 80


def test_fp8_weights_leave_more_memory_for_the_kv_cache():
    plans = [Experiment.build(RunConfig(model="llama-3.1-8b", device="h100", weight_dtype=w, n_loras=4)).plan(
        build_strategy("single", model_preset("llama-3.1-8b"), np.array([16] * 4), ("q_proj",), 64, 1)) for w in
        ("bf16", "fp8")]
    assert plans[0].weights - plans[1].weights == plans[1].budget - plans[0].budget > 6 * 2**30


@pytest.mark.parametrize("config, message", [
    (dict(model="llama-3.1-70b", device="h100", tp=3), r"--tp 3 does not divide model llama-3.1-70b's 64 attention heads"),
    (dict(model="qwen2.5-7b", device="h100", tp=8), r"--tp 8 does not divide model qwen2.5-7b's 28 attention heads"),
    (dict(model="llama-3.1-70b", device="a100", tp=2, gpu_memory_utilization=0.8),
     r"does not fit a100 GPUs at --tp 2: its bf16 weights take 65.7 GiB per GPU, 0.8 x 80.0 GiB = 64.0 GiB.*--tp 4"),
    (dict(model="llama-3.1-8b", device="a100", weight_dtype="fp8"), r"a100 has no FP8 tensor cores"),
    (dict(executor="measured", tp=2), r"executor measured runs one GPU in bf16"),
])
def test_impossible_requests_get_one_clear_error(config, message):
    with pytest.raises(LorabenchError, match=message):
        Experiment.build(RunConfig(**config))


def test_the_cli_names_the_flag(capsys):
    from lorabench.cli import main

    assert main(["run", "--model", "llama-3.1-70b", "--device", "h100", "--tp", "0", "--no-progress"]) == 2
    assert "--tp must be >= 1" in capsys.readouterr().err


def test_check_fits_suggests_fp8_only_where_the_device_has_it():
    model = model_preset("llama-3.1-70b")
    with pytest.raises(LorabenchError, match=r"--tp 4 or --tp 2 --weight-dtype fp8"):
        check_fits(model, Parallel(1), DEVICES["h100"], 0.9)
    with pytest.raises(LorabenchError, match=r"it would fit with --tp 4$"):
        check_fits(model, Parallel(1), DEVICES["a100"], 0.9)
