"""`lorabench plot`: every chart kind renders from a small real sweep, and draws the table's numbers."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from lorabench.cli import main as cli_main
from lorabench.errors import LorabenchError
from lorabench.experiments.runner import RunConfig
from lorabench.experiments.sweep import run_sweep
from lorabench.outputs.plots import (
    STRATEGY_COLORS,
    SWEEP_KINDS,
    plot_cdf,
    plot_compression,
    plot_latency,
    plot_memory,
    plot_relative,
    plot_throughput,
    read_compression,
)
from lorabench.outputs.tables import read_sweep

GRID = [1, 4, 16]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "sweep"
    run_sweep(RunConfig(workload="zipf", requests=60, seed=5, model="tiny", device="h200"), GRID, out,
              progress=False)
    return out


@pytest.fixture(scope="module")
def table(sweep_dir):
    # read with pandas directly: the charts must agree with the file, not with our own reader
    return pd.read_csv(sweep_dir / "sweep.csv")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def write_compress_outputs(folder, rng) -> pd.DataFrame:
    """Folders shaped like `lorabench compress` outputs, with random errors; returns what was written."""
    rows = []
    for rank in (8, 16, 32):
        for clusters in (1, 4):
            row = dict(rank=rank, clusters=clusters, method="full", mean_error=float(rng.uniform(0.1, 0.5)),
                       seconds=float(rng.uniform(1, 2)), bytes_gpu=int(rng.integers(1e6, 2e6)),
                       bytes_uncompressed=int(rng.integers(1e7, 2e7)))
            row["max_error"] = row["mean_error"] + float(rng.uniform(0, 0.2))
            path = folder / f"r{rank}-k{clusters}"
            path.mkdir(parents=True)
            summary = {k: row[k] for k in ("mean_error", "max_error", "bytes_gpu", "bytes_uncompressed", "seconds")}
            summary["metadata"] = {k: row[k] for k in ("rank", "method", "clusters")}
            (path / "summary.json").write_text(json.dumps(summary))
            rows.append(row)
    return pd.DataFrame(rows)


def line(ax, label):
    matches = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(matches) == 1, f"expected one line labelled {label!r}, found {[ln.get_label() for ln in ax.get_lines()]}"
    return matches[0]


def assert_title_names_the_run(fig, table):
    text = " ".join(t.get_text() for t in [fig._suptitle] if t) + " ".join(a.get_title() for a in fig.axes)
    for col in ("device", "model", "workload", "executor"):
        assert str(table[col].iloc[0]) in text


@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_every_sweep_chart_kind_renders_png_and_svg(sweep_dir, kind, tmp_path):
    stem = tmp_path / kind
    assert cli_main(["plot", str(sweep_dir), "--kind", kind, "--out", str(stem) + ".png"]) == 0
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text and "</svg>" in text


def test_plot_all_writes_every_sweep_kind(sweep_dir):
    assert cli_main(["plot", str(sweep_dir)]) == 0
    for kind in SWEEP_KINDS:
        for fmt in ("png", "svg"):
            assert (sweep_dir / "charts" / f"{kind}.{fmt}").stat().st_size > 0


def test_throughput_chart_draws_output_throughput(table):
    fig = plot_throughput(table)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "tokens/s" in ax.get_ylabel()
    assert_title_names_the_run(fig, table)
    for strategy, rows in table[table["status"] == "ok"].groupby("strategy"):
        ln = line(ax, strategy)
        np.testing.assert_array_equal(ln.get_xdata(), rows["n_loras"].to_numpy())
        np.testing.assert_allclose(ln.get_ydata(), rows["output_throughput"].to_numpy())
        assert to_hex(ln.get_color()) == to_hex(STRATEGY_COLORS[strategy])


def test_relative_chart_divides_by_single_and_shows_the_headline(table):
    fig = plot_relative(table)
    ax = fig.axes[0]
    single = table[table["strategy"] == "single"].set_index("n_loras")["output_throughput"]
    for strategy, rows in table[table["status"] == "ok"].groupby("strategy"):
        expected = rows["output_throughput"].to_numpy() / single.loc[rows["n_loras"]].to_numpy()
        np.testing.assert_allclose(line(ax, strategy).get_ydata(), expected, rtol=1e-12)
        # the simulator's own ratio column says the same
        np.testing.assert_allclose(expected, rows["throughput_vs_single"].to_numpy(), rtol=1e-6)
        assert to_hex(line(ax, strategy).get_color()) == to_hex(STRATEGY_COLORS[strategy])
    headline = [ln for ln in ax.get_lines() if "headline" in ln.get_label()]
    assert len(headline) == 1 and set(headline[0].get_ydata()) == {0.8}
    assert_title_names_the_run(fig, table)


def test_latency_chart_draws_p50_and_p99(table):
    fig = plot_latency(table)
    ttft_ax, tpot_ax = fig.axes
    assert "ms" in ttft_ax.get_ylabel() and "ms" in tpot_ax.get_ylabel()
    for strategy, rows in table[table["status"] == "ok"].groupby("strategy"):
        for ax, metric in ((ttft_ax, "ttft"), (tpot_ax, "tpot")):
            for q in ("p50", "p99"):
                np.testing.assert_allclose(line(ax, f"{strategy} {q}").get_ydata(), rows[f"{metric}_{q}_ms"])
    assert_title_names_the_run(fig, table)


def test_memory_chart_stacks_weights_kv_and_adapters(table):
    fig = plot_memory(table)
    ax = fig.axes[0]
    ok = table[table["status"] == "ok"]
    bars = ax.patches
    assert len(bars) == 3 * len(ok)
    # bars are drawn strategy by strategy, part by part: the top of each stack is the sum of the three
    tops = {}
    for bar in bars:
        x = round(bar.get_x() + bar.get_width() / 2, 6)
        tops[x] = max(tops.get(x, 0.0), bar.get_y() + bar.get_height())
    expected = (ok["memory_weights_gib"] + ok["memory_kv_gib"] + ok["memory_adapters_gib"]).to_numpy()
    np.testing.assert_allclose(sorted(tops.values()), sorted(expected), rtol=1e-9)
    assert "GiB" in ax.get_ylabel()
    assert_title_names_the_run(fig, table)


def test_cdf_chart_draws_every_request(sweep_dir, table):
    fig = plot_cdf(table, sweep_dir, n_loras=4)
    ttft_ax = fig.axes[0]
    for strategy in ("single", "compressed"):
        requests = pd.read_csv(sweep_dir / "points" / "4" / "requests" / f"{strategy}.csv")
        expected = np.sort((requests["first_token_s"] - requests["arrival_s"]).to_numpy() * 1e3)
        ln = line(ttft_ax, strategy)
        np.testing.assert_allclose(ln.get_xdata(), expected)
        np.testing.assert_allclose(ln.get_ydata(), np.arange(1, len(expected) + 1) / len(expected))
    assert "4 adapters" in fig._suptitle.get_text()


def test_cdf_of_a_point_not_in_the_sweep_is_a_clear_error(sweep_dir, table):
    with pytest.raises(LorabenchError, match="--point 3"):
        plot_cdf(table, sweep_dir, n_loras=3)


def test_compression_chart_draws_error_against_rank_and_clusters(tmp_path):
    written = write_compress_outputs(tmp_path / "compress", np.random.default_rng(0))
    runs = read_compression(tmp_path / "compress")
    fig = plot_compression(runs)
    by_rank, by_clusters = fig.axes
    for k, rows in written.groupby("clusters"):
        rows = rows.sort_values("rank")
        ln = line(by_rank, f"full, clusters {k} (mean)")
        np.testing.assert_array_equal(ln.get_xdata(), rows["rank"])
        np.testing.assert_allclose(ln.get_ydata(), rows["mean_error"])
        np.testing.assert_allclose(line(by_rank, f"full, clusters {k} (max)").get_ydata(), rows["max_error"])
    for r, rows in written.groupby("rank"):
        rows = rows.sort_values("clusters")
        np.testing.assert_allclose(line(by_clusters, f"full, rank {r} (mean)").get_ydata(), rows["mean_error"])
    assert cli_main(["plot", str(tmp_path / "compress"), "--kind", "compression"]) == 0
    assert (tmp_path / "compress" / "charts" / "compression.png").read_bytes()[:8] == PNG_MAGIC
    # `--kind all` on a folder of compress outputs draws just that chart
    assert cli_main(["plot", str(tmp_path / "compress"), "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["compression.png", "compression.svg"]


def test_compression_output_without_a_field_is_a_clear_error(tmp_path):
    folder = tmp_path / "c" / "r8"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"mean_error": 0.1, "metadata": {"rank": 8}}))
    with pytest.raises(LorabenchError, match=r"summary.json: missing field 'max_error'"):
        read_compression(tmp_path / "c")


def test_one_colour_per_strategy_in_every_chart(sweep_dir, table):
    figures = [plot_throughput(table), plot_relative(table), plot_latency(table), plot_cdf(table, sweep_dir)]
    for fig in figures:
        for ax in fig.axes:
            for ln in ax.get_lines():
                strategy = ln.get_label().split(" ")[0]
                if strategy in STRATEGY_COLORS:
                    assert to_hex(ln.get_color()) == to_hex(STRATEGY_COLORS[strategy])


def test_failed_rows_are_left_out_and_named(table):
    broken = table.copy()
    broken.loc[(broken["strategy"] == "paged") & (broken["n_loras"] == 16), "status"] = "adapters do not fit: test"
    fig = plot_throughput(broken)
    assert 16 not in line(fig.axes[0], "paged").get_xdata()
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "paged at N=16" in notes


def test_unknown_kind_is_refused(sweep_dir, capsys):
    with pytest.raises(SystemExit):
        cli_main(["plot", str(sweep_dir), "--kind", "pie"])
    assert "pie" in capsys.readouterr().err


def test_sweep_reader_agrees_with_the_file(sweep_dir, table):
    pd.testing.assert_frame_equal(read_sweep(sweep_dir)[0], table)


def test_auto_clusters_are_read_from_the_modules_choices(tmp_path):
    folder = tmp_path / "c" / "auto"
    folder.mkdir(parents=True)
    summary = dict(mean_error=0.3, max_error=0.5, bytes_gpu=10, bytes_uncompressed=100, seconds=1.0, rank=16,
                   method="full", clusters="auto")
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metadata.json").write_text(json.dumps({"modules": [{"clusters": k} for k in (2, 4, 4, 8, 4)]}))
    assert read_compression(tmp_path / "c")["clusters"].tolist() == [4]
    (folder / "metadata.json").unlink()
    with pytest.raises(LorabenchError, match="metadata.json: clusters 'auto'"):
        read_compression(tmp_path / "c")


def test_compression_chart_reads_real_compress_outputs(tmp_path):
    adapters = tmp_path / "adapters"
    assert cli_main(["adapters", "synth", "--n", "8", "--rank", "4", "--clusters", "2", "--layers", "1",
                     "--modules", "q_proj", "--out", str(adapters)]) == 0
    runs = tmp_path / "compress"
    for rank, clusters in ((2, 1), (4, 1), (4, 2)):
        assert cli_main(["compress", str(adapters), "--rank", str(rank), "--clusters", str(clusters), "--max-iter", "5",
                         "--quiet", "--out", str(runs / f"r{rank}-k{clusters}")]) == 0
    table = read_compression(runs).sort_values(["clusters", "rank"])
    assert table[["rank", "clusters"]].values.tolist() == [[2, 1], [4, 1], [4, 2]]
    fig = plot_compression(table)
    for (method, k), rows in table.groupby(["method", "clusters"]):
        expected = [json.loads((runs / f"r{r}-k{k}" / "summary.json").read_text())["mean_error"] for r in rows["rank"]]
        np.testing.assert_allclose(line(fig.axes[0], f"{method}, clusters {k} (mean)").get_ydata(), expected)
