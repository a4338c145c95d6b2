"""Small runs whose every output file is pinned: tests/data/golden/<name>/ holds them as written by
lorabench before the simulator was rewritten for speed (commit e26a623), and the same config and
seed must still give them byte for byte (tests/test_golden_outputs.py).

To write them again from a checkout (never needed unless an issue changes the outputs on purpose):

    PYTHONPATH=CHECKOUT python tests/golden_runs.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "data" / "golden"
PINNED = ("summary.csv", "requests", "steps")  # config.json holds the date; bench/ came later

# name -> RunConfig fields. Between them: every strategy, reserve and preempt (with preemptions),
# chunked prefill, mixed ranks, paged evictions, few per-lora slots with a host cache, merged
# decode iterations.
CONFIGS = {
    "zipf": dict(workload="zipf", n_loras=256, requests=400, rate=60.0),
    "slora-preempt-chunked": dict(workload="slora", n_loras=64, requests=300, rate=80.0, kv_policy="preempt",
                                  gpu_memory_utilization=0.18, chunked_prefill=True, max_num_batched_tokens=1024),
    "uniform-slots": dict(workload="uniform", n_loras=100, requests=300, max_loras=8, max_cpu_loras=16,
                          packed_adapters=True, seed=7),
}


def write(name: str) -> None:
    from lorabench.experiments.runner import RunConfig, run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(RunConfig(**CONFIGS[name]), out_dir=Path(tmp) / "run", progress=False)
        target = GOLDEN / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for part in PINNED:
            source = Path(tmp) / "run" / part
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target / part)


if __name__ == "__main__":
    for name in CONFIGS:
        write(name)
        print("wrote", GOLDEN / name)
