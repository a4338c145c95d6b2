"""Vidur-format data: the reader on the committed sample (tests/data/vidur-sample, rows copied from
Vidur), malformed input, the fit recovering known physics, the shipped profiles' targets, and the
`profile --from-vidur` / `fidelity` / `step` commands."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorabench.cli import main
from lorabench.errors import LorabenchError
from lorabench.fidelity import vidur, vidur_fit
from lorabench.presets import DEVICES
from lorabench.sim.physics import KernelPhysics

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "vidur-sample"
SHIPPED = ROOT / "results" / "profiles"
MLP = "compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv"


def test_the_reader_takes_the_model_from_the_csv_and_sums_the_layer():
    table = vidur.read_compute(vidur.compute_path(SAMPLE, "h100"))
    m = table.model
    assert (m.heads, m.kv_heads, m.hidden, m.intermediate, m.vocab) == (32, 32, 4096, 11008, 32768)
    assert sorted(set(zip(table.rows["tp"], table.rows["num_tokens"]))) == [
        (tp, n) for tp in (1, 2) for n in (1, 64, 128, 136, 512, 2048)]
    # the layer of one token at tp 1, summed here from the file's own cells with the csv module
    with open(SAMPLE / MLP) as f:
        row = next(r for r in csv.DictReader(f) if r["num_tokens"] == "1" and r["num_tensor_parallel_workers"] == "1")
    expected = sum(float(row[f"time_stats.{op}.median"]) for op in vidur.OPS) / 1e3
    got = table.rows.query("tp == 1 and num_tokens == 1")["layer"].item()
    assert got == pytest.approx(expected, rel=1e-12)
    # 2,048 tokens appear twice per tp in Vidur's file: their median is kept
    with open(SAMPLE / MLP) as f:
        twice = [float(r["time_stats.mlp_up_proj.median"]) / 1e3 for r in csv.DictReader(f)
                 if r["num_tokens"] == "2048" and r["num_tensor_parallel_workers"] == "1"]
    assert len(twice) == 2
    assert table.rows.query("tp == 1 and num_tokens == 2048")["mlp_up_proj"].item() == pytest.approx(np.median(twice))


def test_the_network_reader_keeps_the_gpus_of_one_node():
    net = vidur.read_network(vidur.network_path(SAMPLE, "h100"))
    assert set(net.rows["gpus"]) == {2, 4, 8} and net.rows["nbytes"].max() == 67108864
    assert (net.rows["seconds"] > 0).all()


def test_the_link_fit_recovers_a_known_link():
    gpus = np.repeat([2, 4, 8], 40)
    nbytes = np.tile(np.geomspace(2e3, 6.4e7, 40), 3)
    seconds = 25e-6 + 2 * (gpus - 1) / gpus * nbytes / 300e9
    table = vidur.NetworkTable(Path("synthetic"), pd.DataFrame({"gpus": gpus, "nbytes": nbytes, "seconds": seconds}))
    latency, bandwidth, error = vidur_fit.fit_link(table)
    assert latency == pytest.approx(25e-6, rel=1e-4) and bandwidth == pytest.approx(300e9, rel=1e-4) and error < 1e-4


def test_the_kernel_fit_recovers_known_physics():
    """Measurements made by a known KernelPhysics (tile 128 x 128 of the h100's list) are fitted back:
    the tile and the predictions of every row come back."""
    device = DEVICES["h100"]
    truth = KernelPhysics(gemm_tile=(128, 128), gemm_flops=0.6, gemm_tile_s=2e-6, gemm_memory=0.7, gemm_kernel_s=4e-6,
                          elementwise_memory=0.5, row_kernel_s=3e-6, row_bandwidth=2e10, flat_kernel_s=1.5e-6)
    model = vidur.read_compute(vidur.compute_path(SAMPLE, "h100")).model
    tokens = np.unique(np.geomspace(1, 4096, 40).astype(int))
    rows = pd.DataFrame({"tp": np.repeat([1, 2], len(tokens)), "num_tokens": np.tile(tokens, 2)})
    table = vidur.ComputeTable(Path("synthetic"), model, rows)
    measured = vidur_fit.predict_ops(table, device, truth)
    rows = pd.concat([rows, measured], axis=1).assign(layer=measured.sum(axis=1))
    table = vidur.ComputeTable(Path("synthetic"), model, rows)
    fitted = vidur_fit.fit_kernels(table, device)
    assert fitted.gemm_tile == (128, 128)
    again = vidur_fit.predict_ops(table, device, fitted)
    assert np.abs(again.to_numpy() / measured.to_numpy() - 1).max() < 0.01


def copy_sample(tmp_path) -> Path:
    root = tmp_path / "vidur"
    shutil.copytree(SAMPLE, root)
    return root


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.drop(columns=["time_stats.mlp_act.median"]), r"mlp.csv: missing column\(s\) time_stats.mlp_act.median"),
    (lambda df: df.assign(**{"time_stats.add.median": ["fast"] + list(df["time_stats.add.median"][1:])}),
     r"mlp.csv line 2: column time_stats.add.median must be a positive number, got 'fast'"),
    (lambda df: df.assign(n_embd=[4096] * (len(df) - 1) + [5120]), r"the model shape .* differs between rows"),
    (lambda df: df.assign(use_gated_mlp=False), r"lorabench models gated \(SwiGLU\) MLPs only"),
])
def test_a_malformed_vidur_csv_gets_one_clear_error(tmp_path, edit, message):
    root = copy_sample(tmp_path)
    edit(pd.read_csv(root / MLP)).to_csv(root / MLP, index=False)
    with pytest.raises(LorabenchError, match=message):
        vidur.read_compute(vidur.compute_path(root, "h100"))


def test_missing_folders_and_ambiguous_models_are_named(tmp_path):
    root = copy_sample(tmp_path)
    with pytest.raises(LorabenchError, match=r"no compute/l40s/ folder \(devices there: a100, h100\)"):
        vidur.compute_path(root, "l40s")
    shutil.copytree(root / "compute/h100/meta-llama/Llama-2-7b-hf", root / "compute/h100/org/other")
    with pytest.raises(LorabenchError, match=r"several models: meta-llama/Llama-2-7b-hf, org/other; choose one with"):
        vidur.compute_path(root, "h100")
    assert vidur.compute_path(root, "h100", "org/other") == root / "compute/h100/org/other/mlp.csv"
    (root / "network/h100_dgx/all_reduce.csv").write_text("size,num_workers\n1,2\n")
    with pytest.raises(LorabenchError, match=r"all_reduce.csv: missing column\(s\) time_stats.all_reduce.median"):
        vidur.read_network(vidur.network_path(root, "h100"))


@pytest.mark.parametrize("device", ["h100", "a100"])
def test_the_shipped_profiles_meet_the_targets_on_vidurs_data(device):
    """Per-layer error on one GPU within 5% over 1-4,096 tokens, no token bucket worse than 10%."""
    profile = json.loads((SHIPPED / f"{device}-vidur.json").read_text())
    table = vidur.read_compute(vidur.compute_path(SHIPPED / "vidur-llama-2-7b", device))
    comparison = vidur.compare(table, DEVICES[device], physics=KernelPhysics.from_dict(profile["kernels"], "shipped"))
    one_gpu = vidur.error_summary(comparison).set_index("tp").loc[1]
    assert one_gpu["mape"] < 0.05 and one_gpu["worst_bucket_mape"] < 0.10
    assert profile["meta"]["fidelity"]["tp 1"]["mape"] == pytest.approx(one_gpu["mape"], abs=1e-4)


def test_profile_from_vidur_then_fidelity_with_it(tmp_path, capsys):
    out = tmp_path / "h100.json"
    assert main(["profile", "--from-vidur", str(SAMPLE), "--device", "h100", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert set(profile) == {"device", "kernels", "meta"} and profile["kernels"]["gemm_tile"] in ([128, 256], [128, 128],
                                                                                                [256, 128])
    assert profile["device"]["link_bandwidth"] > 0 and "tp 2" in profile["meta"]["fidelity"]
    csv_out = tmp_path / "fidelity.csv"
    assert main(["fidelity", "--vidur", str(SAMPLE), "--device", "h100", "--profile", str(out),
                 "--out", str(csv_out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("MAPE over all 12 rows:")
    rows = pd.read_csv(csv_out)
    assert len(rows) == 12
    assert np.allclose(rows["error"], rows["modeled_ms"] / rows["measured_ms"] - 1)


def test_the_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    assert main(["profile", "--from-vidur", str(tmp_path / "nowhere"), "--device", "h100"]) == 2
    assert main(["profile", "--from-vidur", str(SAMPLE)]) == 2
    assert main(["fidelity", "--vidur", str(SAMPLE), "--device", "b200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorabench profile: error: --vidur {tmp_path / 'nowhere'}: no such folder",
                   "lorabench profile: error: --from-vidur needs --device: the device preset the measurements are of "
                   "(h200, h100, h100-64gb, a100, l40s, b200)",
                   f"lorabench fidelity: error: {SAMPLE}: no compute/b200/ folder (devices there: a100, h100)"]


def test_step_prints_the_parts_of_a_70b_step_at_tp_8(capsys):
    assert main(["step", "--model", "llama-3.1-70b", "--device", "h100", "--tp", "8", "--batch", "32",
                 "--context", "1024", "--prefill", "256", "--strategy", "per-lora"]) == 0
    out = capsys.readouterr().out
    assert "profile" in out and "h100-vidur.json" in out
    table = {line.rsplit(None, 2)[0]: line.split()[-2:] for line in out.splitlines()[2:]}
    single, per_lora = (float(v.replace(",", "")) for v in table["step ms"])
    assert 0 < single < per_lora
    assert float(table["communication"][0]) > 0
    assert main(["step", "--model", "llama-3.1-8b", "--device", "a100", "--weight-dtype", "fp8", "--batch", "1",
                 "--context", "10"]) == 2
    assert "a100 has no FP8 tensor cores" in capsys.readouterr().err
