"""Clustered compression: planted clusters, empty groups, automatic K, and the ARI it is judged by."""

import pytest
import torch

from lorabench.adapters.synth import SynthSpec, planted_clusters, planted_ranks, synth_adapter
from lorabench.adapters.types import LoraStack, ModuleKey
from lorabench.compress import CompressConfig, adjusted_rand_index, compress_module
from lorabench.compress.clusters import _fill_empty


def synth_stack(spec: SynthSpec, key=ModuleKey(0, "q_proj")):
    labels, ranks = planted_clusters(spec), planted_ranks(spec)
    As, Bs, scales = [], [], []
    for i in range(spec.n):
        config, factors = synth_adapter(spec, i, labels[i], ranks[i])
        As.append(factors[key][0])
        Bs.append(factors[key][1])
        scales.append(config.scaling(key))
    return LoraStack.from_factors(As, Bs, scales, dtype=torch.float64), labels


def test_adjusted_rand_index_by_hand():
    # Contingency [[2, 1, 0], [0, 1, 2]]: index 2, row pairs 6, column pairs 3, total 15,
    # expected 6 * 3 / 15 = 1.2, maximum 4.5 -> (2 - 1.2) / (4.5 - 1.2) = 8 / 33.
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)
    assert adjusted_rand_index([0, 0, 1, 1, 2], [5, 5, 3, 3, 9]) == pytest.approx(1.0)  # relabeling
    # Opposite structure: every same-cluster pair split -> below chance.
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


@pytest.mark.parametrize("method", ["full", "diagonal"])
def test_clustering_recovers_planted_clusters(method):
    spec = SynthSpec(n=48, clusters=4, ranks=(4,), shared=0.75, shared_dim=4, noise=0.05, norm_spread=0.5, seed=11)
    stack, labels = synth_stack(spec)
    fit = compress_module(stack, CompressConfig(rank=4, method=method, clusters=4, seed=3))
    assert adjusted_rand_index(labels, fit.cluster_of) >= 0.9
    assert fit.U.shape == (4, stack.d_out, 4)
    # Every adapter sits in the group that reconstructs it best.
    assert torch.bincount(fit.cluster_of, minlength=4).min() >= 1


def test_clusters_beat_one_shared_basis_and_are_deterministic():
    spec = SynthSpec(n=30, clusters=3, ranks=(4,), shared=1.0, shared_dim=4, norm_spread=0.3, seed=5)
    stack, labels = synth_stack(spec)
    one = compress_module(stack, CompressConfig(rank=4, clusters=1))
    three = compress_module(stack, CompressConfig(rank=4, clusters=3, seed=1))
    again = compress_module(stack, CompressConfig(rank=4, clusters=3, seed=1))
    assert float(three.errors.max()) < 1e-8 < float(one.errors.mean())  # exact planted structure
    assert torch.equal(three.cluster_of, again.cluster_of) and torch.equal(three.S, again.S)
    assert adjusted_rand_index(labels, three.cluster_of) == pytest.approx(1.0)


def test_an_empty_group_takes_the_worst_adapter_of_a_shared_group():
    assignment = torch.tensor([0, 0, 0, 1, 2, 2])
    rel = torch.tensor([0.1, 0.9, 0.2, 0.99, 0.3, 0.4], dtype=torch.float64)
    new = torch.tensor([0, 0, 0, 0, 2, 2])  # group 1 emptied; adapter 3 is alone in... now group 0
    refilled = _fill_empty(new, rel, 3)
    assert refilled == [1] and new.tolist() == [0, 0, 0, 1, 2, 2]  # worst movable adapter: 3 (0.99)
    refilled = _fill_empty(assignment.clone(), rel, 4)
    assert refilled == [3]


def test_duplicate_adapters_leave_no_group_empty():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    stack = LoraStack.from_factors([A] * 6, [B] * 6, dtype=torch.float64)
    fit = compress_module(stack, CompressConfig(rank=3, clusters=3))
    assert sorted(torch.bincount(fit.cluster_of, minlength=3).tolist())[0] >= 1
    assert float(fit.errors.max()) < 1e-10


def test_auto_picks_the_smallest_k_meeting_the_target_within_the_memory_cap():
    spec = SynthSpec(n=24, clusters=4, ranks=(4,), shared=1.0, shared_dim=4, norm_spread=0.0, seed=2)
    stack, labels = synth_stack(spec)
    fit = compress_module(stack, CompressConfig(rank=4, clusters="auto", target_error=0.01))
    assert fit.clusters == 4 and float(fit.errors.mean()) <= 0.01
    three = compress_module(stack, CompressConfig(rank=4, clusters=3))
    assert float(three.errors.mean()) > 0.01  # so 4 is the smallest
    # A budget for the cores and two clusters' bases caps K at 2: the target is out of reach.
    element, per_cluster = 8, (stack.d_in + stack.d_out) * 4 * 8
    budget = stack.n * 16 * element + 2 * per_cluster + per_cluster // 2
    capped = compress_module(stack, CompressConfig(rank=4, clusters="auto", target_error=0.01), max_bytes=budget,
                             element_size=element)
    assert capped.clusters == 2 and float(capped.errors.mean()) > 0.01
