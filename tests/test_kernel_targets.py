"""The kernel bars (`lorabench bench-kernels --check-targets`) on fresh random GPU-like tables of an
H200 and of an H100, and bench-kernels keeping what it measured when a run stops early."""

import math

import numpy as np
import pandas as pd
import pytest

from lorabench.cli import main
from lorabench.errors import LorabenchError
from lorabench.kernelbench.kernel_targets import check_targets, load_reference

STRATEGIES = ("single", "per_lora_sgmv", "per_lora_bgmv", "paged", "compressed_R64", "torch_gather_bmm")
H200, H100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"


def gpu_table(rng: np.random.Generator, points, device: str = H200) -> pd.DataFrame:
    """A bench-kernels table as a GPU run writes it, every time near its bar so that verdicts mix:
    per-lora, paged and gather-bmm within +-50% of vLLM's, the floor near 30% of their bandwidth,
    compressed 1.0-1.4x single. Eager rows get times that would flip every verdict: the bars read
    graph rows."""
    ref = load_reference().set_index(["M", "N"])
    rows = []
    for m, n in points:
        scale = ref.loc[(m, n), "vllm_specialized_us"] if (m, n) in ref.index else 50.0
        floor, distinct = 0.3 * scale * rng.uniform(0.6, 1.6), int(rng.integers(1, min(m, n) + 1))
        times = {s: scale * rng.uniform(0.5, 1.5) for s in STRATEGIES}
        times["compressed_R64"] = times["single"] * rng.uniform(1.0, 1.4)
        for strategy, us in times.items():
            rows.append(dict(device=device, M=m, N=n, distinct=distinct, floor_us=floor,
                             strategy=strategy, mode="graph", median_us=us))
            rows.append(dict(device=device, M=m, N=n, distinct=distinct, floor_us=floor,
                             strategy=strategy, mode="eager", median_us=1e-3 if us > scale else 1e6))
    return pd.DataFrame(rows)


def expected_verdicts(table: pd.DataFrame) -> dict:
    """The issue's bars, spelled out: (target, strategy, M, N) -> ours <= bar. vs-vllm on an H200
    only; vs-gather-bmm: ours <= gather-bmm (same table) x min(1, vLLM / gather-bmm on the H200)."""
    graph = table[table["mode"] == "graph"].set_index(["M", "N", "strategy"])
    h200 = "H200" in table.device.iloc[0]
    ref = load_reference()
    want = {}
    for r in ref.itertuples():
        if r.M >= 16 and (r.M, r.N, "paged") in graph.index:
            per_lora = "per_lora_bgmv" if r.M <= 16 else "per_lora_sgmv"
            gather = graph.loc[(r.M, r.N, "torch_gather_bmm"), "median_us"]
            for s in (per_lora, "paged"):
                ours = graph.loc[(r.M, r.N, s), "median_us"]
                if h200:
                    want[("vs-vllm", s, r.M, r.N)] = ours <= r.vllm_specialized_us
                want[("vs-gather-bmm", s, r.M, r.N)] = ours <= gather * min(1.0, r.vllm_specialized_us / r.torch_gather_bmm_us)
    if (1024, 1024, "paged") in graph.index:
        for s in ("per_lora_sgmv", "paged"):
            row = graph.loc[(1024, 1024, s)]
            want[("bandwidth", s, 1024, 1024)] = row.median_us <= row.floor_us / 0.3
    if (256, 1024, "single") in graph.index:
        want[("compressed", "compressed_R64", 256, 1024)] = (
            graph.loc[(256, 1024, "compressed_R64"), "median_us"] <= 1.2 * graph.loc[(256, 1024, "single"), "median_us"])
    return want


def full_grid():
    return [(m, n) for m in (1, 16, 64, 256, 1024) for n in (1, 8, 64, 512, 1024)]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("device", [H200, H100])
def test_every_bar_is_judged_as_the_issue_states(seed, device):
    table = gpu_table(np.random.default_rng(seed), full_grid(), device)
    verdicts = check_targets(table)
    got = {(v.target, v.strategy, v.M, v.N): v.ok for v in verdicts.itertuples()}
    want = expected_verdicts(table)
    per_point = 2 if device == H200 else 1  # vs-vllm and vs-gather-bmm, or vs-gather-bmm alone
    assert len(got) == 12 * 2 * per_point + 2 + 1 and got == want
    assert (verdicts.target == "vs-vllm").any() == (device == H200)
    floors = table.drop_duplicates(["M", "N"]).set_index(["M", "N"]).floor_us
    for v in verdicts.itertuples():
        assert v.x_floor == pytest.approx(v.ours_us / floors.loc[(v.M, v.N)])
        assert v.ratio == pytest.approx(v.ours_us / v.bar_us)


def test_a_subset_of_the_grid_checks_only_the_points_it_has():
    table = gpu_table(np.random.default_rng(3), [(16, 8), (256, 1024), (512, 2)])
    verdicts = check_targets(table)
    assert set(zip(verdicts.target, verdicts.M, verdicts.N)) == {
        ("vs-vllm", 16, 8), ("vs-vllm", 256, 1024), ("vs-gather-bmm", 16, 8), ("vs-gather-bmm", 256, 1024),
        ("compressed", 256, 1024)}
    assert {(k[0], k[2], k[3]) for k in expected_verdicts(table)} == set(zip(verdicts.target, verdicts.M, verdicts.N))


def test_a_failed_strategy_misses_its_bar():
    table = gpu_table(np.random.default_rng(4), [(1024, 1024)])
    graph = table["mode"] == "graph"
    table.loc[(table.strategy == "paged") & graph, "median_us"] = math.nan
    table.loc[(table.strategy == "per_lora_sgmv") & graph, "median_us"] = 1e-6  # meets every bar it has
    table.loc[(table.strategy == "torch_gather_bmm") & graph, "median_us"] = math.nan
    verdicts = check_targets(table).set_index(["target", "strategy"])
    assert not verdicts.loc[("vs-vllm", "paged"), "ok"] and not verdicts.loc[("bandwidth", "paged"), "ok"]
    # a failed baseline leaves its bar unknown: missed, whatever our time
    assert verdicts.loc[("vs-vllm", "per_lora_sgmv"), "ok"] and not verdicts.loc[("vs-gather-bmm", "per_lora_sgmv"), "ok"]


def test_a_table_from_before_the_gather_bmm_baseline_gets_the_other_bars():
    table = gpu_table(np.random.default_rng(9), full_grid())
    verdicts = check_targets(table[table.strategy != "torch_gather_bmm"])
    assert set(verdicts.target) == {"vs-vllm", "bandwidth", "compressed"} and len(verdicts) == 12 * 2 + 2 + 1


def test_tables_without_gpu_timings_or_reference_points_are_refused():
    cpu = gpu_table(np.random.default_rng(5), [(16, 8)]).assign(mode="cpu")
    with pytest.raises(LorabenchError, match="no CUDA-graph timings"):
        check_targets(cpu)
    with pytest.raises(LorabenchError, match="none of the reference points"):
        check_targets(gpu_table(np.random.default_rng(6), [(1, 1), (3, 5)]))


def test_check_targets_command(tmp_path, capsys):
    rng = np.random.default_rng(7)
    table = gpu_table(rng, full_grid())
    path = tmp_path / "h200.csv"
    table.to_csv(path, index=False)
    verdicts = check_targets(table)
    assert main(["bench-kernels", "--check-targets", str(path)]) == (0 if verdicts.ok.all() else 1)
    out = capsys.readouterr().out
    assert f"{int(verdicts.ok.sum())} of {len(verdicts)} met" in out and "note:" not in out
    # every bar met: exit 0 (gather-bmm, the baseline, slow enough for its bars)
    table.loc[table["mode"] == "graph", "median_us"] = 1e-6
    table.loc[table.strategy == "torch_gather_bmm", "median_us"] = 1e3
    table.to_csv(path, index=False)
    assert main(["bench-kernels", "--check-targets", str(path)]) == 0
    assert f"{len(verdicts)} of {len(verdicts)} met" in capsys.readouterr().out


def test_check_targets_writes_the_verdicts_of_an_h100_table(tmp_path, capsys):
    table = gpu_table(np.random.default_rng(10), full_grid(), H100).assign(
        date="2026-12-01", versions="torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0, driver 580.159.04")
    path, out = tmp_path / "h100.csv", tmp_path / "targets.csv"
    table.to_csv(path, index=False)
    code = main(["bench-kernels", "--check-targets", str(path), "--out", str(out)])
    verdicts = pd.read_csv(out)
    assert code == (0 if verdicts.ok.all() else 1)
    assert "note: vLLM's figures were measured on an H200" in capsys.readouterr().out
    got = {(v.target, v.strategy, v.M, v.N): v.ok for v in verdicts.itertuples()}
    assert got == expected_verdicts(table)
    assert (verdicts.device == H100).all() and (verdicts.versions == table.versions[0]).all()
    assert (verdicts.command == f"lorabench bench-kernels --check-targets {path} --out {out}").all()


def test_check_targets_reports_bad_files(tmp_path, capsys):
    assert main(["bench-kernels", "--check-targets", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    pd.DataFrame({"M": [1], "speed": [2]}).to_csv(other, index=False)
    assert main(["bench-kernels", "--check-targets", str(other)]) == 2
    assert "not a bench-kernels table (no column N" in capsys.readouterr().err
    cpu = tmp_path / "cpu.csv"
    gpu_table(np.random.default_rng(8), [(16, 8)]).assign(mode="cpu").to_csv(cpu, index=False)
    assert main(["bench-kernels", "--check-targets", str(cpu)]) == 2
    assert "no CUDA-graph timings" in capsys.readouterr().err


def test_an_interrupted_grid_keeps_the_points_it_finished(tmp_path, monkeypatch):
    import lorabench.kernelbench.bench_kernels as bench

    real, calls = bench.time_call, []

    def stopping(call, device):
        calls.append(1)
        if len(calls) > 1 + 2 * 7:  # the copy bandwidth, then seven columns a point: stop in the third
            raise KeyboardInterrupt
        return real(call, device)

    monkeypatch.setattr(bench, "time_call", stopping)
    out = tmp_path / "k.csv"
    assert main(["bench-kernels", "--m", "1,2,3", "--n", "2", "--d", "16", "--out", str(out)]) == 130
    table = pd.read_csv(out)
    assert sorted(set(table.M)) == [1, 2] and len(table) == 2 * 7
    assert (table.device == "cpu").all() and table.command.str.contains("--m 1,2,3").all()
    assert not list(tmp_path.glob(".*tmp"))
