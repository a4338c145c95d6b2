"""Simulator speed (pytest-benchmark; not part of the test suite).

    python -m pytest benchmarks/test_bench_sim.py --benchmark-only

The issue's bar: a modeled run of 100,000 requests over 1,024 adapters for all strategies in <= 60 s
on a 2-core machine. Set LORABENCH_BENCH_REQUESTS to run a smaller stream.
"""

import os

from lorabench.runner import RunConfig, run_experiment

REQUESTS = int(os.environ.get("LORABENCH_BENCH_REQUESTS", "100000"))


def test_modeled_run_all_strategies(benchmark):
    config = RunConfig(workload="zipf", n_loras=1024, requests=REQUESTS)
    summary = benchmark.pedantic(run_experiment, args=(config,), kwargs={"progress": False}, rounds=1, iterations=1)
    assert (summary["status"] == "ok").all() and (summary["requests"] == REQUESTS).all()
