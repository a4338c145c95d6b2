"""`lorabench capacity` end to end with the real simulator: the table, what it claims checked against
`run_experiment` at the rates found, resume from the cache, refusals, parallel jobs, the chart."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import lorabench.experiments.capacity as capacity
from lorabench.cli import main as cli_main
from lorabench.errors import LorabenchError
from lorabench.experiments.capacity import SearchSettings, objectives_for, run_capacity
from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.outputs.tables import CAPACITY_COLUMNS, read_capacity

# Mistral-7B on the modeled H200 with 100 requests: an evaluation takes a few milliseconds, and
# SLOs tight enough that every search brackets its capacity (see test_what_the_table_claims_holds).
FLAGS = ["--requests", "100", "--seed", "3", "--strategy", "per-lora", "--ttft-slo-ms", "300",
         "--tpot-slo-ms", "30", "--rate-tol", "0.05", "--no-progress"]
GRID = [1, 64]
REAL_SIMULATE = capacity.simulate


def small_config(**overrides) -> RunConfig:
    fields = dict(requests=100, seed=3, strategies=("per-lora",), ttft_slo_ms=300.0, tpot_slo_ms=30.0)
    return RunConfig(**{**fields, **overrides})


def settings_for(config: RunConfig, goodput_target=None) -> SearchSettings:
    return SearchSettings(objectives_for(config, goodput_target), start_rate=40.0, rel_tol=0.05)


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a search."""


class CountingSimulations:
    """Wraps capacity.simulate: records every simulation, and raises after `fail_after` of them."""

    def __init__(self, monkeypatch, fail_after=None):
        self.calls: list[tuple[str, int, float]] = []
        self.fail_after = fail_after
        monkeypatch.setattr(capacity, "simulate", self)

    def __call__(self, config, strategy):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise Interrupted
        self.calls.append((strategy, config.n_loras, config.rate))
        return REAL_SIMULATE(config, strategy)


def test_capacity_end_to_end(tmp_path, capsys):
    out = tmp_path / "cap"
    assert cli_main(["capacity", "--n-loras", "64,1", *FLAGS, "--out", str(out)]) == 0
    table = read_capacity(out)
    assert list(table.columns) == list(CAPACITY_COLUMNS)
    assert table[["n_loras", "strategy"]].values.tolist() == [[n, s] for n in GRID for s in ("single", "per-lora")]
    assert (table["status"] == "ok").all()
    assert (table["objectives"] == "ttft_p99_ms <= 300; tpot_p99_ms <= 30").all()
    # per-lora at 64 adapters (few slots under matched memory) sustains far less than at 1
    per_lora = table[table["strategy"] == "per-lora"].set_index("n_loras")["max_rate"]
    assert per_lora[64] < 0.5 * per_lora[1]
    evaluations = pd.read_csv(out / "evaluations.csv")
    assert evaluations.groupby(["strategy", "n_loras"]).size().sum() == table["iterations"].sum()
    for suffix in ("png", "svg"):
        assert (out / "charts" / f"capacity.{suffix}").stat().st_size > 0
    assert "capacity.csv" in capsys.readouterr().out
    assert cli_main(["plot", str(out), "--kind", "capacity", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.svg").exists()


def test_what_the_table_claims_holds(tmp_path):
    """At max_rate a full `run` meets both SLOs with the row's metrics; at failing_rate it does not;
    the two are within the tolerance."""
    config = small_config()
    table = run_capacity(config, [64], tmp_path / "cap", settings_for(config), progress=False)
    for row in table.itertuples():
        assert row.failing_rate <= row.max_rate * 1.05
        at_max = one_row(config, 64, row.max_rate, row.strategy)
        assert at_max["ttft_p99_ms"] <= 300 and at_max["tpot_p99_ms"] <= 30
        for col in ("request_throughput", "output_throughput", "ttft_p99_ms", "tpot_p99_ms"):
            assert getattr(row, col) == pytest.approx(at_max[col], rel=1e-12)
        assert row.goodput_fraction == pytest.approx(at_max["goodput"] / at_max["request_throughput"], rel=1e-12)
        above = one_row(config, 64, row.failing_rate, row.strategy)
        failed = [f"{m} <= {limit:g}" for m, limit in (("ttft_p99_ms", 300), ("tpot_p99_ms", 30)) if above[m] > limit]
        assert failed and row.bound_by == "; ".join(failed)


def one_row(config: RunConfig, n: int, rate: float, strategy: str) -> pd.Series:
    summary = run_experiment(dataclasses.replace(config, n_loras=n, rate=rate), progress=False)
    return summary.set_index("strategy").loc[strategy]


def test_goodput_target(tmp_path):
    config = small_config(strategies=("compressed",))
    table = run_capacity(config, [16], tmp_path / "cap", settings_for(config, goodput_target=0.9), progress=False)
    for row in table.itertuples():
        assert row.objectives == "goodput_fraction >= 0.9"
        assert row.goodput_fraction >= 0.9
        above = one_row(config, 16, row.failing_rate, row.strategy)
        assert above["goodput"] / above["request_throughput"] < 0.9


def test_interrupted_capacity_resumes_from_the_cache(tmp_path, monkeypatch):
    out, config = tmp_path / "cap", small_config()
    settings = settings_for(config)
    sims = CountingSimulations(monkeypatch, fail_after=13)
    with pytest.raises(Interrupted):
        run_capacity(config, GRID, out, settings, progress=False)
    first = list(sims.calls)
    assert len(first) == 13
    partial = read_capacity(out)  # the searches finished before the interruption are in the table
    assert 1 <= len(partial) < 4 and (partial["status"] == "ok").all()

    sims = CountingSimulations(monkeypatch)
    resumed = run_capacity(config, GRID, out, settings, progress=False)
    assert not set(sims.calls) & set(first)  # nothing simulated twice
    total = len(first) + len(sims.calls)
    assert total == resumed["iterations"].sum()

    sims = CountingSimulations(monkeypatch)
    again = run_capacity(config, GRID, out, settings, progress=False)
    assert sims.calls == []  # a finished run replays every search from the cache
    pd.testing.assert_frame_equal(again, resumed)

    fresh = run_capacity(config, GRID, tmp_path / "fresh", settings, progress=False)
    pd.testing.assert_frame_equal(fresh, resumed)
    pd.testing.assert_frame_equal(partial, fresh.iloc[:len(partial)])


def test_tightening_the_tolerance_reuses_the_cached_rates(tmp_path, monkeypatch):
    out, config = tmp_path / "cap", small_config(strategies=("single",))
    loose = run_capacity(config, [1], out, settings_for(config), progress=False)
    sims = CountingSimulations(monkeypatch)
    tight = run_capacity(config, [1], out, dataclasses.replace(settings_for(config), rel_tol=0.01), progress=False)
    # bracketing and the first halvings are the same rates: only the extra halvings simulate
    assert len(sims.calls) == tight["iterations"].iloc[0] - loose["iterations"].iloc[0]
    assert tight["max_rate"].iloc[0] >= loose["max_rate"].iloc[0]


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    out, config = tmp_path / "cap", small_config(strategies=("single",))
    run_capacity(config, [1], out, settings_for(config), progress=False)
    with pytest.raises(LorabenchError, match=r"different config.*seed: 3 -> 4"):
        run_capacity(small_config(seed=4), [1], out, settings_for(config), progress=False)


def test_a_sweep_folder_is_not_taken_for_a_capacity_folder(tmp_path):
    from lorabench.experiments.sweep import run_sweep

    run_sweep(small_config(), [1], tmp_path / "sweep", progress=False)
    with pytest.raises(LorabenchError, match="not a capacity search config"):
        run_capacity(small_config(), [1], tmp_path / "sweep", settings_for(small_config()), progress=False)


def test_a_folder_of_other_files_is_not_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LorabenchError, match="no capacity search config.json"):
        run_capacity(small_config(), [1], tmp_path, settings_for(small_config()), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_parallel_jobs_give_the_same_results(tmp_path):
    config = small_config()
    serial = run_capacity(config, GRID, tmp_path / "serial", settings_for(config), progress=False)
    parallel = run_capacity(config, GRID, tmp_path / "parallel", settings_for(config), jobs=2, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)
    for name in ("evaluations.csv", "capacity.csv"):
        assert (tmp_path / "serial" / name).read_text() == (tmp_path / "parallel" / name).read_text()


def test_strategies_that_do_not_fit_are_not_searched(tmp_path, monkeypatch):
    # a small GPU budget: per-lora and compressed cannot hold 4,096 adapters, at any rate
    config = small_config(requests=30, device="l40s", gpu_memory_utilization=0.36,
                          strategies=("per-lora", "compressed"))
    sims = CountingSimulations(monkeypatch)
    settings = dataclasses.replace(settings_for(config), max_rate=160.0)
    table = run_capacity(config, [4096], tmp_path / "cap", settings, progress=False).set_index("strategy")
    for strategy in ("per-lora", "compressed"):
        assert table.loc[strategy, "status"].startswith("not searched: adapters do not fit")
        assert np.isnan(table.loc[strategy, "max_rate"]) and table.loc[strategy, "iterations"] == 0
    assert table.loc["single", "status"] == "ok"
    assert {s for s, _, _ in sims.calls} == {"single"}
    assert (tmp_path / "cap" / "charts" / "capacity.png").exists()


def test_nothing_fits_every_row_says_why_and_no_empty_chart_is_drawn(tmp_path):
    config = small_config(device="l40s", gpu_memory_utilization=0.1)  # 4.8 GB: not even the weights
    table = run_capacity(config, [1], tmp_path / "cap", settings_for(config), progress=False)
    assert table["status"].str.startswith("not searched:").all() and table["max_rate"].isna().all()
    assert not (tmp_path / "cap" / "charts").exists()


def test_a_search_that_reaches_the_ceiling_says_so(tmp_path):
    config = small_config(strategies=("single",))
    settings = dataclasses.replace(settings_for(config), max_rate=60.0)  # single passes up to about 190 req/s
    row = run_capacity(config, [1], tmp_path / "cap", settings, progress=False).iloc[0]
    assert row["max_rate"] == 60.0 and row["bound_by"] == "ceiling 60 req/s" and np.isnan(row["failing_rate"])
    assert row["iterations"] == 2  # 40, then the ceiling (not 80)
    assert (tmp_path / "cap" / "charts" / "capacity.png").exists()


def test_workloads_without_a_rate_are_refused(tmp_path, capsys):
    assert cli_main(["capacity", "--workload", "offline", "--out", str(tmp_path / "c")]) == 2
    assert "do not depend on a rate" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, message", [
    (["--rate-tol", "0"], "--rate-tol"), (["--max-rate", "10"], "--max-rate"),
    (["--goodput-target", "1.5"], "--goodput-target"), (["--jobs", "0"], "--jobs"), (["--n-loras", "0"], "--n-loras"),
])
def test_bad_flags_exit_2_with_the_flag_named(tmp_path, capsys, flags, message):
    assert cli_main(["capacity", *flags, "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_evaluation_cache_records_its_config(tmp_path):
    config = small_config(strategies=("single",))
    run_capacity(config, [1], tmp_path / "cap", settings_for(config), progress=False)
    record = json.loads(next((tmp_path / "cap" / "evaluations" / "single" / "1").glob("*.json")).read_text())
    assert record["config"]["rate"] == record["rate"] and record["config"]["n_loras"] == 1
    assert record["metrics"]["status"] == "ok"


def test_replicas_grid_and_the_fewest_replicas_for_a_target_rate(tmp_path, capsys):
    """With --replicas 1,2,4 every (adapters, replicas, strategy) has its search; the rate a cluster
    sustains grows with its replicas, and --target-rate names the fewest that reach it."""
    out = tmp_path / "cap"
    assert cli_main(["capacity", "--n-loras", "64", "--replicas", "1,2,4", "--router", "least-loaded", *FLAGS,
                     "--target-rate", "60", "--out", str(out)]) == 0
    table = read_capacity(out)
    assert table[["replicas", "strategy"]].values.tolist() == [[g, s] for g in (1, 2, 4) for s in ("single", "per-lora")]
    for strategy, rows in table.groupby("strategy"):
        rates = rows.sort_values("replicas")["max_rate"].to_numpy()
        assert (np.diff(rates) > 0).all(), f"{strategy}: {rates}"
    printed = capsys.readouterr().out
    fewest = capacity.fewest_replicas(table, 60.0)
    for _, row in fewest.iterrows():  # the smallest G whose max_rate reaches 60, checked on the table
        mine = table[(table["strategy"] == row["strategy"]) & (table["max_rate"] >= 60.0)]
        want = str(int(mine["replicas"].min())) if len(mine) else "more than 4"
        assert row["replicas"] == want and want in printed
    # each cached evaluation ran the replicas it says
    record = json.loads(next((out / "evaluations" / "per-lora" / "64x4").glob("rate-*.json")).read_text())
    assert record["config"]["replicas"] == 4 and record["config"]["router"] == "least-loaded"
    assert cli_main(["plot", str(out), "--kind", "capacity"]) == 0
