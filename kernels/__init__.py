"""LoRA kernels of every serving strategy (installed as `lorabench.kernels`).

`metadata.LoraBatch` is built once per batch; `reference` holds the PyTorch implementation of each
operation (the test reference and the CPU fallback).
"""

from .metadata import LoraBatch

__all__ = ["LoraBatch"]
