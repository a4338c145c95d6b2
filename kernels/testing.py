"""Random problem instances for every LoRA operation and their float64 references.

Shared by the CPU tests (tests/test_kernels_*.py, kernels under the Triton interpreter) and the GPU
device check (`lorabench bench-kernels --device-check`), so both exercise the same cases. Inputs are
scaled so that every term of y += delta is of order one: the tolerances below are then relative to
numbers near one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import reference
from .metadata import LoraBatch

# (atol, rtol) per dtype: fp32 products are exact up to accumulation order; fp16 and bf16 round the
# inputs of the second GEMM (h) and the output to 11 and 8 significant bits.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 5e-2),
}


REFERENCES = {
    "single": reference.single_lora,
    "per_lora": reference.per_lora,
    "paged": reference.paged_lora,
    "compressed": reference.compressed_lora,
}


@dataclass(frozen=True)
class Problem:
    """One op's inputs (keyword arguments of its reference function, less `batch`) and its batch."""

    op: str  # "single", "per_lora", "paged" or "compressed"
    inputs: dict
    batch: LoraBatch | None

    def expected(self) -> torch.Tensor:
        """y after the op, computed on the CPU in float64 by the PyTorch reference."""
        def on_cpu(v):
            if not isinstance(v, torch.Tensor):
                return v
            return v.detach().cpu().double() if v.is_floating_point() else v.cpu()

        args = {k: on_cpu(v) for k, v in self.inputs.items()}
        args["y"] = args["y"].clone()
        if self.batch is not None:
            args["batch"] = self.batch.to("cpu")
        return REFERENCES[self.op](**args)

    def fresh_y(self) -> dict:
        """The inputs with a copy of y, so that each run starts from the same y."""
        return {**self.inputs, "y": self.inputs["y"].clone()}


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    atol, rtol = TOLERANCES[got.dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| / (atol + rtol |want|): at most 1 within tolerance."""
    atol, rtol = TOLERANCES[got.dtype]
    if got.numel() == 0:
        return 0.0
    return float(((got.double() - want.double()).abs() / (atol + rtol * want.double().abs())).max())


def zipf_ids(m: int, n: int, alpha: float, gen: torch.Generator, p_none: float = 0.0) -> torch.Tensor:
    """m adapter ids drawn from Zipf(alpha) popularity over n adapters; -1 (no adapter) with p_none."""
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
    ids = torch.multinomial(weights, m, replacement=True, generator=gen).to(torch.int32)
    if p_none > 0:
        ids[torch.rand(m, generator=gen, dtype=torch.float64) < p_none] = -1
    return ids


def _randn(shape, std: float, dtype, device, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)


def _activations(m, d_in, d_out, dtype, device, gen):
    return _randn((m, d_in), 1.0, dtype, device, gen), _randn((m, d_out), 1.0, dtype, device, gen)


def _batch(ids, device, block_m, static=False) -> LoraBatch:
    return LoraBatch.build(torch.as_tensor(ids, dtype=torch.int32).to(device), block_m=block_m, static=static)


def single_problem(m, d_in, d_out, r, dtype, device, gen) -> Problem:
    x, y = _activations(m, d_in, d_out, dtype, device, gen)
    A = _randn((r, d_in), d_in**-0.5, dtype, device, gen)
    B = _randn((d_out, r), r**-0.5, dtype, device, gen)
    scale = 0.5 + float(torch.rand((), generator=gen, dtype=torch.float64))
    return Problem("single", dict(x=x, y=y, A=A, B=B, scale=scale), None)


def per_lora_problem(ids, slots, d_in, d_out, r, dtype, device, gen, block_m=None, static=False) -> Problem:
    x, y = _activations(len(ids), d_in, d_out, dtype, device, gen)
    A = _randn((slots, r, d_in), d_in**-0.5, dtype, device, gen)
    B = _randn((slots, d_out, r), r**-0.5, dtype, device, gen)
    scales = (0.5 + torch.rand(slots, generator=gen, dtype=torch.float64)).float().to(device)
    return Problem("per_lora", dict(x=x, y=y, A=A, B=B, scales=scales), _batch(ids, device, block_m, static))


def paged_problem(
    ids, ranks, d_in, d_out, page_size, dtype, device, gen, block_m=None, static=False, spare_pages=7
) -> Problem:
    """Adapters of `ranks` scattered over a pool with `spare_pages` other (KV-cache) pages mixed in.

    Table entries past an adapter's rank hold -1: the kernels must not read them.
    """
    x, y = _activations(len(ids), d_in, d_out, dtype, device, gen)
    n, max_rank = len(ranks), max(max(ranks), 1)
    used = 2 * sum(ranks)
    pool = torch.empty(used + spare_pages, page_size, dtype=torch.float64)
    order = torch.randperm(used + spare_pages, generator=gen)
    a_pages = torch.full((n, max_rank), -1, dtype=torch.int32)
    b_pages = torch.full((n, max_rank), -1, dtype=torch.int32)
    nxt = 0
    for i, r in enumerate(ranks):
        for table, std in ((a_pages, d_in**-0.5), (b_pages, max(r, 1) ** -0.5)):
            table[i, :r] = order[nxt : nxt + r].to(torch.int32)
            pool[order[nxt : nxt + r]] = torch.randn(r, page_size, generator=gen, dtype=torch.float64) * std
            nxt += r
    pool[order[used:]] = torch.randn(spare_pages, page_size, generator=gen, dtype=torch.float64)
    inputs = dict(
        x=x, y=y, pool=pool.to(dtype).to(device), a_pages=a_pages.to(device), b_pages=b_pages.to(device),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        scales=(0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).float().to(device),
    )
    return Problem("paged", inputs, _batch(ids, device, block_m, static))


def compressed_problem(
    ids, n, clusters, width, diagonal, d_in, d_out, dtype, device, gen, block_m=None, static=False
) -> Problem:
    x, y = _activations(len(ids), d_in, d_out, dtype, device, gen)
    U = _randn((clusters, d_out, width), width**-0.5, dtype, device, gen)
    V = _randn((clusters, d_in, width), d_in**-0.5, dtype, device, gen)
    S = _randn((n, width) if diagonal else (n, width, width), 1.0 if diagonal else width**-0.5, dtype, device, gen)
    cluster_of = torch.randint(0, clusters, (n,), generator=gen, dtype=torch.int32).to(device)
    inputs = dict(x=x, y=y, U=U, V=V, S=S, cluster_of=cluster_of)
    return Problem("compressed", inputs, _batch(ids, device, block_m, static))


def workspace_poisoned(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scratch buffer full of NaN: any element a kernel reads before writing shows in the result."""
    return torch.full((numel,), math.nan, dtype=dtype, device=device)


def id_cases(slots: int, gen: torch.Generator) -> dict[str, list[int]]:
    """Token -> adapter maps covering the batch shapes every kernel must handle (ids < slots)."""
    return {
        "one-token": [slots - 1],
        "empty": [],
        "one-adapter": [1] * 37,  # several tiles of one segment at block_m 16
        "all-different": torch.randperm(slots, generator=gen).tolist(),
        "mixed-with-none": zipf_ids(29, slots, 1.0, gen, p_none=0.3).tolist(),
        "none": [-1] * 5,
    }


def device_under_test() -> str:
    """Where the tests run: CUDA when LORABENCH_TRITON_COMPILED=1 (the GPU check), else the CPU."""
    compiled = os.environ.get("LORABENCH_TRITON_COMPILED") == "1" and torch.cuda.is_available()
    return "cuda" if compiled else "cpu"


def kernel_test_dtypes() -> tuple[torch.dtype, ...]:
    """Dtypes the Triton kernels are tested in: bf16 only compiled (tl.dot on bf16 is wrong in the
    interpreter; the PyTorch path covers bf16 on the CPU)."""
    base = (torch.float32, torch.float16)
    return base + (torch.bfloat16,) if device_under_test() == "cuda" else base
