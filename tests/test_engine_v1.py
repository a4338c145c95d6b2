"""The vllm-v1 engine against hand-worked cases: the whole-queue scan, the preemption rule, the memory
reservation and LoRA slot size, the engine file, the client's limit; and runs with it."""

import dataclasses
import json

import numpy as np
import pytest

from lorabench.errors import LorabenchError
from lorabench.experiments.run import engine_note
from lorabench.experiments.runner import Experiment, RunConfig, run_experiment
from lorabench.presets import device_preset, model_preset
from lorabench.sim.engine_model import VLLM_V1, EngineModel, load_engine_file, resolve_engine
from lorabench.sim.memory import AdapterCache, KVCache, Pool
from lorabench.sim.scheduler import Scheduler, SchedulerConfig
from lorabench.sim.scheduler_v1 import SchedulerV1
from lorabench.strategies import build_strategy
from lorabench.workload import Requests

GIB = 2**30
BLOCK = 16


def scheduler(cls, adapters, prompts, outputs=None, arrivals=None, *, max_loras=2, budget=10_000, kv_blocks=1000,
              **config):
    """A scheduler over requests with these adapters and prompt lengths, per-lora slots for
    `max_loras` adapters, `kv_blocks` KV blocks of 16 tokens (1 byte per token: a block is 16 bytes)."""
    n = len(adapters)
    reqs = Requests(np.zeros(n) if arrivals is None else np.asarray(arrivals, dtype=float), np.asarray(adapters),
                    np.asarray(prompts), np.asarray(outputs if outputs is not None else [100] * n))
    n_loras = max(adapters) + 1
    strategy = build_strategy("per-lora", model_preset("tiny"), np.full(n_loras, 8), ("q_proj",), 64, 1)
    in_use = np.zeros(n_loras, dtype=np.int64)
    cache = AdapterCache(Pool(max_loras * int(strategy.adapter_bytes[0])), strategy, in_use, None)
    kv = KVCache(Pool(kv_blocks * BLOCK), BLOCK, 1, None)
    cfg = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=budget, chunked_prefill=True, kv_policy="preempt",
                          max_distinct=max_loras, vllm_v1=cls is SchedulerV1, **config)
    return cls(reqs, reqs.adapter, cfg, cache, kv, in_use, "per-lora")


def running_ids(s) -> list[int]:
    return sorted([row.rid for row in s.prefill] + list(s.decoding))


# adapters of 12 waiting requests; max_loras = 2
QUEUE = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 0]


def test_whole_queue_scan_admits_every_request_of_the_batch_adapters():
    """vLLM V1: FCFS until the batch has max_loras adapters (requests 0 and 1: adapters 0 and 1),
    then every later request of those adapters, skipping the others: 0 1 4 5 8 9 10 11, the whole
    queue walked. A window of the first 4 (the ideal engine's scan_limit) finds only 0 and 1."""
    s = scheduler(SchedulerV1, QUEUE, [10] * 12)
    s.take_arrivals(0.0)
    s.admit()
    assert running_ids(s) == [0, 1, 4, 5, 8, 9, 10, 11]
    assert s.scanned == 12 and s.n_waiting == 4
    assert sorted(s.queues[2]) == [2, 6] and sorted(s.queues[3]) == [3, 7]  # kept their places
    ideal = scheduler(Scheduler, QUEUE, [10] * 12, scan_limit=4)
    ideal.take_arrivals(0.0)
    ideal.admit()
    assert running_ids(ideal) == [0, 1]


def test_whole_queue_scan_stops_where_the_token_budget_runs_out():
    """Budget 45 tokens, prompts of 10 (chunked): 0, 1, 4, 5 take 40; request 8 takes the last 5 as
    its first chunk, and the walk ends there: requests 0..8 walked past (9), 2, 3, 6, 7 skipped."""
    s = scheduler(SchedulerV1, QUEUE, [10] * 12, budget=45)
    s.take_arrivals(0.0)
    s.admit()
    assert running_ids(s) == [0, 1, 4, 5, 8]
    assert s.scanned == 9
    step = s.build_step()
    assert step.num_tokens == 45 and step.prefill_tokens == 45


def test_a_step_that_preempts_admits_nothing():
    """KV cache of 3 blocks. Requests 0 and 1 (16-token prompts, a block each) run; once decoding,
    each needs a second block for its next token, and request 2 (8 tokens) arrives. vLLM V1 grows
    the running ones first: one free block for two needs, so it preempts the newest (1) and grows 0;
    in that step it admits nothing, though a block is free for request 2. The next pass admits in
    FCFS order: request 1 first, which needs 2 blocks (prompt + its token): no room, and 2 waits
    behind it. The ideal engine instead admits 2, then preempts it and 1 to grow 0."""
    args = ([0, 1, 0], [16, 16, 8], [50, 50, 50], [0.0, 0.0, 5.0])
    for cls in (SchedulerV1, Scheduler):
        s = scheduler(cls, *args, kv_blocks=3)
        s.take_arrivals(0.0)
        s.admit()
        assert running_ids(s) == [0, 1] and s.kv.used_blocks == 2
        s.complete(s.build_step(), 0.1)  # both prompts read: decoding now
        s.take_arrivals(10.0)
        s.admit()
        if cls is SchedulerV1:
            assert running_ids(s) == [0] and s.preemptions == 1
            assert s.n_waiting == 2 and s.kv.used_blocks == 2  # 0 holds 2 blocks; 1 free, unused
            s.admit()  # the next step's pass: nothing changed, request 1 still does not fit
            assert running_ids(s) == [0] and s.n_waiting == 2
        else:
            s.grow_kv()  # the engine grows after admitting
            assert running_ids(s) == [0] and s.preemptions == 2


def test_growing_kv_block_by_block_matches_the_context():
    """Every decoding row holds ceil(context / 16) blocks after each step (V1 counts growth per class
    of rows instead of per row): 3 requests of prompts 5, 16, 30 decoding 40 steps."""
    s = scheduler(SchedulerV1, [0, 0, 0], [5, 16, 30], [60, 60, 60])
    s.take_arrivals(0.0)
    for t in range(40):
        s.admit()
        s.complete(s.build_step(), 0.1 * (t + 1))
        s.admit()  # the next step's growth
        contexts = [5, 16, 30]
        expected = sum(-(-(c + t + 1) // BLOCK) for c in contexts)  # the context written by the next token
        assert s.kv.used_blocks == expected


def test_the_client_refuses_arrivals_beyond_its_limit():
    s = scheduler(SchedulerV1, [0] * 10, [10] * 10, arrivals=[0.0] * 6 + [1.0] * 4, client_max_inflight=4)
    s.take_arrivals(0.5)
    assert s.n_waiting == 4 and s.dropped == 2
    s.admit()
    s.take_arrivals(1.5)
    assert s.n_waiting == 0 and s.dropped == 6  # 4 running: no room for the later 4


# --- memory ---------------------------------------------------------------------------------------

QWEN_SLOT_R16 = 28 * 16 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 3 * (3584 + 18944)) * 2


def test_lora_slot_holds_every_linear_layer():
    """Qwen2.5-7B, rank 16: A and B of q, k, v, o, gate, up, down in 28 layers, bf16: 77.0 MiB (the
    data README: ~78 MiB per rank-16 slot from the KV-cache samples). Llama-3.1-8B adds vLLM's
    embedding and lm_head LoRA (vocabulary + 256 extra rows)."""
    engine = EngineModel("vllm-v1")
    assert engine.lora_slot_bytes(model_preset("qwen2.5-7b"), 16) == QWEN_SLOT_R16
    assert abs(QWEN_SLOT_R16 / 2**20 - 78) < 1.5
    llama = model_preset("llama-3.1-8b")
    linear = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336)) * 2
    embeddings = (16 * (128256 + 256) + 16 * 4096 + 256 * 4096 + 16 * 4096 + 16 * 128256 + 256 * 4096) * 2
    assert engine.lora_slot_bytes(llama, 16) == linear + embeddings


def test_kv_cache_is_what_the_profile_leaves(tmp_path):
    """h100-64gb at 0.9: KV cache = 0.9 x 63.43 GiB - weights - 16 slots - (CUDA context 0.5 GiB +
    activations of 2048 tokens (3 x 18944 + 4 x 3584) x 2 B + sampler 14 B x 2048 rows x 152064)."""
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"engine": VLLM_V1.to_dict()}))
    config = RunConfig(workload="uniform", n_loras=16, requests=10, model="qwen2.5-7b", device="h100-64gb",
                       strategies=("per-lora",), max_loras=16, max_num_seqs=2048, max_num_batched_tokens=2048,
                       engine="vllm-v1", engine_profile=str(path))
    exp = Experiment.build(config)
    plan = exp.plan(exp.strategy("per-lora"))
    weights = model_preset("qwen2.5-7b").params * 2
    reserved = 0.5 * GIB + 2048 * (3 * 18944 + 4 * 3584) * 2 + 14 * 2048 * 152064
    expected = int(int(63.43 * GIB) * 0.9) - weights - int(reserved) - 16 * QWEN_SLOT_R16
    assert plan.kv_capacity == expected
    ideal = Experiment.build(dataclasses.replace(config, engine="ideal", engine_profile=None))
    assert ideal.plan(ideal.strategy("per-lora")).kv_capacity - plan.kv_capacity > 4 * GIB


# --- the engine file ---------------------------------------------------------------------------------

def test_engine_file_round_trip_and_one_clear_error_each(tmp_path):
    engine = dataclasses.replace(VLLM_V1, step_s=0.003, request_s=2e-5)
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"engine": engine.to_dict(), "device": {"mem_bandwidth": 2.1e12}, "fit": {"device": "x"}}))
    loaded = load_engine_file(path)
    assert loaded.engine == engine and loaded.device == {"mem_bandwidth": 2.1e12}
    cases = [({"engine": {"kind": "vllm-v1", "step_ms": 3}}, "unknown engine term\\(s\\) step_ms"),
             ({"engine": {"kind": "vllm-v1", "step_s": -1}}, "step_s must be a non-negative number"),
             ({"engine": {"kind": "sglang"}}, "engine kind 'sglang'"),
             ({"device": {}}, "expected an object with an object `engine`")]
    for data, message in cases:
        path.write_text(json.dumps(data))
        with pytest.raises(LorabenchError, match=message):
            load_engine_file(path)
    with pytest.raises(LorabenchError, match="no such file"):
        load_engine_file(tmp_path / "missing.json")
    with pytest.raises(LorabenchError, match="only with --engine vllm-v1"):
        resolve_engine("ideal", path)


def test_a_run_with_the_vllm_v1_engine_adds_host_time(tmp_path):
    """The same stream on the same kernels: each step takes the host terms more, so TPOT grows by
    at least step_s; the run folder records the engine."""
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"engine": dataclasses.replace(VLLM_V1, step_s=0.004).to_dict()}))
    base = dict(workload="uniform", n_loras=8, requests=60, rate=2.0, model="qwen2.5-7b", device="h100-64gb",
                strategies=("per-lora",), max_loras=8)
    fast = run_experiment(RunConfig(**base, engine_profile=None), progress=False)
    slow = run_experiment(RunConfig(**base, engine="vllm-v1", engine_profile=str(path)), out_dir=tmp_path / "run",
                          progress=False)
    f, s = (frame.set_index("strategy").loc["per-lora"] for frame in (fast, slow))
    assert s["tpot_p50_ms"] - f["tpot_p50_ms"] >= 4.0 * 0.99
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["engine"] == "vllm-v1"


def test_engine_flags_are_checked(tmp_path):
    with pytest.raises(LorabenchError, match="engine_profile must be given only with engine vllm-v1"):
        RunConfig(engine_profile="x.json")
    with pytest.raises(LorabenchError, match="engine must be one of ideal, vllm-v1"):
        RunConfig(engine="sglang")
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"engine": VLLM_V1.to_dict(), "device": {"mem_bandwidth": 2e12},
                                "fit": {"device": "h100-64gb"}}))
    base = dict(workload="uniform", n_loras=4, requests=5, model="qwen2.5-7b", device="h100-64gb", engine="vllm-v1",
                engine_profile=str(path))
    assert Experiment.build(RunConfig(**base)).device.mem_bandwidth == 2e12  # fitted on this device: its figures
    elsewhere = Experiment.build(RunConfig(**{**base, "device": "h200"}))
    assert elsewhere.device == device_preset("h200")
    assert "fitted on h100-64gb and are not used on h200" in engine_note(elsewhere)[0]  # the run says so
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": {"mem_bandwidth": 3e12}}))
    with pytest.raises(LorabenchError, match="give one of the two"):
        Experiment.build(RunConfig(**base, profile=str(profile)))


def test_the_shipped_engine_file_is_the_default():
    """`--engine vllm-v1` without a file takes results/engines/vllm-0.8.5-h100-64gb.json: a vllm-v1
    engine fitted on the h100-64gb, whose every term is within its physical range."""
    shipped = resolve_engine("vllm-v1", None)
    assert shipped.source.endswith("vllm-0.8.5-h100-64gb.json") and shipped.engine.v1
    assert shipped.fit["device"] == "h100-64gb" and shipped.fit["model"] == "qwen2.5-7b"
    assert 0 < shipped.efficiency["lora_memory"] <= 1
    assert 0 < shipped.device["bf16_flops"] <= 989e12  # at most the H100's dense bf16 peak
    assert 0 < shipped.engine.ingress_s < 0.1 and shipped.engine.adapter_s < 0.01
