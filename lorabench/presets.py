"""Model shapes and device presets, as frozen dataclasses looked up by name.

Model shapes are those of the public checkpoints (weights are always random: nothing is downloaded).
Device figures: the h200 preset is measured (../shared/anchors.md, 2026-11-29: copy bandwidth,
bf16 matmul rate, pinned host->device copy); the others are datasheet peaks times the fraction a
tuned kernel usually reaches (70% of matmul peak, 90% of memory bandwidth), to be replaced by a
measured profile (`lorabench profile`) where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorabench.errors import LorabenchError

# Target-module short names as PEFT and the HF Llama/Mistral checkpoints spell them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION_MODULES + MLP_MODULES
DEFAULT_TARGET_MODULES = ATTENTION_MODULES


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Mistral-shaped decoder. Derived sizes are filled in `__post_init__`."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int = field(init=False)
    kv_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise LorabenchError(f"model {self.name}: hidden, heads and kv_heads do not divide")
        object.__setattr__(self, "head_dim", self.hidden // self.heads)
        object.__setattr__(self, "kv_dim", self.head_dim * self.kv_heads)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a linear module, e.g. k_proj -> (hidden, kv_dim)."""
        shapes = {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, self.kv_dim),
            "v_proj": (self.hidden, self.kv_dim),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if module not in shapes:
            raise LorabenchError(f"unknown target module {module!r}; expected one of {', '.join(shapes)}")
        return shapes[module]

    @property
    def params(self) -> int:
        """Parameter count of the base model (embeddings and lm_head untied)."""
        per_layer = sum(d_in * d_out for d_in, d_out in map(self.module_shape, ALL_LINEAR))
        return self.layers * (per_layer + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden

    def lora_params(self, rank: int, modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> int:
        """Parameters of one rank-`rank` adapter on `modules` of every layer (A and B)."""
        return self.layers * sum(rank * (d_in + d_out) for d_in, d_out in map(self.module_shape, modules))


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        # Small enough for CPU tests, with GQA and a non-square MLP so every code path runs.
        ModelShape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=256),
        ModelShape("llama-7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
        ModelShape(
            "mistral-7b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000,
            rope_theta=1e6,
        ),
        ModelShape("llama-13b", hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    )
}


@dataclass(frozen=True)
class DeviceSpec:
    """What the roofline needs of a GPU. Rates in FLOP/s and bytes/s, sizes in bytes."""

    name: str
    bf16_flops: float  # dense bf16 matmul rate
    mem_bandwidth: float  # device memory, bytes read + written per second
    host_link_bandwidth: float  # pinned host -> device copy
    memory_bytes: int
    copy_latency_s: float = 8e-6  # fixed cost of one host->device copy
    # Fixed cost of one kernel in a replayed CUDA graph (launch, ramp-up, tail): the roofline's
    # per-kernel term for base-model kernels (lorabench.sim.costmodel).
    launch_overhead_s: float = 5e-6
    measured: bool = False  # True when the figures come from a run on the device


GB = 1e9
GIB = 2**30

DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        # Measured 2026-11-29, ../shared/anchors.md: 694 TFLOP/s bf16 8192^3, 4,249 GB/s d2d copy,
        # 55.5 GB/s pinned h2d; 139 GiB visible to CUDA. Copy latency: a 27.3 MB adapter as 256
        # pinned tensors took 2.0 ms, packed in one buffer 0.50 ms: (2.0 - 0.5) / 255 = 5.9 us per copy.
        # Kernel cost: fitted to the decoder-layer times there (163.7 us at batch 1, ~10 kernels).
        DeviceSpec("h200", 694e12, 4249 * GB, 55.5 * GB, 139 * GIB, copy_latency_s=5.9e-6, measured=True),
        DeviceSpec("h100", 989e12 * 0.7, 3350 * GB * 0.9, 50 * GB, 80 * GIB),
        DeviceSpec("a100", 312e12 * 0.8, 2039 * GB * 0.9, 24 * GB, 80 * GIB),
        DeviceSpec("l40s", 362e12 * 0.7, 864 * GB * 0.9, 24 * GB, 48 * GIB),
    )
}


def device_name(device) -> str:
    """'h200' for an NVIDIA H200 (a preset's name when one matches), 'cpu' on the CPU."""
    if device.type != "cuda":
        return "cpu"
    import torch

    full = torch.cuda.get_device_name(device).lower()
    return next((d for d in DEVICES if d in full.split() or d in full.replace("nvidia", "")), full.replace(" ", "-"))


def model_preset(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise LorabenchError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def device_preset(name: str) -> DeviceSpec:
    try:
        return DEVICES[name]
    except KeyError:
        raise LorabenchError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None
