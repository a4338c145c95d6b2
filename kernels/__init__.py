"""LoRA kernels of every serving strategy (installed as `lorabench.kernels`).

Call these per layer; build the batch's `LoraBatch` once per step and pass it to every layer:

    batch = LoraBatch.build(token_adapters)           # on the device of x
    lora_per_lora(x, y, A, B, scales, batch)          # y += scales[i] * B_i (A_i x), in place

Each function takes the arguments of its PyTorch implementation in `reference` (shapes there) and
a `backend`: "auto" runs the Triton kernels on CUDA tensors and the PyTorch implementation on CPU,
"triton" forces the kernels (on CPU only under TRITON_INTERPRET=1), "torch" forces PyTorch. Both
backends check their inputs and raise ValueError naming the argument at fault. On CUDA the Triton
path does not read the device, so the calls can be captured in a CUDA graph (after one eager call,
which checks the per-adapter tables).
"""

from __future__ import annotations

import importlib.util

import torch

from . import common, reference
from .metadata import LoraBatch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    from .bgmv import bgmv_lora
    from .compressed import compressed_lora
    from .paged import paged_lora
    from .sgmv import sgmv_lora
    from .single import single_lora

BACKENDS = ("auto", "triton", "torch")
PER_LORA_VARIANTS = ("auto", "sgmv", "bgmv")
# variant="auto" gathers per token (bgmv) when the batch is this small, else runs segments (sgmv).
BGMV_MAX_TOKENS = 16
# The PyTorch path also takes float64 (the test references run in it).
TORCH_DTYPES = common.KERNEL_DTYPES + (torch.float64,)

__all__ = [
    "LoraBatch",
    "lora_single",
    "lora_per_lora",
    "lora_paged",
    "lora_compressed",
    "use_triton",
    "BACKENDS",
    "PER_LORA_VARIANTS",
]


def use_triton(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether `backend` runs the Triton kernels for inputs like x (ValueError if it cannot)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAVE_TRITON and x.is_cuda
    if not (HAVE_TRITON and (x.is_cuda or common.interpreting() or common.capturing_launches)):
        raise ValueError("backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return True


def lora_single(x, y, A, B, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """y += scale * B (A x) for every token. x: (M, d_in) y: (M, d_out) A: (r, d_in) B: (d_out, r)"""
    if use_triton(x, backend):
        return single_lora(x, y, A, B, scale)
    common.check_single(x, y, A, B, TORCH_DTYPES)
    return reference.single_lora(x, y, A, B, scale)


def lora_per_lora(
    x, y, A, B, scales, batch: LoraBatch, *, variant: str = "auto", backend: str = "auto"
) -> torch.Tensor:
    """Adapters stacked in slots. x: (M, d_in) y: (M, d_out) A: (slots, r, d_in) B: (slots, d_out, r)
    scales: (slots,). variant: "sgmv" (segments), "bgmv" (per-token gather) or "auto"."""
    if variant not in PER_LORA_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(PER_LORA_VARIANTS)}, got {variant!r}")
    if use_triton(x, backend):
        if variant == "auto":
            variant = "bgmv" if batch.num_tokens <= BGMV_MAX_TOKENS else "sgmv"
        return (bgmv_lora if variant == "bgmv" else sgmv_lora)(x, y, A, B, scales, batch)
    common.check_per_lora(x, y, A, B, scales, batch, TORCH_DTYPES)
    return reference.per_lora(x, y, A, B, scales, batch)


def lora_paged(x, y, pool, a_pages, b_pages, ranks, scales, batch: LoraBatch, *, backend: str = "auto") -> torch.Tensor:
    """S-LoRA paging. pool: (pages, page_size) a_pages, b_pages: (N, max_rank) ranks, scales: (N,)"""
    if use_triton(x, backend):
        return paged_lora(x, y, pool, a_pages, b_pages, ranks, scales, batch)
    common.check_paged(x, y, pool, a_pages, b_pages, ranks, scales, batch, TORCH_DTYPES)
    return reference.paged_lora(x, y, pool, a_pages, b_pages, ranks, scales, batch)


def lora_compressed(x, y, U, V, S, cluster_of, batch: LoraBatch, *, backend: str = "auto") -> torch.Tensor:
    """Joint compression. U: (K, d_out, R) V: (K, d_in, R) S: (N, R, R) or (N, R) cluster_of: (N,)"""
    if use_triton(x, backend):
        return compressed_lora(x, y, U, V, S, cluster_of, batch)
    common.check_compressed(x, y, U, V, S, cluster_of, batch, TORCH_DTYPES)
    return reference.compressed_lora(x, y, U, V, S, cluster_of, batch)
