"""Eviction policies and pinned hot adapters in whole runs (the cache's order itself is checked
against a sorting reference in test_sim_fast_paths.py)."""

from collections import Counter

import pytest

from lorabench.experiments.runner import Experiment, RunConfig, run_experiment
from lorabench.sim import memory
from lorabench.sim.executor import ConstantExecutor


def config(**kw) -> RunConfig:
    return RunConfig(**{**dict(workload="zipf", n_loras=200, requests=800, rate=60.0, model="tiny", seed=4,
                               max_loras=10), **kw})


@pytest.mark.parametrize("strategy", ["per-lora", "paged"])
def test_pinned_hot_adapters_are_never_loaded_again(strategy, monkeypatch):
    loads, reserve = [], memory.AdapterCache.reserve

    def recording(self, a):
        placed = reserve(self, a)
        if placed:
            loads.append(a)
        return placed

    monkeypatch.setattr(memory.AdapterCache, "reserve", recording)
    exp = Experiment.build(config(pin_hot=4))
    hot = [a for a, _ in sorted(Counter(exp.requests.adapter.tolist()).items(), key=lambda kv: (-kv[1], kv[0]))[:4]]
    result = exp.serve(strategy, executor=ConstantExecutor(0.004, 0.002))
    assert loads and not set(hot) & set(loads)
    assert result.adapter_loads == len(loads)


def test_policies_order_evictions_differently_and_lfu_keeps_zipf_hot_adapters():
    """At low load a few slots hold idle adapters, so which one leaves matters: under Zipf
    popularity the least frequently used is the best guess."""
    hits = {}
    for policy in ("lru", "fifo", "lfu"):
        exp = Experiment.build(config(eviction=policy, rate=15.0))
        hits[policy] = exp.serve("per-lora", executor=ConstantExecutor(0.004, 0.002)).adapter_hit_rate
    assert len(set(hits.values())) == 3
    assert hits["lfu"] > hits["lru"] > hits["fifo"]


def test_pinning_every_slot_is_refused_with_the_reason():
    summary = run_experiment(config(pin_hot=10), progress=False).set_index("strategy")
    assert "pin_hot 10" in summary.loc["per-lora", "status"]
    assert summary.loc["paged", "status"] == "ok" and summary.loc["compressed", "status"] == "ok"


def test_default_policy_and_no_pinning_change_nothing():
    a = run_experiment(config(), progress=False)
    b = run_experiment(config(eviction="lru", pin_hot=0), progress=False)
    assert a.equals(b)
