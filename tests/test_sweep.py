"""`lorabench sweep`: a small sweep end to end with the real simulator, resume, failures, parallel jobs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import lorabench.experiments.runner as runner
from lorabench.cli import main as cli_main
from lorabench.errors import LorabenchError
from lorabench.experiments.runner import RunConfig
from lorabench.experiments.sweep import parse_n_loras, run_sweep
from lorabench.outputs.tables import read_sweep

GRID = [1, 2, 8]
REAL_RUN_EXPERIMENT = runner.run_experiment


def small_config(**overrides) -> RunConfig:
    """A run the simulator finishes in well under a second: tiny model, few requests."""
    fields = dict(workload="zipf", requests=60, seed=3, model="tiny", device="h200")
    fields.update(overrides)
    return RunConfig(**fields)


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a point (pytest reserves KeyboardInterrupt)."""


class CountingRuns:
    """Wraps run_experiment: counts the points run, and raises after `fail_after` of them."""

    def __init__(self, monkeypatch, fail_after=None, refuse=()):
        self.calls: list[int] = []
        self.fail_after = fail_after
        self.refuse = set(refuse)
        monkeypatch.setattr(runner, "run_experiment", self)

    def __call__(self, config, out_dir=None, progress=True):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise Interrupted
        self.calls.append(config.n_loras)
        if config.n_loras in self.refuse:
            raise LorabenchError(f"n_loras {config.n_loras}: refused for the test")
        return REAL_RUN_EXPERIMENT(config, out_dir=out_dir, progress=progress)


def numeric(table: pd.DataFrame) -> pd.DataFrame:
    return table.select_dtypes("number")


def test_small_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = cli_main(["sweep", "--workload", "zipf", "--n-loras", "8,1,2", "--requests", "60", "--seed", "3",
                   "--model", "tiny", "--out", str(out)])
    assert rc == 0
    table, config = read_sweep(out)
    assert config["n_loras"] == GRID
    assert table["n_loras"].tolist() == [n for n in GRID for _ in range(4)]
    assert set(table["strategy"]) == {"single", "per-lora", "paged", "compressed"}
    # each point's rows are exactly that point's run, as run_experiment wrote it
    for n in GRID:
        summary = pd.read_csv(out / "points" / str(n) / "summary.csv")
        assert list(summary.columns) == list(table.columns)
        pd.testing.assert_frame_equal(table[table["n_loras"] == n].reset_index(drop=True), summary)
        assert (out / "points" / str(n) / "config.json").exists()
    # the same points run directly give the same numbers: the sweep adds nothing of its own
    direct = runner.run_experiment(dataclasses.replace(small_config(), n_loras=8), progress=False)
    pd.testing.assert_frame_equal(numeric(table[table["n_loras"] == 8].reset_index(drop=True)), numeric(direct),
                                  check_dtype=False)
    assert "sweep.csv" in capsys.readouterr().out


def test_interrupted_sweep_resumes_without_rerunning_finished_points(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = [1, 2, 4, 8]
    runs = CountingRuns(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        run_sweep(small_config(), grid, out, progress=False)
    assert runs.calls == [1, 2]
    finished = {n: (out / "points" / str(n) / "point.json").stat().st_mtime_ns for n in (1, 2)}
    assert not (out / "points" / "4" / "point.json").exists()
    # sweep.csv holds the finished points, ready to chart
    partial, _ = read_sweep(out)
    assert partial["n_loras"].tolist() == [n for n in (1, 2) for _ in range(4)]

    runs = CountingRuns(monkeypatch)
    table = run_sweep(small_config(), grid, out, progress=False)
    assert runs.calls == [4, 8]  # the finished points were skipped
    for n, mtime in finished.items():
        assert (out / "points" / str(n) / "point.json").stat().st_mtime_ns == mtime

    # the resumed sweep equals one that was never interrupted, and its first points are those above
    fresh = run_sweep(small_config(), grid, tmp_path / "fresh", progress=False)
    pd.testing.assert_frame_equal(numeric(table), numeric(fresh))
    pd.testing.assert_frame_equal(numeric(partial), numeric(fresh[fresh["n_loras"] <= 2]))

    # a second resume runs nothing at all
    runs = CountingRuns(monkeypatch)
    run_sweep(small_config(), grid, out, progress=False)
    assert runs.calls == []


def test_extending_the_grid_runs_only_new_points(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    run_sweep(small_config(), [1, 2], out, progress=False)
    runs = CountingRuns(monkeypatch)
    table = run_sweep(small_config(), [1, 2, 4], out, progress=False)
    assert runs.calls == [4]
    assert sorted(table["n_loras"].unique()) == [1, 2, 4]


def test_changed_config_in_the_same_folder_is_a_clear_error(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(small_config(), [1], out, progress=False)
    with pytest.raises(LorabenchError, match=r"different config.*seed: 3 -> 4"):
        run_sweep(small_config(seed=4), [1], out, progress=False)


def test_a_sweep_written_before_new_config_fields_still_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    run_sweep(small_config(), [1, 2], out, progress=False)
    new_fields = ("time_scale", "trace_window", "save_detailed")
    for path in [out / "config.json", *(out / "points").glob("*/point.json")]:  # as an older version wrote them
        data = json.loads(path.read_text())
        stored = data["run"] if "run" in data else data["config"]
        for field in new_fields:
            del stored[field]
        path.write_text(json.dumps(data))
    runs = CountingRuns(monkeypatch)
    run_sweep(small_config(), [1, 2, 4], out, progress=False)
    assert runs.calls == [4]  # the old points count as finished: their missing fields had the defaults
    with pytest.raises(LorabenchError, match=r"different config.*save_detailed: None -> False"):
        run_sweep(small_config(save_detailed=False), [1, 2, 4], out, progress=False)


def test_a_folder_that_is_not_a_sweep_is_not_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LorabenchError, match="no sweep config.json"):
        run_sweep(small_config(), [1], tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_point_that_cannot_run_is_recorded_with_its_reason(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    CountingRuns(monkeypatch, refuse={2})
    table = run_sweep(small_config(), [1, 2, 4], out, progress=False)
    refused = table[table["n_loras"] == 2]
    assert len(refused) == 4
    assert refused["status"].str.contains("refused for the test").all()
    assert refused["output_throughput"].isna().all()
    assert (table[table["n_loras"] != 2]["status"] == "ok").all()
    # recorded, so a resume does not retry it
    runs = CountingRuns(monkeypatch)
    run_sweep(small_config(), [1, 2, 4], out, progress=False)
    assert runs.calls == []
    point = json.loads((out / "points" / "2" / "point.json").read_text())
    assert "refused for the test" in point["status"]


def test_strategies_that_do_not_fit_keep_their_rows(tmp_path):
    # a small GPU budget: every strategy fits one adapter; per-lora and compressed cannot hold 4,096
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--n-loras", "1,4096", "--requests", "30", "--seed", "1", "--device", "l40s",
                     "--gpu-memory-utilization", "0.36", "--out", str(out), "--no-progress"]) == 0
    table, _ = read_sweep(out)
    assert len(table) == 8 and (table[table["n_loras"] == 1]["status"] == "ok").all()
    big = table[table["n_loras"] == 4096].set_index("strategy")
    for strategy in ("per-lora", "compressed"):
        assert big.loc[strategy, "status"].startswith("adapters do not fit")
        assert np.isnan(big.loc[strategy, "output_throughput"])
    assert big.loc["single", "status"] == "ok"


def test_a_sweep_with_the_measured_executor(tmp_path):
    # the real decoder runs each step (PyTorch on the CPU here); the charts say which executor
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--executor", "measured", "--model", "tiny", "--requests", "4", "--n-loras", "1,2",
                     "--strategy", "compressed", "--out", str(out), "--no-progress"]) == 0
    table, _ = read_sweep(out)
    assert (table["executor"] == "measured").all() and (table["status"] == "ok").all()
    assert table["strategy"].tolist() == ["single", "compressed"] * 2
    assert (table["output_throughput"] > 0).all()
    assert cli_main(["plot", str(out), "--kind", "relative"]) == 0


def test_parallel_jobs_give_the_same_table(tmp_path):
    serial = run_sweep(small_config(), [1, 4], tmp_path / "serial", progress=False)
    parallel = run_sweep(small_config(), [1, 4], tmp_path / "parallel", jobs=2, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)


@pytest.mark.parametrize("text", ["", "0,4", "4,x", "-1"])
def test_bad_grid_is_refused(text):
    with pytest.raises(LorabenchError, match="--n-loras"):
        parse_n_loras(text)


def test_unknown_workload_fails_before_any_point(tmp_path, capsys):
    assert cli_main(["sweep", "--workload", "no-such-workload", "--n-loras", "1,2", "--out", str(tmp_path / "s")]) == 2
    assert "no-such-workload" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_bad_grid_on_the_command_line_exits_2(tmp_path, capsys):
    assert cli_main(["sweep", "--n-loras", "0,2", "--out", str(tmp_path / "s")]) == 2
    assert "--n-loras" in capsys.readouterr().err
    assert not np.any([p.exists() for p in (tmp_path / "s").glob("*")])
