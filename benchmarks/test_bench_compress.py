"""Compression time: joint compression of a synthetic collection (tiny model shapes, one layer, CPU).

The large-shape target (1,000 adapters of a 4096 x 4096 module) is timed by benchmarks/compress_speed.py.

extra_info holds the fit's mean error and adapters compressed per second of wall time, so a change
that buys speed with accuracy shows up beside the time.
"""

from __future__ import annotations

import pytest

from lorabench.adapters.collection import load_collection
from lorabench.adapters.synth import SynthSpec, write_synth_collection
from lorabench.compress.module import CompressConfig
from lorabench.compress.run import compress_collection

N_ADAPTERS = 32


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-compress") / "adapters"
    write_synth_collection(SynthSpec(n=N_ADAPTERS, model="tiny", ranks=(8, 16), clusters=4, layers=1, seed=0), root,
                           progress=False)
    return load_collection(root)


@pytest.mark.parametrize("method, clusters", [("full", 1), ("full", 4), ("diagonal", 1)])
def test_compress_collection(benchmark, collection, tmp_path, method, clusters):
    # fixed iteration caps: the time measures the code, not how soon a fit happens to converge
    config = CompressConfig(rank=16, method=method, clusters=clusters, max_iter=10, max_rounds=4, seed=0)
    outputs = iter(range(1000))

    def compress():
        return compress_collection(collection, config, tmp_path / f"out-{next(outputs)}", progress=False)

    summary = benchmark.pedantic(compress, rounds=3, iterations=1)
    benchmark.extra_info.update(
        adapters=N_ADAPTERS, method=method, clusters=clusters, rank=16, mean_error=summary["mean_error"],
        adapters_per_s=N_ADAPTERS / summary["seconds"],
    )
