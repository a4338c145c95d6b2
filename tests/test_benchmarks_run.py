"""CI runs the benchmark suite once so it cannot rot; times are not judged (`--benchmark-disable`
runs each benchmarked function once, untimed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_suite_runs_once():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "LORABENCH_BENCH_REQUESTS": "300"},  # the simulator's stream, shortened
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout
