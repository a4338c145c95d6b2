"""The simulator against queueing theory and conservation laws, and the cost model against anchors."""

import dataclasses

import numpy as np
import pytest

from lorabench.experiments.runner import Experiment, RunConfig
from lorabench.presets import device_preset, model_preset
from lorabench.sim.costmodel import LoraSetup, ModeledExecutor
from lorabench.sim.engine import Replica
from lorabench.sim.executor import ConstantExecutor, Executor, Step
from lorabench.sim.memory import MemoryPlan
from lorabench.sim.scheduler import SchedulerConfig
from lorabench.strategies import build_strategy
from lorabench.workload import workload_from_dict

GIB = 2**30


class Recorder:
    """Wraps an executor and tallies what the engine asked of it."""

    def __init__(self, inner):
        self.inner, self.name = inner, "recorder"
        self.prefill_tokens = self.decode_tokens = self.prefill_rows = self.steps = 0

    def step(self, step: Step) -> float:
        self.steps += 1
        self.prefill_tokens += int(step.tokens[step.is_prefill].sum())
        self.prefill_rows += int(step.is_prefill.sum())
        self.decode_tokens += int(step.tokens[~step.is_prefill].sum())
        assert step.distinct_adapters == len(np.unique(step.adapters))
        return self.inner.step(step)

    def load(self, nbytes: int, copies: int = 1) -> float:
        return self.inner.load(nbytes, copies)


def test_md1_mean_wait_matches_the_formula():
    """Batch size 1, constant service D, Poisson arrivals at load 0.7: W = lambda D^2 / (2 (1 - rho))."""
    D, rho, n = 0.01, 0.7, 200_000
    lam = rho / D
    w = workload_from_dict({"n_loras": 1, "requests": n, "seed": 11, "arrival": {"kind": "poisson", "rate": lam},
                            "prompt": {"kind": "fixed", "value": 1}, "output": {"kind": "fixed", "value": 1}})
    reqs = w.generate()
    model = model_preset("tiny")
    strategy = build_strategy("single", model, w.adapter_ranks(), w.adapters.target_modules, 64, 1)
    plan = MemoryPlan(budget=GIB, weights=0, shared_bytes=0, adapter_capacity=GIB // 2, kv_capacity=GIB // 2,
                      max_distinct=None, slots=1, preload=True)
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=1)
    result = Replica(reqs, strategy, plan, ConstantExecutor(D), cfg, kv_bytes_per_token=256).run()
    assert np.allclose(result.finish_s - result.first_token_s, 0)  # one output token: done at the first
    wait = result.first_token_s - reqs.arrival_s - D
    assert wait.min() > -1e-9
    expected = lam * D**2 / (2 * (1 - rho))
    assert abs(wait.mean() / expected - 1) < 0.05


def small_config(**kw) -> RunConfig:
    base = dict(workload="zipf", n_loras=40, requests=400, rate=200.0, model="tiny", seed=5)
    return RunConfig(**{**base, **kw})


def check_conservation(exp: Experiment, name: str, chunked: bool = False):
    rec = Recorder(ConstantExecutor(0.002, 0.0005))
    result = exp.serve(name, executor=rec)
    r = exp.requests
    assert np.all(np.isfinite(result.finish_s)), "every request completes"
    assert np.all(result.first_token_s >= r.arrival_s) and np.all(result.finish_s >= result.first_token_s)
    # tokens: every prompt read (recomputed after a preemption), every output token generated once
    assert rec.prefill_tokens >= r.prompt_tokens.sum()
    if result.preemptions == 0:
        assert rec.prefill_tokens == r.prompt_tokens.sum()
    if not chunked:
        assert rec.decode_tokens + rec.prefill_rows == r.output_tokens.sum()
    else:  # each finished prefill emits one token: once per request, again after a preemption
        assert len(r) <= r.output_tokens.sum() - rec.decode_tokens <= len(r) + result.preemptions
    steps = result.steps
    assert steps["tokens"].sum() == rec.prefill_tokens + rec.decode_tokens
    assert steps["iterations"].sum() == rec.steps
    # memory never over the budget
    limit = (result.plan.weights + result.plan.budget) / GIB
    assert steps["memory_gib"].max() <= limit + 1e-9 and result.peak_total_bytes <= limit * GIB
    assert steps["batch_size"].max() <= exp.config.max_num_seqs
    if result.plan.max_distinct is not None:
        assert steps["distinct_adapters"].max() <= result.plan.max_distinct
    return result, rec


@pytest.mark.parametrize("name", ["single", "per-lora", "paged", "compressed"])
def test_conservation_every_strategy(name):
    check_conservation(Experiment.build(small_config(max_loras=4)), name)


def test_conservation_with_chunked_prefill_and_rank_mix():
    cfg = small_config(chunked_prefill=True, max_num_batched_tokens=256, ranks=(8, 16, 32, 64), max_loras=6)
    for name in ("per-lora", "paged"):
        check_conservation(Experiment.build(cfg), name, chunked=True)


def test_preemption_when_kv_runs_out():
    """A KV cache of a few thousand tokens forces the preempt policy to preempt, and all still finish."""
    model = model_preset("tiny")
    weights = model.params * 2
    kv_target = 3000 * 2 * model.layers * model.kv_dim * 2  # about 3,000 tokens of KV cache
    util = (weights + kv_target + 4096) / device_preset("h200").memory_bytes
    cfg = small_config(workload="slora", rate=1000.0, kv_policy="preempt", gpu_memory_utilization=util, requests=200)
    result, _ = check_conservation(Experiment.build(cfg), "single")
    assert result.preemptions > 0
    reserved, _ = check_conservation(Experiment.build(dataclasses.replace(cfg, kv_policy="reserve")), "single")
    assert reserved.preemptions == 0
    chunked = dataclasses.replace(cfg, chunked_prefill=True, max_num_batched_tokens=300)
    result, _ = check_conservation(Experiment.build(chunked), "paged", chunked=True)
    assert result.preemptions > 0


@pytest.mark.parametrize("name", ["per-lora", "paged"])
def test_each_adapter_loaded_once_when_all_fit(name):
    exp = Experiment.build(small_config(max_loras=40))
    result = exp.serve(name, executor=ConstantExecutor(0.002, 0.001))
    assert result.adapter_loads == len(np.unique(exp.requests.adapter))
    # every load served the request that needed it; every later request found its adapter resident
    assert result.adapter_hit_rate == pytest.approx(1 - result.adapter_loads / len(exp.requests))


def test_few_slots_cause_reloads_and_stalls():
    exp = Experiment.build(small_config(max_loras=2, rate=20.0))
    result = exp.serve("per-lora", executor=ConstantExecutor(0.002, 0.001))
    assert result.adapter_loads > len(np.unique(exp.requests.adapter))
    assert result.load_stall_s == pytest.approx(result.adapter_loads * 0.001)


def test_compressed_needs_no_loads_and_single_uses_one_adapter():
    exp = Experiment.build(small_config())
    assert exp.serve("compressed").adapter_loads == 0
    single = exp.serve("single")
    assert single.adapter_loads == 0 and not single.requests.adapter.any()


def test_same_seed_identical_different_seed_differs():
    from lorabench.experiments.runner import run_experiment

    a = run_experiment(small_config(), progress=False)
    b = run_experiment(small_config(), progress=False)
    c = run_experiment(small_config(seed=6), progress=False)
    assert a.equals(b)
    assert not a["output_throughput"].equals(c["output_throughput"])


def test_executors_follow_the_protocol():
    exp = Experiment.build(small_config())
    lora = LoraSetup("per-lora", exp.ranks, ("q_proj",), resident_slots=4)
    assert isinstance(ModeledExecutor(exp.model, exp.device, lora), Executor)
    assert isinstance(ConstantExecutor(1.0), Executor)


# Anchors (../shared/anchors.md): one Mistral-7B decoder layer, decode, context 512, H200, microseconds.
LAYER_ANCHORS = {1: (163.7, 206.6), 16: (169.2, 214.8), 64: (200.4, 245.7), 256: (344.7, 391.9)}


@pytest.mark.parametrize("batch", sorted(LAYER_ANCHORS))
def test_cost_model_reproduces_the_h200_layer_anchors(batch):
    model, device = model_preset("mistral-7b"), device_preset("h200")
    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    step = Step("single", np.ones(batch, dtype=np.int64), np.full(batch, 512), np.zeros(batch, dtype=np.int64),
                np.zeros(batch, dtype=bool), 1)
    ex = ModeledExecutor(model, device, LoraSetup("single", np.full(4, 16), modules))
    head = ex._gemm(batch, model.hidden, model.vocab, device.launch_overhead_s)
    base_us = ((ex._dense_part(batch, batch) - head) / model.layers + ex._attention(step)) * 1e6
    lora_us = base_us + ex._lora(step) * 1e6
    want_base, want_lora = LAYER_ANCHORS[batch]
    assert abs(base_us / want_base - 1) < 0.10
    assert abs(lora_us / want_lora - 1) < 0.10


def test_cost_model_per_lora_kernels_track_vllm_anchors():
    """Per module, M = 256 tokens over 1,024 resident adapters (143 distinct): vLLM's default grid
    181.9 us, its grid sized to the distinct adapters 91.7 us (anchors.md)."""
    model, device = model_preset("mistral-7b"), device_preset("h200")
    m, distinct = 256, 143
    step = Step("per-lora", np.ones(m, dtype=np.int64), np.full(m, 512), np.arange(m) % distinct,
                np.zeros(m, dtype=bool), distinct)
    ranks = np.full(1024, 16)
    default = ModeledExecutor(model, device, LoraSetup("per-lora", ranks, ("q_proj",), resident_slots=1024))
    assert abs(default._lora(step) * 1e6 / 181.9 - 1) < 0.25
    specialized = ModeledExecutor(model, device, LoraSetup("paged", ranks, ("q_proj",)),
                                  dataclasses.replace(default.eff, paged_gather=1.0))
    assert abs(specialized._lora(step) * 1e6 / 91.7 - 1) < 0.25


def test_paged_pool_shared_by_adapters_and_kv_stays_within_capacity():
    """A pool of a few adapters' worth: KV growth evicts idle adapters, which are loaded again later."""
    model = model_preset("tiny")
    exp0 = Experiment.build(small_config())
    adapter = int(exp0.strategy("paged").adapter_bytes[0])
    pool = 6 * adapter + 4000 * 2 * model.layers * model.kv_dim * 2
    util = (model.params * 2 + pool + 4096) / device_preset("h200").memory_bytes
    exp = Experiment.build(small_config(workload="slora", rate=400.0, gpu_memory_utilization=util, requests=300))
    result, _ = check_conservation(exp, "paged")
    assert result.adapter_loads > len(np.unique(exp.requests.adapter))
    assert result.peak_kv_bytes + result.peak_adapter_bytes > 0.8 * result.plan.budget  # the pool was used up


def test_host_cache_misses_read_from_storage():
    """With max_cpu_loras = 1 almost every GPU load first reads the adapter from storage."""
    cfg = small_config(max_loras=2, rate=20.0, storage_bandwidth=1e6)
    exp_all, exp_one = Experiment.build(cfg), Experiment.build(dataclasses.replace(cfg, max_cpu_loras=1))
    executor = ConstantExecutor(0.002, 0.001)
    every, one = exp_all.serve("per-lora", executor=executor), exp_one.serve("per-lora", executor=executor)
    nbytes = int(exp_all.strategy("per-lora").load_bytes[0])  # rank 16 everywhere
    assert every.load_stall_s == pytest.approx(every.adapter_loads * 0.001)
    extra = one.load_stall_s - one.adapter_loads * 0.001
    storage = one.adapter_loads * nbytes / 1e6  # if every load missed the host cache
    assert 0.5 * storage < extra <= storage * (1 + 1e-9)


def test_modeled_offline_ordering_matches_the_published_one():
    """Compress then Serve (H100, Mistral-7B, rank 16, > 1,000 adapters): compressed keeps about 80% of
    single-LoRA throughput, vLLM multi-LoRA about half. The model should order them the same way."""
    from lorabench.experiments.runner import run_experiment

    s = run_experiment(RunConfig(workload="offline", n_loras=1024, requests=600, device="h100"), progress=False)
    ratio = s.set_index("strategy")["throughput_vs_single"]
    assert 0.7 <= ratio["compressed"] <= 1.0
    assert ratio["per-lora"] < ratio["compressed"] - 0.1


def test_every_strategy_gets_the_same_memory_budget():
    exp = Experiment.build(RunConfig(n_loras=1024, requests=10))
    model = exp.model
    budget = int(exp.device.memory_bytes * 0.9) - model.params * 2
    compressed = exp.strategy("compressed")
    r, layers = 64, model.layers
    bases = exp.workload.adapters.clusters * layers * sum(r * (d_in + d_out) for d_in, d_out in (
        model.module_shape(m) for m in ("q_proj", "k_proj", "v_proj", "o_proj"))) * 2
    assert compressed.shared_bytes == bases and compressed.total_adapter_bytes == 1024 * layers * 4 * r * r * 2
    for name in ("single", "per-lora", "paged", "compressed"):
        plan = exp.plan(exp.strategy(name))
        assert plan.status == "ok" and plan.budget == budget
        used = plan.adapter_capacity if name == "paged" else plan.shared_bytes + plan.adapter_capacity + plan.kv_capacity
        assert used == budget
    per_lora = exp.plan(exp.strategy("per-lora"))
    one = model.lora_params(16) * 2  # bytes of one rank-16 adapter
    assert per_lora.slots == (bases + 1024 * layers * 4 * r * r * 2) // one == per_lora.max_distinct


def test_packed_adapters_save_the_per_copy_latency():
    """anchors.md: a 27.3 MB Mistral-7B adapter as 256 pinned tensors 2.0 ms, packed in one buffer 0.50 ms."""
    cfg = RunConfig(n_loras=64, requests=10, max_loras=4)
    for packed, want_ms in ((False, 2.0), (True, 0.50)):
        exp = Experiment.build(dataclasses.replace(cfg, packed_adapters=packed))
        strategy = exp.strategy("per-lora")
        lora = LoraSetup("per-lora", exp.ranks, ("q_proj", "k_proj", "v_proj", "o_proj"), resident_slots=4)
        executor = ModeledExecutor(exp.model, exp.device, lora)
        load = executor.load(int(strategy.load_bytes[0]), strategy.copies_per_load)
        assert int(strategy.load_bytes[0]) == 27_262_976  # 27.3 MB: rank 16 on q, k, v, o of 32 layers, bf16
        assert load * 1e3 == pytest.approx(want_ms, rel=0.1)
