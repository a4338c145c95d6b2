"""Simulator speed (pytest-benchmark; not part of the test suite).

    python -m pytest benchmarks/test_bench_sim.py --benchmark-only

The issue's bar: a modeled run of 100,000 requests over 1,024 adapters for all strategies in <= 60 s
on a 2-core machine. Set LORABENCH_BENCH_REQUESTS to run a smaller stream (CI does).
extra_info["simulated_requests_per_s"]: requests x strategies simulated per second of wall time.
"""

import os
import time

import pytest

from lorabench.runner import RunConfig, run_experiment

REQUESTS = int(os.environ.get("LORABENCH_BENCH_REQUESTS", "100000"))


@pytest.mark.parametrize("n_loras", [1024, 16])
def test_modeled_run_all_strategies(benchmark, n_loras):
    config = RunConfig(workload="zipf", n_loras=n_loras, requests=REQUESTS)
    walls = []

    def run():
        start = time.perf_counter()
        summary = run_experiment(config, progress=False)
        walls.append(time.perf_counter() - start)
        return summary

    summary = benchmark.pedantic(run, rounds=1, iterations=1)
    assert (summary["status"] == "ok").all() and (summary["requests"] == REQUESTS).all()
    benchmark.extra_info.update(n_loras=n_loras, requests=REQUESTS, strategies=len(summary),
                                simulated_requests_per_s=REQUESTS * len(summary) / min(walls))
