"""`lorabench report`: the Markdown page, and clear errors for folders that are not sweeps."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from lorabench.cli import main as cli_main
from lorabench.errors import LorabenchError
from lorabench.experiments.runner import RunConfig
from lorabench.experiments.sweep import run_sweep
from lorabench.outputs.plots import SWEEP_KINDS
from lorabench.outputs.tables import read_sweep


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sweep"
    run_sweep(RunConfig(workload="zipf", requests=40, seed=2, model="tiny", device="h200"), [1, 8], out,
              progress=False)
    return out


def test_report_has_the_table_and_links_every_chart(sweep_dir, capsys):
    assert cli_main(["report", str(sweep_dir)]) == 0
    page = (sweep_dir / "report.md").read_text()
    table = pd.read_csv(sweep_dir / "sweep.csv")
    for col in ("device", "model", "workload", "executor"):
        assert str(table[col].iloc[0]) in page.splitlines()[0]
    images = re.findall(r"!\[(\w+)\]\(([^)]+)\)", page)
    assert {kind for kind, _ in images} == set(SWEEP_KINDS)
    for _, path in images:  # links are relative to the page and point at real files
        assert (sweep_dir / path).stat().st_size > 0
        assert (sweep_dir / path).with_suffix(".svg").exists()
    rows = [ln for ln in page.splitlines() if ln.startswith("| ") and not ln.startswith("| adapters")]
    assert len(rows) == len(table)
    for (_, expected), row in zip(table.iterrows(), rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"{expected['n_loras']:,}" and cells[1] == expected["strategy"]
        assert cells[2] == f"{expected['output_throughput']:,.0f}"
    assert "report.md" in capsys.readouterr().out


def test_report_to_another_folder_links_charts_relative_to_the_page(sweep_dir, tmp_path):
    out = tmp_path / "docs" / "page.md"
    out.parent.mkdir()
    assert cli_main(["report", str(sweep_dir), "--out", str(out)]) == 0
    for path in re.findall(r"!\[\w+\]\(([^)]+)\)", out.read_text()):
        assert (out.parent / path).exists()


def broken_copy(sweep_dir, tmp_path, edit) -> str:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((sweep_dir / "config.json").read_text())
    edit(folder, pd.read_csv(sweep_dir / "sweep.csv"))
    return str(folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f, t: None, r"no sweep\.csv, not a sweep folder"),
        (lambda f, t: (f / "sweep.csv").write_text(""), r"sweep\.csv: empty file"),
        (lambda f, t: t.head(0).to_csv(f / "sweep.csv", index=False), r"sweep\.csv: no rows"),
        (lambda f, t: t.drop(columns=["output_throughput", "executor"]).to_csv(f / "sweep.csv", index=False),
         r"sweep\.csv: missing column\(s\) output_throughput, executor"),
        (lambda f, t: t.assign(n_loras="many").to_csv(f / "sweep.csv", index=False),
         r"sweep\.csv: column n_loras must hold integers"),
    ],
    ids=["missing", "empty-file", "header-only", "missing-columns", "bad-n-loras"],
)
def test_bad_folders_give_clear_errors(sweep_dir, tmp_path, capsys, edit, message):
    folder = broken_copy(sweep_dir, tmp_path, edit)
    with pytest.raises(LorabenchError, match=message):
        read_sweep(folder)
    for command in ("report", "plot"):
        assert cli_main([command, folder]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err


def test_a_run_folder_is_not_taken_for_a_sweep(sweep_dir, tmp_path):
    with pytest.raises(LorabenchError, match="single run folder"):
        read_sweep(sweep_dir / "points" / "1")
    with pytest.raises(LorabenchError, match="no such folder"):
        read_sweep(tmp_path / "nowhere")


def test_report_adds_the_compression_chart_when_the_sweep_has_compress_outputs(sweep_dir, tmp_path):
    folder = tmp_path / "with-compression"
    folder.mkdir()
    for name in ("sweep.csv", "config.json"):
        (folder / name).write_text((sweep_dir / name).read_text())
    for rank in (8, 16):
        run = folder / "compression" / f"r{rank}"
        run.mkdir(parents=True)
        run.joinpath("summary.json").write_text(
            '{"mean_error": %f, "max_error": 0.9, "bytes_gpu": 10, "bytes_uncompressed": 100, "seconds": 1,'
            ' "rank": %d, "method": "full", "clusters": 1}' % (0.5 / rank, rank))
    # the cdf chart reads the points' requests: link them
    (folder / "points").symlink_to(sweep_dir / "points")
    assert cli_main(["report", str(folder)]) == 0
    kinds = {kind for kind, _ in re.findall(r"!\[(\w+)\]\(([^)]+)\)", (folder / "report.md").read_text())}
    assert kinds == set(SWEEP_KINDS) | {"compression"}


def test_report_of_an_unfinished_sweep_names_the_missing_points(sweep_dir, tmp_path):
    """A sweep stopped after its first point: sweep.csv holds that point, config.json the whole grid."""
    folder = tmp_path / "partial"
    folder.mkdir()
    config = json.loads((sweep_dir / "config.json").read_text())
    config["n_loras"] = [1, 8, 4096]
    (folder / "config.json").write_text(json.dumps(config))
    table = pd.read_csv(sweep_dir / "sweep.csv")
    table[table["n_loras"] == 1].to_csv(folder / "sweep.csv", index=False)
    shutil.copytree(sweep_dir / "points" / "1", folder / "points" / "1")
    assert cli_main(["report", str(folder)]) == 0
    page = (folder / "report.md").read_text()
    assert "**Unfinished sweep:** 2 of 3 points have not run yet (8, 4,096 adapters)" in page
    assert "Unfinished" not in (sweep_dir / "report.md").read_text()
