"""`lorabench compress` end to end: outputs, load back, kernel contract, export, new adapters, errors."""

import json
import shutil

import pandas as pd
import pytest
import torch

from lorabench import cli
from lorabench.adapters import load_collection, read_adapter
from lorabench.adapters.synth import SynthSpec, write_synth_collection
from lorabench.compress import CompressedCollection
from lorabench.errors import LorabenchError
from lorabench.kernels import LoraBatch, reference

N = 10


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    spec = SynthSpec(n=N, ranks=(4, 6), clusters=2, shared=0.75, shared_dim=6, noise=0.02, layers=1, rslora=True,
                     modules=("q_proj", "v_proj", "down_proj"), seed=1)
    return write_synth_collection(spec, tmp_path_factory.mktemp("src") / "adapters", progress=False)


@pytest.fixture(scope="module")
def compressed(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "compressed"
    assert cli.main(["compress", str(source), "--rank", "6", "--clusters", "2", "--compute-dtype", "float64",
                     "--out", str(out)]) == 0
    return out


def explicit_delta(folder, key):
    config, factors = read_adapter(folder)
    A, B = factors[key]
    return config.scaling(key) * B.double() @ A.double()


def test_summary_and_errors_files(compressed, source):
    summary = json.loads((compressed / "summary.json").read_text())
    errors = pd.read_csv(compressed / "errors.csv")
    coll = load_collection(source)
    assert len(errors) == N * len(coll.modules)
    assert list(errors.columns) == ["adapter", "layer", "module", "cluster", "relative_error", "norm"]
    assert summary["mean_error"] == pytest.approx(errors["relative_error"].mean(), rel=1e-5)
    assert summary["max_error"] == pytest.approx(errors["relative_error"].max(), rel=1e-5)
    assert summary["bytes_uncompressed"] == 4 * coll.uncompressed_params() == 4 * summary["params_uncompressed"]
    loaded = CompressedCollection.load(compressed)
    stored = sum(4 * (m.U.numel() + m.V.numel() + m.S.numel()) for m in map(loaded.module, loaded.modules))
    assert summary["bytes_gpu"] == stored == 4 * summary["params_gpu"]
    assert summary["seconds"] > 0
    meta = json.loads((compressed / "metadata.json").read_text())
    assert [a["name"] for a in meta["adapters"]] == coll.names
    assert [a["sha256"] for a in meta["adapters"]] == coll.hashes() and len(coll.hashes()[0]) == 64
    assert not list(compressed.parent.glob(".*tmp"))  # no temporary folder left behind


def test_loaded_collection_reproduces_the_reported_errors_and_the_kernel_contract(compressed, source):
    loaded = CompressedCollection.load(compressed)
    errors = pd.read_csv(compressed / "errors.csv").set_index(["adapter", "layer", "module"])
    x = torch.randn(7, 64, dtype=torch.float64)
    for key in loaded.modules:
        mod = loaded.module(key)
        assert mod.U.shape[0] == 2 and mod.S.shape == (N, 6, 6) and mod.cluster_of.shape == (N,)
        deltas = []
        for i, name in enumerate(loaded.adapter_names):
            M = explicit_delta(source / name, key)
            k = int(mod.cluster_of[i])
            recon = mod.U[k].double() @ mod.S[i].double() @ mod.V[k].double().T
            rel = float(((M - recon) ** 2).sum() / (M**2).sum())
            assert rel == pytest.approx(errors.loc[(name, key.layer, key.module), "relative_error"], abs=1e-5)
            A, B = mod.delta_factors(i)
            assert torch.allclose(B.double() @ A.double(), recon, atol=1e-6)
            deltas.append(recon)
        if key.module == "q_proj":  # compressed_lora applies exactly U_k S_i V_k^T: scaling folded into S_i
            ids = [3, 0, 3, 9, -1, 5, 0]
            y = reference.compressed_lora(x, torch.zeros(7, 64, dtype=torch.float64), mod.U.double(), mod.V.double(),
                                          mod.S.double(), mod.cluster_of, LoraBatch.build(ids))
            want = torch.stack([x[t] @ deltas[i].T if i >= 0 else torch.zeros(64, dtype=torch.float64)
                                for t, i in enumerate(ids)])
            assert torch.allclose(y, want, atol=1e-10)


def test_export_writes_a_peft_adapter_of_the_reconstruction(compressed, tmp_path):
    loaded = CompressedCollection.load(compressed)
    out = tmp_path / "exported"
    assert cli.main(["compress", str(compressed), "--export", "adapter_0004", "--out", str(out)]) == 0
    exported = load_collection(tmp_path)  # a valid one-adapter collection
    config, factors = read_adapter(out)
    assert config.r == 6 and config.lora_alpha == 6 and not config.use_rslora and exported.adapters[0].name == "exported"
    for key in loaded.modules:
        mod = loaded.module(key)
        k = int(mod.cluster_of[4])
        A, B = factors[key]
        assert torch.allclose(B.double() @ A.double(), mod.U[k].double() @ mod.S[4].double() @ mod.V[k].double().T,
                              atol=1e-6)
    with pytest.raises(LorabenchError, match="no adapter named 'nope'"):
        loaded.export_peft("nope", tmp_path / "x")


def test_new_adapters_fit_onto_existing_bases(compressed, source, tmp_path):
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    shutil.copytree(source / "adapter_0007", new_dir / "again_0007")  # an adapter already compressed
    extra = write_synth_collection(SynthSpec(n=12, ranks=(4,), clusters=2, shared=0.75, shared_dim=6, layers=1,
                                             rslora=True, modules=("q_proj", "v_proj", "down_proj"), seed=1),
                                   tmp_path / "more", progress=False)
    shutil.copytree(extra / "adapter_0011", new_dir / "fresh_0011")  # same clusters, never seen
    loaded = CompressedCollection.load(compressed)
    fit = loaded.fit_adapter(new_dir / "again_0007", compute_dtype=torch.float64)
    errors = pd.read_csv(compressed / "errors.csv").set_index(["adapter", "layer", "module"])
    for key in loaded.modules:
        mod = loaded.module(key)
        assert fit.cluster[key] == int(mod.cluster_of[7])
        assert torch.allclose(fit.S[key].float(), mod.S[7], atol=1e-5)
        assert fit.errors[key] == pytest.approx(errors.loc[("adapter_0007", key.layer, key.module), "relative_error"],
                                                abs=1e-5)
    out = tmp_path / "grown"
    assert cli.main(["compress", str(new_dir), "--onto", str(compressed), "--out", str(out), "--quiet"]) == 0
    grown = CompressedCollection.load(out)
    assert grown.adapter_names == loaded.adapter_names + ["again_0007", "fresh_0011"]
    summary = json.loads((out / "summary.json").read_text())
    grown_errors = pd.read_csv(out / "errors.csv")
    assert len(grown_errors) == (N + 2) * 3 and summary["n_adapters"] == N + 2
    stored = sum(4 * (m.U.numel() + m.V.numel() + m.S.numel()) for m in map(grown.module, grown.modules))
    new_params = load_collection(new_dir).uncompressed_params()
    before = json.loads((compressed / "summary.json").read_text())
    assert summary["bytes_gpu"] == stored and summary["params_uncompressed"] == before["params_uncompressed"] + new_params
    fresh = grown_errors[grown_errors["adapter"] == "fresh_0011"]["relative_error"]
    assert fresh.max() < 0.8  # its cluster's bases capture much of its shared part (3 of its 4 ranks)
    for key in grown.modules:
        mod = grown.module(key)
        recon = mod.U[int(mod.cluster_of[-1])].double() @ mod.S[-1].double() @ mod.V[int(mod.cluster_of[-1])].double().T
        M = explicit_delta(new_dir / "fresh_0011", key)
        rel = float(((M - recon) ** 2).sum() / (M**2).sum())
        assert rel == pytest.approx(float(fresh[grown_errors["module"] == key.module].iloc[0]), abs=1e-5)


@pytest.mark.parametrize("method", ["diagonal", "svd"])
def test_other_methods_and_auto_clusters_through_the_cli(source, tmp_path, method):
    out = tmp_path / method
    args = ["compress", str(source), "--rank", "4", "--method", method, "--out", str(out), "--quiet"]
    if method == "diagonal":
        args += ["--clusters", "auto", "--target-error", "0.5", "--normalize"]
    assert cli.main(args) == 0
    loaded = CompressedCollection.load(out)
    summary = json.loads((out / "summary.json").read_text())
    mod = loaded.module(loaded.modules[0])
    assert mod.S.shape == (N, 4)
    if method == "svd":
        assert mod.U.shape[0] == N and summary["bytes_gpu"] > summary["bytes_uncompressed"] * 0.5
    else:
        meta = json.loads((out / "metadata.json").read_text())
        assert all(m["mean_error"] <= 0.5 for m in meta["modules"]) == summary["target_met"]
        assert summary["clusters_used"] == pytest.approx(sum(m["clusters"] for m in meta["modules"]) / 3)


def test_bad_inputs_get_one_clear_error(source, compressed, tmp_path, capsys):
    def fails(args, message):
        assert cli.main(["compress", *args]) == 2
        assert message in capsys.readouterr().err

    fails([str(source), "--out", str(tmp_path / "a")], "--rank is required")
    fails([str(source), "--rank", "0", "--out", str(tmp_path / "a")], "--rank must be >= 1")
    fails([str(source), "--rank", "99", "--out", str(tmp_path / "a")], "--rank 99 exceeds the module's size")
    fails([str(source), "--rank", "4", "--clusters", "11", "--out", str(tmp_path / "a")], "--clusters 11 exceeds the 10")
    fails([str(source), "--rank", "4", "--method", "svd", "--clusters", "2", "--out", str(tmp_path / "a")],
          "takes no --clusters")
    fails([str(source), "--rank", "4", "--memory-budget", "1", "--out", str(tmp_path / "a")], "applies to --clusters auto")
    fails([str(source), "--rank", "4", "--clusters", "auto", "--memory-budget", "1e-9", "--out", str(tmp_path / "a")],
          "--memory-budget too small")
    (tmp_path / "w.json").write_text(json.dumps({"adapter_0001": 2.0, "ghost": 1.0}))
    fails([str(source), "--rank", "4", "--weights", str(tmp_path / "w.json"), "--out", str(tmp_path / "a")],
          "--weights: adapter 'ghost' is not in")
    fails([str(source), "--rank", "4", "--out", str(compressed)], "already exists")
    fails([str(tmp_path), "--export", "adapter_0000", "--out", str(tmp_path / "e")], "not a compressed collection")
    fails([str(source), "--rank", "4", "--model", "mistral-7b", "--out", str(tmp_path / "a")], "but model mistral-7b has")
    assert not (tmp_path / "a").exists()


def test_a_failure_midway_leaves_no_output(source, tmp_path, monkeypatch):
    from lorabench.compress import CompressConfig, compress_collection, run

    calls = []
    real = run.compress_module

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise LorabenchError("interrupted for the test")
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "compress_module", fail_on_third)
    with pytest.raises(LorabenchError, match="interrupted"):
        compress_collection(load_collection(source), CompressConfig(rank=4), tmp_path / "out", progress=False)
    assert len(calls) == 3 and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_adapter_vanishing_after_the_scan_is_named(source, tmp_path):
    from lorabench.compress import CompressConfig, compress_collection

    root = tmp_path / "adapters"
    shutil.copytree(source, root)
    coll = load_collection(root)
    (root / "adapter_0005" / "adapter_model.safetensors").unlink()
    with pytest.raises(LorabenchError, match="adapter .*adapter_0005: cannot read adapter_model.safetensors"):
        compress_collection(coll, CompressConfig(rank=4), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_new_adapters_of_another_layout_are_rejected(compressed, tmp_path):
    other = write_synth_collection(SynthSpec(n=1, ranks=(4,), layers=1, modules=("q_proj", "v_proj")),
                                   tmp_path / "other", progress=False)
    with pytest.raises(LorabenchError, match=r"adapter .*adapter_0000: module layers\.0\.down_proj is missing"):
        CompressedCollection.load(compressed).fit_adapter(other / "adapter_0000")
    svd_dir = tmp_path / "svd"
    source = CompressedCollection.load(compressed).metadata["source"]
    assert cli.main(["compress", source, "--rank", "2", "--method", "svd", "--out", str(svd_dir), "--quiet"]) == 0
    with pytest.raises(LorabenchError, match="method 'svd' has no shared bases"):
        CompressedCollection.load(svd_dir).fit_adapter(other / "adapter_0000")
