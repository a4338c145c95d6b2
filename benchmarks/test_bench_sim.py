"""Simulator speed: wall time of one modeled run (every strategy on the same stream).

extra_info["simulated_requests_per_s"] is requests x strategies simulated per second of wall time,
the figure to watch; pytest-benchmark's own statistics are of the whole run.
"""

from __future__ import annotations

import time

import pytest

from lorabench.runner import RunConfig, run_experiment

REQUESTS = 2000


@pytest.mark.parametrize("n_loras", [16, 1024])
def test_modeled_run(benchmark, n_loras):
    config = RunConfig(workload="zipf", n_loras=n_loras, requests=REQUESTS, seed=0, model="mistral-7b",
                       device="h200", executor="modeled")
    walls: list[float] = []

    def one_run():
        start = time.perf_counter()
        summary = run_experiment(config, progress=False)
        walls.append(time.perf_counter() - start)
        return summary

    summary = benchmark.pedantic(one_run, rounds=3, iterations=1, warmup_rounds=0)
    assert (summary["status"] == "ok").any()
    simulated = REQUESTS * len(summary)
    benchmark.extra_info.update(
        n_loras=n_loras, requests=REQUESTS, strategies=len(summary),
        simulated_requests_per_s=simulated / min(walls),
    )
