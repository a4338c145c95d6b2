"""Simulator speed (pytest-benchmark; not part of the test suite).

    python -m pytest benchmarks/test_bench_sim.py --benchmark-only

The issue's bar: `lorabench run --workload zipf --n-loras 1024 --requests 100000` (every strategy,
records written) in <= 20 s wall on the 2-core machine; 10,000 requests shows how time grows.
`test_run` times exactly that (run_experiment with the CLI's default --jobs: one process per core);
`test_serve_alone` times each strategy's simulation alone in this process. extra_info holds
simulated requests per second of wall time. LORABENCH_BENCH_REQUESTS replaces the request counts
with one smaller one (CI runs the suite once with 300, untimed). benchmarks/sim_speed.py measures the
same from the command line, with peak memory, for before/after comparisons.
"""

import os
import time

import pytest

from lorabench.experiments.run import default_jobs
from lorabench.experiments.runner import Experiment, RunConfig, run_experiment

REQUESTS = [int(os.environ["LORABENCH_BENCH_REQUESTS"])] if "LORABENCH_BENCH_REQUESTS" in os.environ else [10_000,
                                                                                                          100_000]


@pytest.mark.parametrize("requests", REQUESTS)
def test_run(benchmark, requests, tmp_path):
    config = RunConfig(workload="zipf", n_loras=1024, requests=requests)
    jobs = default_jobs(config)
    runs = iter(range(1000))

    def run():
        return run_experiment(config, out_dir=tmp_path / f"run-{next(runs)}", progress=False, jobs=jobs)

    start = time.perf_counter()
    summary = benchmark.pedantic(run, rounds=1, iterations=1)
    wall = time.perf_counter() - start
    assert (summary["status"] == "ok").all() and (summary["requests"] == requests).all()
    benchmark.extra_info.update(n_loras=1024, requests=requests, jobs=jobs, strategies=len(summary),
                                simulated_requests_per_s=requests * len(summary) / wall)


@pytest.mark.parametrize("strategy", ["single", "per-lora", "paged", "compressed"])
@pytest.mark.parametrize("requests", REQUESTS)
def test_serve_alone(benchmark, requests, strategy):
    exp = Experiment.build(RunConfig(workload="zipf", n_loras=1024, requests=requests))
    start = time.perf_counter()
    result = benchmark.pedantic(exp.serve, args=(strategy,), rounds=1, iterations=1)
    wall = time.perf_counter() - start
    assert (result.finish_s >= result.first_token_s).all()
    benchmark.extra_info.update(n_loras=1024, requests=requests, strategy=strategy,
                                simulated_requests_per_s=requests / wall)
