"""The same config and seed give the same run folder, byte for byte, as before the simulator was
rewritten for speed: the files in tests/data/golden/ were written by the old code (golden_runs.py)."""

import filecmp
from pathlib import Path

import pytest
from golden_runs import CONFIGS, GOLDEN, PINNED

from lorabench.experiments.runner import RunConfig, run_experiment


def pinned_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for part in PINNED for p in [folder / part, *(folder / part).rglob("*")]
                  if p.is_file())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_are_byte_identical_to_the_stored_ones(name, tmp_path):
    jobs = 2 if name == "zipf" else 1  # strategies in worker processes write the same files
    run_experiment(RunConfig(**CONFIGS[name]), out_dir=tmp_path / "run", progress=False, jobs=jobs)
    expected, got = GOLDEN / name, tmp_path / "run"
    assert pinned_files(got) == pinned_files(expected)
    different = [f for f in pinned_files(expected) if not filecmp.cmp(expected / f, got / f, shallow=False)]
    assert not different, f"{name}: {different} differ from the stored outputs"
