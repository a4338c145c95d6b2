"""`lorabench compare`: a vllm bench serve JSON made from a run's own result with known perturbations,
so every relative difference is known; settings warnings; bad files."""

import json

import numpy as np
import pandas as pd
import pytest

from lorabench.cli import main
from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.outputs.compare import COMPARED, REQUIRED


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    run_experiment(RunConfig(workload="zipf", n_loras=32, requests=80, rate=20.0, seed=2,
                             strategies=("per-lora", "compressed")), out_dir=out, progress=False)
    return out


def vllm_like(run_dir, tmp_path, seed, strategy="per-lora", **changes):
    """A result as vllm bench serve writes it: lorabench's own, without its extras, each compared
    figure multiplied by a random factor (returned)."""
    result = json.loads((run_dir / "bench" / f"{strategy}.json").read_text())
    for key in ("lorabench", "ttfts", "itls", "latencies", "input_lens", "output_lens", "start_times", "errors"):
        result.pop(key, None)
    rng = np.random.default_rng(seed)
    factors = {m: float(rng.uniform(0.5, 2.0)) for m in COMPARED if result.get(m) is not None}
    for m, f in factors.items():
        result[m] *= f
    result.update(changes)
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(result))
    return path, factors


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_differences_are_the_perturbations(run_dir, tmp_path, capsys, seed):
    path, factors = vllm_like(run_dir, tmp_path, seed)
    out = tmp_path / "table.csv"
    assert main(["compare", str(path), str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "WARNING" not in printed  # the same settings on both sides
    table = pd.read_csv(out)
    assert set(table["strategy"]) == {"single", "per-lora", "compressed"}
    mine = table[table["strategy"] == "per-lora"].set_index("metric")
    assert list(mine.index) == list(factors)  # every figure both have, in the table's order
    for metric, f in factors.items():
        assert mine.loc[metric, "relative_difference"] == pytest.approx(1 / f - 1, rel=1e-9)
    # other strategies against the same vllm figures: their own value over vllm's
    for name in ("single", "compressed"):
        theirs = json.loads((run_dir / "bench" / f"{name}.json").read_text())
        rows = table[table["strategy"] == name].set_index("metric")
        for metric in rows.index:
            assert rows.loc[metric, "lorabench"] == pytest.approx(theirs[metric], rel=1e-12)
            assert rows.loc[metric, "relative_difference"] == pytest.approx(
                theirs[metric] / rows.loc[metric, "vllm"] - 1, rel=1e-9)
    assert f"{1 / factors['mean_ttft_ms'] - 1:+.1%}" in printed


def test_one_strategy_and_differing_settings_are_warned(run_dir, tmp_path, capsys):
    path, _ = vllm_like(run_dir, tmp_path, 3, request_rate=25.0, n_loras="64", num_prompts=80,
                        total_input_tokens=10)
    assert main(["compare", str(path), str(run_dir), "--strategy", "compressed"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: settings differ, request rate: vllm 25.0, lorabench 20.0" in printed
    assert "WARNING: settings differ, adapters: vllm 64, lorabench 32" in printed
    assert "WARNING: settings differ, mean input tokens" in printed
    assert "num prompts" in printed and "WARNING: settings differ, num prompts" not in printed
    assert "per-lora" not in printed and "compressed vs vllm" in printed


@pytest.mark.parametrize("content, words", [
    ("{not json", ["vllm.json", "not JSON"]),
    ('{"duration": 1}\n{"duration": 2}\n', ["vllm.json", "holds 2 results", "--append-result"]),
    ("[1, 2]", ["vllm.json", "not a vllm bench serve result"]),
])
def test_unreadable_results_are_one_clear_error(run_dir, tmp_path, capsys, content, words):
    path = tmp_path / "vllm.json"
    path.write_text(content)
    assert main(["compare", str(path), str(run_dir)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.parametrize("field", ["duration", "mean_ttft_ms", "p99_itl_ms"])
def test_a_missing_field_is_named(run_dir, tmp_path, capsys, field):
    path, _ = vllm_like(run_dir, tmp_path, 0)
    result = json.loads(path.read_text())
    del result[field]
    path.write_text(json.dumps(result))
    assert field in REQUIRED
    assert main(["compare", str(path), str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "vllm.json: missing field(s)" in err and field in err


def test_a_run_without_the_strategy_or_a_non_run_folder(run_dir, tmp_path, capsys):
    path, _ = vllm_like(run_dir, tmp_path, 0)
    assert main(["compare", str(path), str(run_dir), "--strategy", "paged"]) == 2
    assert "--strategy paged: no result" in capsys.readouterr().err
    assert main(["compare", str(path), str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
