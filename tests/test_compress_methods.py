"""Full, diagonal and per-adapter SVD compression against explicit float64 references."""

import pytest
import torch

from lorabench.adapters.types import LoraStack
from lorabench.compress import CompressConfig, compress_module, fit_diagonal, fit_full, fit_svd

D_IN, D_OUT = 24, 20


def _ones(n):
    return torch.ones(n, dtype=torch.float64)


def random_stack(n, ranks=(3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    rs = [ranks[i % len(ranks)] for i in range(n)]
    As = [torch.randn(r, D_IN, generator=g, dtype=torch.float64) for r in rs]
    Bs = [torch.randn(D_OUT, r, generator=g, dtype=torch.float64) for r in rs]
    scales = [0.5 + i % 3 for i in range(n)]
    return LoraStack.from_factors(As, Bs, scales, dtype=torch.float64), As, Bs, scales


def explicit(As, Bs, scales):
    return [s * B @ A for A, B, s in zip(As, Bs, scales)]


def rel_errors(Ms, recon):
    return torch.stack([((M - Mh) ** 2).sum() / (M**2).sum() for M, Mh in zip(Ms, recon)])


def test_full_recovers_a_collection_built_on_shared_bases():
    g = torch.Generator().manual_seed(1)
    R, n = 6, 25
    U = torch.linalg.qr(torch.randn(D_OUT, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D_IN, R, generator=g, dtype=torch.float64))[0]
    As, Bs, scales = [], [], []
    for i in range(n):
        r = (3, 4, 6)[i % 3]  # heterogeneous ranks, all inside span(U) (x) span(V)
        Bs.append(U @ torch.randn(R, r, generator=g, dtype=torch.float64))
        As.append(torch.randn(r, R, generator=g, dtype=torch.float64) @ V.T)
        scales.append(2.0 / (1 + i % 4))
    stack = LoraStack.from_factors(As, Bs, scales, dtype=torch.float64)
    fit = fit_full(stack, R, _ones(n))
    assert (fit.err / stack.norms2()).max() < 1e-10
    recon = [fit.U @ fit.S[i] @ fit.V.T for i in range(n)]
    assert rel_errors(explicit(As, Bs, scales), recon).max() < 1e-10
    assert torch.allclose(fit.U.T @ fit.U, torch.eye(R, dtype=torch.float64), atol=1e-12)


def test_diagonal_recovers_a_collection_with_diagonal_cores():
    g = torch.Generator().manual_seed(2)
    R, n = 5, 20
    U = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)  # not orthonormal: diagonal's U, V are free
    V = torch.randn(D_IN, R, generator=g, dtype=torch.float64)
    scales = [0.25 * (1 + i % 3) for i in range(n)]
    Bs = [U * torch.randn(R, generator=g, dtype=torch.float64) / s for s in scales]
    As = [V.T.clone() for _ in range(n)]
    stack = LoraStack.from_factors(As, Bs, scales, dtype=torch.float64)
    fit = fit_diagonal(stack, R, _ones(n))
    assert fit.S.shape == (n, R)
    assert (fit.err / stack.norms2()).max() < 1e-10
    recon = [fit.U @ torch.diag(fit.S[i]) @ fit.V.T for i in range(n)]
    assert rel_errors(explicit(As, Bs, scales), recon).max() < 1e-10


@pytest.mark.parametrize("fit_fn", [fit_full, fit_diagonal])
def test_objective_never_increases(fit_fn):
    stack, *_ = random_stack(30, seed=3)
    fit = fit_fn(stack, 6, _ones(30), tol=1e-12, max_iter=40, seed=5)
    h = torch.tensor(fit.history)
    assert len(h) > 5
    assert (h[1:] <= h[:-1] * (1 + 1e-12)).all(), h


def test_full_cores_are_the_least_squares_solution_and_errors_match_brute_force():
    stack, As, Bs, scales = random_stack(12, seed=4)
    R = 4
    fit = fit_full(stack, R, _ones(12), tol=1e-8)
    Ms = explicit(As, Bs, scales)
    design = torch.kron(fit.V, fit.U)  # vec(U S V^T) = (V kron U) vec(S), column-major vec
    for i, M in enumerate(Ms):
        s = torch.linalg.lstsq(design, M.T.reshape(-1, 1)).solution
        assert torch.allclose(fit.S[i], s.reshape(R, R).T, atol=1e-10)
    recon = [fit.U @ fit.S[i] @ fit.V.T for i in range(12)]
    assert torch.allclose(fit.err / stack.norms2(), rel_errors(Ms, recon), atol=1e-12)


def test_diagonal_cores_are_the_least_squares_solution_and_errors_match_brute_force():
    stack, As, Bs, scales = random_stack(12, seed=6)
    R = 4
    fit = fit_diagonal(stack, R, _ones(12), tol=1e-8)
    Ms = explicit(As, Bs, scales)
    design = torch.stack([torch.outer(fit.U[:, j], fit.V[:, j]).reshape(-1) for j in range(R)], dim=1)
    for i, M in enumerate(Ms):
        s = torch.linalg.lstsq(design, M.reshape(-1, 1)).solution.flatten()
        assert torch.allclose(fit.S[i], s, atol=1e-9)
    recon = [fit.U @ torch.diag(fit.S[i]) @ fit.V.T for i in range(12)]
    assert torch.allclose(fit.err / stack.norms2(), rel_errors(Ms, recon), atol=1e-12)


def test_full_with_bases_wider_than_half_the_module():
    stack, As, Bs, scales = random_stack(10, seed=9)
    R = 15  # > D_OUT / 2: fewer new directions fit beside U in a Rayleigh-Ritz step
    fit = fit_full(stack, R, _ones(10), tol=1e-10)
    assert torch.allclose(fit.U.T @ fit.U, torch.eye(R, dtype=torch.float64), atol=1e-10)
    h = torch.tensor(fit.history)
    assert (h[1:] <= h[:-1] * (1 + 1e-12)).all()
    recon = [fit.U @ fit.S[i] @ fit.V.T for i in range(10)]
    assert torch.allclose(fit.err / stack.norms2(), rel_errors(explicit(As, Bs, scales), recon), atol=1e-12)
    full = fit_full(stack, D_OUT, _ones(10))  # U spans the whole output space
    assert float((full.err / stack.norms2()).max()) < 0.6


@pytest.mark.parametrize("R", [2, 3, 5])
def test_mutually_orthogonal_adapters_obey_the_rank_bound(R):
    """n orthonormal matrices X_i: the projections onto an R^2-dimensional space of matrices
    capture at most R^2 of their total energy n, so the mean error is >= 1 - R^2 / n."""
    g = torch.Generator().manual_seed(R)
    d, n = 8, 24
    Q1 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    pairs = torch.randperm(d * d, generator=g)[: 2 * n].reshape(n, 2)  # rank-2 adapters, disjoint pairs
    As = [torch.stack([Q2[:, int(p) % d] for p in pp]) / 2**0.5 for pp in pairs]
    Bs = [torch.stack([Q1[:, int(p) // d] for p in pp], dim=1) for pp in pairs]
    stack = LoraStack.from_factors(As, Bs, dtype=torch.float64)
    assert torch.allclose(stack.norms2(), _ones(n))
    fit = fit_full(stack, R, _ones(n), tol=1e-9)
    mean_error = float((fit.err / stack.norms2()).mean())
    assert mean_error >= 1 - min(R * R / n, 1) - 1e-9


def test_svd_baseline_matches_explicit_truncated_svds():
    stack, As, Bs, scales = random_stack(6, ranks=(5, 3), seed=7)
    fit = fit_svd(stack, 4)
    for i, M in enumerate(explicit(As, Bs, scales)):
        sigma = torch.linalg.svdvals(M)
        expected = 1 - (sigma[:4] ** 2).sum() / (sigma**2).sum()
        assert abs(float(fit.errors[i]) - float(expected)) < 1e-12
        recon = fit.U[i] @ torch.diag(fit.S[i]) @ fit.V[i].T
        assert abs(float(rel_errors([M], [recon])[0]) - float(expected)) < 1e-12
    assert fit.cluster_of.tolist() == list(range(6))


def test_normalize_equals_fitting_unit_norm_adapters_and_weights_favor_the_heavy_adapter():
    stack, As, Bs, scales = random_stack(16, seed=8)
    norms = stack.norms2().sqrt()
    fit = compress_module(stack, CompressConfig(rank=4, normalize=True, tol=1e-10))
    unit = LoraStack(stack.A, stack.Bt / norms[:, None, None], stack.ranks)
    ref = compress_module(unit, CompressConfig(rank=4, tol=1e-10))
    assert torch.allclose(fit.errors, ref.errors, atol=1e-8)
    assert torch.allclose(fit.norms2, stack.norms2())  # cores keep the true norms
    assert torch.allclose(fit.S.pow(2).sum((1, 2)), stack.norms2() * (1 - fit.errors), rtol=1e-8)

    plain = compress_module(stack, CompressConfig(rank=4))
    weights = torch.ones(16, dtype=torch.float64)
    weights[3] = 1000.0
    heavy = compress_module(stack, CompressConfig(rank=4), weights=weights)
    assert heavy.errors[3] < plain.errors[3] * 0.5
