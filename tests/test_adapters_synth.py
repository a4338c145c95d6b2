"""Synthetic collections: planted structure, determinism, and the `lorabench adapters` CLI."""

import json

import torch

from lorabench import cli
from lorabench.adapters import load_collection, read_adapter
from lorabench.adapters.synth import SynthSpec, synth_adapter, write_synth_collection
from lorabench.adapters.types import LoraStack
from lorabench.compress import fit_full


def test_adapter_i_depends_only_on_the_seed_and_i():
    small, large = SynthSpec(n=3, clusters=1, layers=1, seed=9), SynthSpec(n=6, clusters=1, layers=1, seed=9)
    a = synth_adapter(small, 2, 0, 8)[1]
    b = synth_adapter(large, 2, 0, 8)[1]
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    c = synth_adapter(SynthSpec(n=3, clusters=1, layers=1, seed=10), 2, 0, 8)[1]
    assert not all(torch.equal(a[k][0], c[k][0]) for k in a)


def test_norms_ranks_and_planted_subspaces(tmp_path):
    spec = SynthSpec(n=8, ranks=(4, 6), clusters=2, shared=1.0, shared_dim=6, norm_spread=0.0, layers=1, rslora=True,
                     modules=("q_proj", "gate_proj"))
    root = write_synth_collection(spec, tmp_path / "c", progress=False)
    meta = json.loads((root / "synth.json").read_text())
    coll = load_collection(root)
    assert [a.config.r for a in coll.adapters] == meta["ranks_of_adapters"]
    assert all(a.config.use_rslora for a in coll.adapters)
    for key in coll.modules:
        stack = coll.load_module(key, dtype=torch.float64)
        assert torch.allclose(stack.norms2(), torch.ones(8, dtype=torch.float64), atol=1e-5)  # spread 0: unit norms
        for c in range(2):  # shared = 1: each cluster lies in its rank-6 subspaces
            idx = torch.tensor([i for i, lab in enumerate(meta["clusters_of_adapters"]) if lab == c])
            sub = stack.subset(idx)
            fit = fit_full(sub, 6, torch.ones(len(idx), dtype=torch.float64))
            assert float((fit.err / sub.norms2()).max()) < 1e-8


def test_own_components_and_noise_leave_the_shared_subspace():
    spec = SynthSpec(n=10, ranks=(8,), clusters=1, shared=0.5, shared_dim=4, noise=0.0, norm_spread=0.0, layers=1)
    key = spec.module_keys[0]
    As, Bs, scales = [], [], []
    for i in range(spec.n):
        config, f = synth_adapter(spec, i, 0, 8)
        As.append(f[key][0]), Bs.append(f[key][1]), scales.append(config.scaling(key))
    stack = LoraStack.from_factors(As, Bs, scales, dtype=torch.float64)
    fit = fit_full(stack, 4, torch.ones(10, dtype=torch.float64), tol=1e-9)
    share = 1 - float((fit.err / stack.norms2()).mean())
    assert 0.3 < share < 0.75  # about half the energy is shared (random own parts add a little)


def test_cli_writes_a_collection_and_reports_bad_arguments(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["adapters", "synth", "--n", "3", "--rank", "2,4", "--clusters", "2", "--layers", "1",
                     "--seed", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_0000", "adapter_0001", "adapter_0002", "synth.json"]
    config, factors = read_adapter(out / "adapter_0001")
    assert config.r in (2, 4) and len(factors) == 4
    assert cli.main(["adapters", "info", str(out), "--model", "tiny"]) == 0
    assert "3 adapters" in capsys.readouterr().out
    assert cli.main(["adapters", "synth", "--n", "3", "--clusters", "5", "--out", str(tmp_path / "d")]) == 2
    assert "--clusters must be between 1 and --n" in capsys.readouterr().err
    assert cli.main(["adapters", "synth", "--n", "3", "--out", str(out)]) == 2  # exists already
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
