"""Whole-adapter clustering (`--cluster-by adapter`): pooled evidence recovers planted groups that
module-by-module clustering misses, and it does not worsen planted-subspace collections."""

import json

import pandas as pd
import pytest
import torch

from lorabench.adapters import SynthSpec, load_collection, write_synth_collection
from lorabench.adapters.types import LoraStack
from lorabench.cli import main
from lorabench.compress import CompressConfig, adjusted_rand_index, compress_collection, fit_clusters
from lorabench.compress.adapter_clusters import cluster_adapters, delta_cosines, spectral_assignment
from lorabench.errors import LorabenchError


def trained_like(n=24, groups=3, modules=6, d=32, r=4, own=0.6, seed=0):
    """Adapters the way training makes them: every adapter of group g moves each module towards the
    group's update G_g (rank 6), but only inside the row space of its own random A_i (B_i = G_g A_i^T),
    plus an update of its own of relative size `own`. Returns ({module: stack}, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % groups
    labels = labels[torch.randperm(n, generator=g)]
    stacks = {}
    for m in range(modules):
        G = [torch.randn(d, 6, generator=g, dtype=torch.float64) @ torch.randn(6, d, generator=g, dtype=torch.float64)
             for _ in range(groups)]
        As, Bts = [], []
        for i in range(n):
            A = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].T  # (r, d) orthonormal rows
            B = G[int(labels[i])] @ A.T
            B = B + own * B.norm() / (d * r) ** 0.5 * torch.randn(d, r, generator=g, dtype=torch.float64)
            As.append(A)
            Bts.append(B.T)
        stacks[m] = LoraStack(torch.stack(As), torch.stack(Bts), torch.full((n,), r))
    return stacks, labels.tolist()


def test_delta_cosines_match_the_dense_deltas():
    stacks, _ = trained_like(n=5, modules=1)
    stack = stacks[0]
    dense = torch.stack([stack.Bt[i].T @ stack.A[i] for i in range(stack.n)]).flatten(1)
    want = torch.nn.functional.normalize(dense, dim=1) @ torch.nn.functional.normalize(dense, dim=1).T
    torch.testing.assert_close(delta_cosines(stack), want)


def test_spectral_assignment_splits_a_block_similarity():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    sim = (labels[:, None] == labels[None, :]).double() + 0.05 * torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    groups, gap = spectral_assignment((sim + sim.T) / 2, 3)
    assert adjusted_rand_index(labels, groups) == 1.0
    noise = torch.rand(8, 8, generator=torch.Generator().manual_seed(2))
    assert gap > spectral_assignment((noise + noise.T) / 2, 3)[1]  # block structure: a clear eigengap


def test_whole_adapters_recover_groups_that_single_modules_miss():
    stacks, labels = trained_like()
    ones = torch.ones(24, dtype=torch.float64)
    per_module = [adjusted_rand_index(labels, fit_clusters(s, 6, 3, ones, seed=0).cluster_of) for s in stacks.values()]
    whole = cluster_adapters(stacks.__getitem__, list(stacks), 6, 3, "full", lambda s: torch.ones(s.n, dtype=torch.float64))
    assert adjusted_rand_index(labels, whole) >= 0.9 > sum(per_module) / len(per_module)
    again = cluster_adapters(stacks.__getitem__, list(stacks), 6, 3, "full", lambda s: torch.ones(s.n, dtype=torch.float64))
    assert torch.equal(whole, again)  # deterministic


@pytest.mark.parametrize("method", ["full"])
def test_planted_subspace_collections_are_not_worse(tmp_path, method):
    """`adapters synth --clusters K`: whole-adapter groups find the planted clusters at least as well
    as module-by-module clustering, with no higher error; every module then has the same groups."""
    spec = SynthSpec(n=24, clusters=4, ranks=(4,), shared=0.75, shared_dim=4, noise=0.05, norm_spread=0.5,
                     modules=("q_proj", "v_proj"), seed=11)
    write_synth_collection(spec, tmp_path / "a", progress=False)
    planted = json.loads((tmp_path / "a" / "synth.json").read_text())["clusters_of_adapters"]
    coll = load_collection(tmp_path / "a")
    results = {}
    for by in ("module", "adapter"):
        summary = compress_collection(coll, CompressConfig(rank=4, method=method, clusters=4, seed=3, cluster_by=by),
                                      tmp_path / by, progress=False)
        errors = pd.read_csv(tmp_path / by / "errors.csv")
        aris = [adjusted_rand_index([planted[int(a[-4:])] for a in grp["adapter"]], grp["cluster"].tolist())
                for _, grp in errors.groupby(["layer", "module"])]
        results[by] = (summary["mean_error"], min(aris), errors.groupby("adapter")["cluster"].nunique().max())
    assert results["adapter"][2] == 1  # one group per adapter in every module
    assert results["adapter"][1] >= max(0.9, results["module"][1])
    assert results["adapter"][0] <= results["module"][0] * 1.02
    assert "cluster_by" not in json.loads((tmp_path / "module" / "summary.json").read_text())  # default output unchanged
    assert json.loads((tmp_path / "adapter" / "summary.json").read_text())["cluster_by"] == "adapter"


def test_cluster_by_adapter_needs_a_count_and_shared_bases(tmp_path, capsys):
    for kwargs in (dict(clusters="auto"), dict(method="svd", clusters=1)):
        with pytest.raises(LorabenchError, match="--cluster-by adapter"):
            CompressConfig(rank=4, cluster_by="adapter", **kwargs)
    assert main(["compress", str(tmp_path), "--rank", "4", "--cluster-by", "adapter", "--clusters", "auto",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--cluster-by adapter" in capsys.readouterr().err
    write_synth_collection(SynthSpec(n=3, ranks=(2,), seed=1), tmp_path / "a", progress=False)
    for args, words in ((["--clusters", "4"], "--clusters 4 exceeds the 3 adapters"),
                        (["--clusters", "2", "--rank", "65"], "--rank 65 exceeds the module's size")):
        argv = ["compress", str(tmp_path / "a"), "--rank", "4", "--cluster-by", "adapter", "--out", str(tmp_path / "o"),
                "--quiet"]
        assert main(argv + args) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
