"""The simulator's shortcuts against the plain computations they replace: a step's running totals
against its arrays, a run of decode durations against one call per iteration, the eviction heap
against sorting by each policy's key, incremental cluster counts, and the CSV writer against pandas."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from lorabench.experiments.runner import Experiment, RunConfig
from lorabench.outputs.results import csv_text
from lorabench.presets import device_preset, model_preset
from lorabench.sim.costmodel import LoraSetup, ModeledExecutor
from lorabench.sim.executor import ConstantExecutor, Step
from lorabench.sim.memory import AdapterCache, Pool
from lorabench.strategies import build_strategy


class TotalsChecker:
    """An executor that checks every step's totals against its arrays (float64 / set references)."""

    name = "checker"

    def __init__(self):
        self.steps = 0

    def step(self, step: Step) -> float:
        t, n = step.tokens.astype(np.float64), step.context_lens.astype(np.float64)
        assert step.batch_size == len(step.tokens) == len(step.adapters) == len(step.is_prefill)
        assert step.num_tokens == t.sum()
        assert step.prefill_tokens == t[step.is_prefill].sum()
        assert step.context_sum == n.sum()
        assert step.twice_attention_pairs / 2 == (t * (n - (t - 1) / 2)).sum()
        assert step.adapter_ids == set(step.adapters.tolist())
        decoded = step.decoded(3)
        if not step.is_prefill.any():
            assert decoded.context_sum == (n + 3).sum() and (decoded.context_lens == step.context_lens + 3).all()
        self.steps += 1
        return 0.003

    def load(self, nbytes: int, copies: int = 1) -> float:
        return 0.001


@pytest.mark.parametrize("strategy", ["single", "per-lora", "paged", "compressed"])
def test_step_totals_equal_the_arrays(strategy):
    cfg = RunConfig(workload="slora", n_loras=50, requests=250, rate=150.0, model="tiny", seed=3, max_loras=6,
                    chunked_prefill=True, max_num_batched_tokens=300, kv_policy="preempt")
    exp = Experiment.build(cfg)
    kv = 2500 * 2 * exp.model.layers * exp.model.kv_dim * 2  # KV cache for 2,500 tokens: preemptions
    s = exp.strategy(strategy)
    adapters = {"single": s.adapter_bytes[0], "per-lora": 6 * s.adapter_bytes[0], "paged": 8 * s.adapter_bytes.max(),
                "compressed": s.shared_bytes + s.total_adapter_bytes}[strategy]
    kv = max(kv, adapters) if strategy == "compressed" else kv  # its adapters may take half the budget at most
    cfg = dataclasses.replace(cfg, gpu_memory_utilization=(exp.model.params * 2 + adapters + kv + 1) / exp.device.memory_bytes)
    checker = TotalsChecker()
    result = Experiment.build(cfg).serve(strategy, executor=checker)
    assert checker.steps == result.steps["iterations"].sum() and np.isfinite(result.finish_s).all()
    assert result.preemptions > 0 and (result.steps["iterations"] > 1).any()


def test_reading_a_steps_arrays_after_it_was_applied_is_an_error():
    exp = Experiment.build(RunConfig(workload="zipf", n_loras=8, requests=20, model="tiny"))
    kept = []

    class Keeper(ConstantExecutor):
        def step(self, step):
            kept.append(step)
            return 0.01

    exp.serve("single", executor=Keeper(0.01))
    with pytest.raises(RuntimeError, match="after the scheduler applied it"):
        kept[0].tokens


@pytest.mark.parametrize("strategy,ranks", [("single", (16,)), ("per-lora", (16,)), ("paged", (8, 16, 64)),
                                            ("compressed", (16,))])
@pytest.mark.parametrize("count", [1, 7, 32, 33, 200])
def test_repeat_decode_equals_one_step_per_iteration(strategy, ranks, count):
    rng = np.random.default_rng(count)
    n_loras, batch = 300, int(rng.integers(1, 200))
    adapters = rng.integers(0, n_loras, batch)
    lora = LoraSetup(strategy, rng.choice(ranks, n_loras), ("q_proj", "k_proj", "v_proj", "o_proj"), 64,
                     rng.integers(0, 5, n_loras), resident_slots=40)
    ex = ModeledExecutor(model_preset("mistral-7b"), device_preset("h200"), lora)
    step = Step(strategy, np.ones(batch, dtype=np.int64), rng.integers(1, 5000, batch), adapters,
                np.zeros(batch, dtype=bool), len(np.unique(adapters)), batch_id=1)
    got = ex.repeat_decode(step, count)
    want = [ex.step(Step(strategy, step.tokens, step.context_lens + j, adapters, step.is_prefill,
                         step.distinct_adapters)) for j in range(1, count + 1)]
    assert got == want  # bit for bit


def test_clusters_present_counted_incrementally_equals_a_fresh_count():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 8, 500)
    ex = ModeledExecutor(model_preset("tiny"), device_preset("h200"),
                         LoraSetup("compressed", np.full(500, 16), ("q_proj",), 64, clusters))
    ids = set(rng.choice(500, 40, replace=False).tolist())
    for _ in range(300):
        for _ in range(int(rng.integers(0, 4))):
            ids.discard(int(rng.choice(list(ids)))) if ids and rng.random() < 0.5 else ids.add(int(rng.integers(500)))
        assert ex._clusters_present(frozenset(ids)) == len(np.unique(clusters[list(ids)]))


class ScanCache:
    """The reference: on every eviction, sort the resident adapters no request uses (and not being
    loaded, not pinned) by the policy's key, and take them in that order."""

    def __init__(self, sizes, capacity, in_use, policy, pinned):
        self.sizes, self.capacity, self.in_use, self.policy, self.pinned = sizes, capacity, in_use, policy, pinned
        self.resident, self.loading, self.used, self.clock = set(), set(), 0, 0
        self.last, self.placed, self.uses = {}, {}, {a: 0 for a in range(len(sizes))}
        for a in pinned:
            self._place(a)

    def key(self, a):
        return {"lru": self.last[a], "fifo": self.placed[a], "lfu": (self.uses[a], self.last[a])}[self.policy]

    def make_room(self, nbytes):
        candidates = sorted((a for a in self.resident if self.in_use[a] == 0 and a not in self.loading
                             and a not in self.pinned), key=self.key)
        victims, freed = [], 0
        for a in candidates:
            if self.capacity - self.used + freed >= nbytes:
                break
            victims.append(a)
            freed += self.sizes[a]
        if self.capacity - self.used + freed < nbytes:
            return False
        for a in victims:
            self.resident.discard(a)
            self.used -= self.sizes[a]
        return True

    def _place(self, a):
        self.clock += 1
        self.last[a] = self.placed[a] = self.clock
        self.resident.add(a)
        self.used += self.sizes[a]

    def reserve(self, a):
        if not self.make_room(self.sizes[a]):
            return False
        self._place(a)
        self.loading.add(a)
        return True

    def touch(self, a):
        self.clock += 1
        self.last[a] = self.clock
        self.uses[a] += 1


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
@pytest.mark.parametrize("pinned", [(), (3, 17)])
def test_eviction_heap_evicts_what_sorting_by_the_policy_does(policy, pinned):
    rng = np.random.default_rng(len(policy) + len(pinned))
    model = model_preset("tiny")
    ranks = rng.choice([8, 16, 32], 60)
    strategy = build_strategy("paged", model, ranks, ("q_proj", "v_proj"), 64, 1)
    sizes = strategy.adapter_bytes.tolist()
    capacity = int(strategy.adapter_bytes.mean() * 12)
    in_use_a, in_use_b = np.zeros(60, dtype=np.int64), np.zeros(60, dtype=np.int64)
    cache = AdapterCache(Pool(capacity), strategy, in_use_a, None, policy=policy, pinned=pinned)
    ref = ScanCache(sizes, capacity, in_use_b, policy, set(pinned))
    for _ in range(3000):
        a, op = int(rng.integers(60)), rng.random()
        if op < 0.35 and not cache.resident[a]:
            assert cache.reserve(a) == ref.reserve(a)
        elif op < 0.55 and cache.loading[a]:
            cache.loaded(a)
            ref.loading.discard(a)
        elif op < 0.8 and cache.resident[a] and not cache.loading[a]:
            cache.pin(a)
            in_use_b[a] += 1
            cache.touch(a)
            ref.touch(a)
        elif in_use_a[a]:
            cache.unpin(a)
            in_use_b[a] -= 1
        elif op > 0.95:
            need = int(rng.integers(1, capacity))
            assert cache.make_room(need) == ref.make_room(need)
        resident = {a for a in range(60) if cache.resident[a]}
        assert resident == ref.resident and cache.used == ref.used
    assert all(cache.resident[a] for a in pinned)


def test_csv_text_equals_pandas_to_csv():
    rng = np.random.default_rng(2)
    n = 3000
    floats = 10.0 ** rng.uniform(-30, 30, n) * rng.choice([-1, 1], n)
    floats[rng.random(n) < 0.05] = np.nan
    floats[:4] = [0.0, -0.0, np.inf, -np.inf]
    frame = pd.DataFrame({"i": rng.integers(-10**15, 10**15, n), "x": floats, "r": rng.random(n).round(3)})
    assert csv_text(frame) == frame.to_csv(index=False)
    assert csv_text(frame.iloc[:0]) == frame.iloc[:0].to_csv(index=False)
    mixed = frame.assign(s=["a"] * n)
    assert csv_text(mixed) == mixed.to_csv(index=False)
