"""`lorabench eval` against an independent float64 forward (tests/hf_reference.py) of a hand-written
checkpoint: base and original losses and KL as the reference computes them, a compressed version
whose delta is exact (equal to the original) and one whose delta is zero (equal to the base); an
adapter without rows reported; bad data and bad bases one clear error each."""

import json
import math

import pandas as pd
import pytest
import torch
from hf_reference import random_tensors, reference_logits, tiny_config, write_checkpoint
from safetensors.torch import load_file, save_file

from lorabench.adapters import SynthSpec, read_adapter, write_synth_collection
from lorabench.cli import main
from lorabench.compress import CompressConfig, compress_collection
from lorabench.adapters.collection import load_collection

MODULES = ("q_proj", "v_proj", "gate_proj", "down_proj")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = tiny_config()
    tensors = random_tensors(config, seed=7)
    ckpt = write_checkpoint(root / "ckpt", config, tensors)
    # Planted adapters that a rank-4 shared basis holds exactly; norms large enough to matter.
    spec = SynthSpec(n=3, model=str(ckpt / "config.json"), ranks=(4,), clusters=1, shared=1.0, shared_dim=4,
                     noise=0.0, norm_spread=0.0, modules=MODULES, alpha_per_rank=2.0, seed=4)
    write_synth_collection(spec, root / "adapters", progress=False)
    coll = load_collection(root / "adapters")
    compress_collection(coll, CompressConfig(rank=4), root / "exact", progress=False, compute_dtype=torch.float64)
    compress_collection(coll, CompressConfig(rank=4), root / "zero", progress=False)
    for path in (root / "zero" / "modules").iterdir():  # every S_i zero: no delta at all
        t = load_file(str(path))
        t["S"] = torch.zeros_like(t["S"])
        save_file(t, str(path))
    g = torch.Generator().manual_seed(0)
    rows = [{"adapter": f"adapter_000{i}", "tokens": torch.randint(50, (n,), generator=g).tolist()}
            for i, n in ((0, 12), (0, 30), (1, 17), (0, 2))]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return root, config, tensors, rows


def run_eval(root, *extra, out="out"):
    return main(["eval", "--adapters", str(root / "adapters"), "--base", str(root / "ckpt"), "--data",
                 str(root / "data.jsonl"), "--out", str(root / out), "--quiet", *extra])


def reference_metrics(config, tensors, rows, adapter_folder):
    """Per adapter: token-mean loss of base and original, KL(original || base), base top-1 agreement."""
    cfg, factors = read_adapter(adapter_folder)
    deltas = {(k.layer, k.module): cfg.scaling(k) * B.double() @ A.double() for k, (A, B) in factors.items()}
    loss_b = loss_o = kl = agree = n = 0.0
    for tokens in rows:
        lb = torch.log_softmax(reference_logits(config, tensors, tokens)[:-1], -1)
        lo = torch.log_softmax(reference_logits(config, tensors, tokens, lambda i, m: deltas.get((i, m)))[:-1], -1)
        target = torch.tensor(tokens[1:])
        loss_b -= float(lb.gather(1, target[:, None]).sum())
        loss_o -= float(lo.gather(1, target[:, None]).sum())
        kl += float((lo.exp() * (lo - lb)).sum())
        agree += float((lo.argmax(-1) == lb.argmax(-1)).sum())
        n += len(tokens) - 1
    return loss_b / n, loss_o / n, kl / n, agree / n, int(n)


def test_eval_against_a_float64_reference_with_exact_and_zero_compressions(setup):
    root, config, tensors, rows = setup
    assert run_eval(root, "--compressed", str(root / "exact"), str(root / "zero")) == 0
    table = pd.read_csv(root / "out" / "eval.csv")
    assert list(table.columns[:6]) == ["adapter", "version", "tokens", "loss", "kl_vs_original", "top1_agreement"]
    assert list(table["version"].unique()) == ["base", "original", "exact", "zero"]
    got = table.set_index(["adapter", "version"])
    for adapter in ("adapter_0000", "adapter_0001"):
        mine = [r["tokens"] for r in rows if r["adapter"] == adapter]
        loss_b, loss_o, kl, agree, n = reference_metrics(config, tensors, mine, root / "adapters" / adapter)
        assert kl > 1e-3  # the adapter changes predictions
        assert got.loc[(adapter, "base"), "tokens"] == n
        assert got.loc[(adapter, "base"), "loss"] == pytest.approx(loss_b, rel=1e-5)
        assert got.loc[(adapter, "original"), "loss"] == pytest.approx(loss_o, rel=1e-5)
        assert got.loc[(adapter, "base"), "kl_vs_original"] == pytest.approx(kl, rel=1e-4)
        assert got.loc[(adapter, "base"), "top1_agreement"] == pytest.approx(agree)
        assert got.loc[(adapter, "original"), "kl_vs_original"] == 0
        # Exact compression: the original's behaviour; zero compression: the base's.
        assert got.loc[(adapter, "exact"), "loss"] == pytest.approx(loss_o, rel=1e-5)
        assert got.loc[(adapter, "exact"), "kl_vs_original"] < 1e-7
        assert got.loc[(adapter, "exact"), "top1_agreement"] == 1
        assert got.loc[(adapter, "exact"), "relative_error"] < 1e-6
        for metric in ("loss", "kl_vs_original", "top1_agreement", "accuracy"):
            assert got.loc[(adapter, "zero"), metric] == pytest.approx(got.loc[(adapter, "base"), metric], rel=1e-5)
    # No rows: reported with 0 tokens and empty metrics, not left out.
    assert (got.loc["adapter_0002"]["tokens"] == 0).all() and got.loc["adapter_0002"]["loss"].isna().all()
    summary = pd.read_csv(root / "out" / "summary.csv").set_index("version")
    assert summary.loc["exact", "kept_loss_improvement"] == pytest.approx(1, abs=1e-4)
    assert summary.loc["zero", "kept_loss_improvement"] == pytest.approx(0, abs=1e-4)
    assert (root / "out" / "charts" / "kept_improvement.png").is_file()


def test_text_rows_on_a_preset_are_utf8_bytes(tmp_path):
    write_synth_collection(SynthSpec(n=1, ranks=(2,), seed=1), tmp_path / "a", progress=False)
    (tmp_path / "d.jsonl").write_text(json.dumps({"adapter": "adapter_0000", "text": "héllo"}) + "\n")
    assert main(["eval", "--adapters", str(tmp_path / "a"), "--base", "tiny", "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "o" / "eval.csv")
    assert table["tokens"].tolist() == [5, 5] and math.isclose(table.loc[1, "top1_agreement"], 1)


@pytest.mark.parametrize("line, words", [
    ("{not json", "line 2: not a JSON object"),
    ('["adapter_0000"]', "line 2: expected a JSON object"),
    ('{"tokens": [1, 2]}', "line 2: field 'adapter' must be"),
    ('{"adapter": "adapter_0009", "tokens": [1, 2]}', "line 2: adapter 'adapter_0009' is not in the collection"),
    ('{"adapter": "adapter_0000", "tokens": [1, 2], "text": "ab"}', "line 2: give exactly one of 'text' and 'tokens'"),
    ('{"adapter": "adapter_0000"}', "line 2: give exactly one of 'text' and 'tokens'"),
    ('{"adapter": "adapter_0000", "tokens": [1, 50]}', "line 2: token id 50 is outside the model's vocabulary 0..49"),
    ('{"adapter": "adapter_0000", "tokens": [1, "2"]}', "line 2: field 'tokens' must be a list of integer"),
    ('{"adapter": "adapter_0000", "tokens": [7]}', "line 2: 1 token(s); a row needs at least 2"),
    ('{"adapter": "adapter_0000", "tokens": [' + ",".join(["1"] * 129) + "]}", "129 tokens, more than the model's context of 128"),
    ('{"adapter": "adapter_0000", "text": "abc"}', "no tokenizer.json"),
])
def test_bad_data_rows_get_one_clear_error(setup, capsys, tmp_path, line, words):
    root = setup[0]
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"adapter": "adapter_0001", "tokens": [1, 2, 3]}) + "\n" + line + "\n")
    code = main(["eval", "--adapters", str(root / "adapters"), "--base", str(root / "ckpt"), "--data", str(data),
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1 and str(data) in err
    assert not (tmp_path / "o").exists()


def test_bad_bases_and_collections_get_one_clear_error(setup, capsys, tmp_path):
    root, config = setup[0], setup[1]
    gemma = write_checkpoint(tmp_path / "gemma", {**config, "architectures": ["GemmaForCausalLM"]}, {}, shards=0)
    other = tmp_path / "other"
    write_synth_collection(SynthSpec(n=3, model=str(root / "ckpt" / "config.json"), ranks=(4,), modules=MODULES,
                                     seed=99), other, progress=False)
    cases = [
        (["--base", str(gemma)], "architecture 'GemmaForCausalLM' is not supported"),
        (["--base", "tiny"], "model tiny has"),  # adapters of another shape
        (["--base", "nonesuch"], "unknown model 'nonesuch'"),
        (["--base", str(root / "ckpt" / "config.json")], "a config.json alone has no weights"),
        (["--base", str(root / "ckpt"), "--adapters", str(other), "--compressed", str(root / "exact")],
         "was compressed from other files"),
        (["--base", str(root / "ckpt"), "--compressed", str(root / "exact"), str(root / "exact")], "is taken"),
    ]
    for args, words in cases:
        argv = ["eval", "--adapters", str(root / "adapters"), "--data", str(root / "data.jsonl"),
                "--out", str(tmp_path / "o"), "--quiet"]
        code = main(argv + args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and len(err.splitlines()) == 1, (args, err)


def test_text_rows_on_a_checkpoint_use_its_tokenizer_json(setup, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    import shutil

    root = setup[0]
    ckpt = shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"adapter": "adapter_0001", "text": "the cat sat on the mat"}) + "\n"
        + json.dumps({"adapter": "adapter_0001", "tokens": [1, 2, 3, 4, 1, 5]}) + "\n")
    assert main(["eval", "--adapters", str(root / "adapters"), "--base", str(ckpt), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "o" / "eval.csv").set_index(["adapter", "version"])
    # The text row is the token row written out: the same loss over twice the tokens.
    assert table.loc[("adapter_0001", "original"), "tokens"] == 10
    want = reference_metrics(setup[1], setup[2], [[1, 2, 3, 4, 1, 5]], root / "adapters" / "adapter_0001")[1]
    assert table.loc[("adapter_0001", "original"), "loss"] == pytest.approx(want, rel=1e-5)
