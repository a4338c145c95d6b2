"""`lorabench run` end to end, its run folder, config reload and its errors."""

import json
import re

import pandas as pd
import pytest

from lorabench.cli import main
from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.sim.metrics import REQUEST_COLUMNS, STEP_COLUMNS, SUMMARY_COLUMNS

STRATEGIES = ["single", "per-lora", "paged", "compressed"]


def test_run_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--workload", "zipf", "--n-loras", "64", "--requests", "150", "--rate", "30",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MODELED" in printed and "h200" in printed and "mistral-7b" in printed
    for name in STRATEGIES:
        assert name in printed
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert summary["strategy"].tolist() == STRATEGIES
    assert (summary["status"] == "ok").all() and (summary["requests"] == 150).all()
    assert summary.loc[0, "throughput_vs_single"] == 1.0
    for name in STRATEGIES:
        req = pd.read_csv(out / "requests" / f"{name}.csv")
        steps = pd.read_csv(out / "steps" / f"{name}.csv")
        assert list(req.columns) == list(REQUEST_COLUMNS) and len(req) == 150
        assert list(steps.columns) == list(STEP_COLUMNS) and len(steps) > 0
        # the summary is what the request records say
        row = summary.set_index("strategy").loc[name]
        ttft = (req["first_token_s"] - req["arrival_s"]) * 1e3
        assert row["ttft_mean_ms"] == pytest.approx(ttft.mean())
        span = req["finish_s"].max() - req["arrival_s"].min()
        assert row["output_throughput"] == pytest.approx(req["output_tokens"].sum() / span)
    config = RunConfig.from_json(out / "config.json")
    assert config.n_loras == 64 and config.requests == 150 and config.rate == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # the saved config reruns to the same summary
    again = run_experiment(config, progress=False)
    pd.testing.assert_frame_equal(again, summary, check_dtype=False)


def test_strategy_that_cannot_fit_reports_why(tmp_path):
    summary = run_experiment(RunConfig(n_loras=64, requests=50, max_loras=100_000, strategies=("per-lora",)),
                             out_dir=tmp_path / "r", progress=False)
    assert summary["strategy"].tolist() == ["single", "per-lora"]
    assert summary.loc[1, "status"].startswith("adapters do not fit")
    assert (tmp_path / "r" / "requests" / "per-lora.csv").exists()


def test_profile_replaces_device_and_efficiency(tmp_path):
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"device": {"mem_bandwidth": 2.0e12}, "efficiency": {"lora_kernel_s": 1e-5}}))
    base = run_experiment(RunConfig(n_loras=16, requests=60, strategies=("single",)), progress=False)
    slow = run_experiment(RunConfig(n_loras=16, requests=60, strategies=("single",), profile=str(profile)),
                          progress=False)
    assert slow.loc[0, "tpot_mean_ms"] > 1.5 * base.loc[0, "tpot_mean_ms"]
    profile.write_text(json.dumps({"efficiency": {"step_scale": 2.0}}))
    doubled = run_experiment(RunConfig(n_loras=16, requests=60, strategies=("single",), rate=1.0,
                                       profile=str(profile)), progress=False)
    once = run_experiment(RunConfig(n_loras=16, requests=60, strategies=("single",), rate=1.0), progress=False)
    assert doubled.loc[0, "tpot_mean_ms"] == pytest.approx(2 * once.loc[0, "tpot_mean_ms"], rel=0.02)
    profile.write_text(json.dumps({"efficiency": {"speed": 2}}))
    with pytest.raises(Exception, match="p.json: efficiency: unknown field.*speed"):
        run_experiment(RunConfig(n_loras=16, requests=60, profile=str(profile)), progress=False)


@pytest.mark.parametrize("argv, words", [
    (["--n-loras", "0"], ["--n-loras", ">= 1"]),
    (["--rate", "-2"], ["--rate"]),
    (["--strategy", "fast"], ["--strategy", "fast"]),
    (["--workload", "nope"], ["unknown workload 'nope'"]),
    (["--max-num-batched-tokens", "64", "--max-num-seqs", "8"], ["max_num_batched_tokens (64)", "longest prompt"]),
    (["--out", "EXISTING"], ["--out", "already exists"]),
])
def test_bad_flags_give_one_clear_error(tmp_path, capsys, argv, words):
    (tmp_path / "EXISTING").mkdir()
    argv = [str(tmp_path / a) if a == "EXISTING" else a for a in argv]
    code = main(["run", "--requests", "20", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err


def test_default_folder_is_under_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # two runs in the same second get two folders
        assert main(["run", "--requests", "20", "--n-loras", "8", "--strategy", "compressed", "--no-progress"]) == 0
    folders = sorted((tmp_path / "results").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"\d{8}-\d{6}-zipf-8(-\d+)?", f.name) for f in folders)
    assert all((f / "summary.csv").exists() and (f / "requests" / "compressed.csv").exists() for f in folders)


def test_a_starved_per_lora_is_pointed_out(tmp_path, capsys):
    """slora over 5 adapters: matched memory leaves per-lora fewer slots than adapters, though all five
    rank-64-padded slots (Mistral-7B's q, o: 4096 -> 4096, k, v: 4096 -> 1024, 32 layers, bf16) take
    0.5% of the budget."""
    argv = ["run", "--workload", "slora", "--n-loras", "5", "--requests", "40", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    slots = int(re.search(r"per-lora got (\d+) adapter slots", printed).group(1))
    assert slots < 5
    every = 5 * 64 * (2 * (4096 + 4096) + 2 * (4096 + 1024)) * 32 * 2
    assert f"all 5 would take {every / 2**30:.2f} GiB" in printed and "--max-loras 5 gives" in printed
    assert main(argv + ["--max-loras", "5", "--out", str(tmp_path / "b")]) == 0
    assert "Note: matched memory" not in capsys.readouterr().out
