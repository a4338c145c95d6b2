"""Model shapes and device presets, as frozen dataclasses looked up by name.

Model shapes are those of the public checkpoints (weights are always random: nothing is downloaded);
`--model path/to/config.json` (or a checkpoint folder holding one) reads a Hugging Face config of a
Llama, Mistral or Qwen2 model instead (`shape_from_hf_config`).
Device figures: the h200 preset is measured (../shared/anchors.md, 2026-11-29: copy bandwidth,
bf16 matmul rate, pinned host->device copy). h100, a100, l40s and b200 hold datasheet peaks: the cost
model's efficiency factors (`Efficiency`, or a fitted profile's kernel physics) are the only discount
applied to them. h100 and a100 have profiles fitted to Vidur's per-operation measurements
(results/profiles/<device>-vidur.json, `lorabench profile --from-vidur`), which `lorabench run` uses by
default; their all-reduce figures are fitted to Vidur's NCCL measurements. h100-64gb keeps the
figures it was introduced with (datasheet x 0.7 / 0.9; the vLLM engine model is calibrated on them).
Each preset says where every figure comes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tied_embeddings: bool = False  # lm_head shares the input embedding's weights
    max_context: int = 4096  # tokens of prompt + output the checkpoint supports (max_position_embeddings)
    architecture: str = "LlamaForCausalLM"  # the Hugging Face class (serving engines wrap layers by it)
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
        """Parameter count of the base model: linear layers, q/k/v biases, norms, embeddings and lm_head
        (one matrix when tied)."""
        per_layer = sum(d_in * d_out for d_in, d_out in map(self.module_shape, ALL_LINEAR)) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.hidden + 2 * self.kv_dim
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden
        return self.layers * per_layer + embeddings + self.hidden

    def lora_params(self, rank: int, modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> int:
        """Parameters of one rank-`rank` adapter on `modules` of every layer (A and B)."""
        return self.layers * sum(rank * (d_in + d_out) for d_in, d_out in map(self.module_shape, modules))


def target_modules(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'all-linear', a comma-separated string, or a sequence of module names -> a checked tuple."""
    if isinstance(spec, str):
        spec = ALL_LINEAR if spec == "all-linear" else tuple(m.strip() for m in spec.split(",") if m.strip())
    bad = [m for m in spec if m not in ALL_LINEAR]
    if bad or not spec:
        raise LorabenchError(f"target modules {list(spec)}: expected 'all-linear' or names from {', '.join(ALL_LINEAR)}")
    return tuple(spec)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        # Small enough for CPU tests, with GQA and a non-square MLP so every code path runs; a toy with no
        # checkpoint, its context is as long as mistral-7b's so that every shipped workload runs on it.
        ModelShape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=256, max_context=32768),
        # Llama-2 7B / 13B shapes (the same as Llama-1's, with 4,096 tokens of context).
        ModelShape("llama-7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
        ModelShape(
            "mistral-7b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000,
            rope_theta=1e6, max_context=32768, architecture="MistralForCausalLM",
        ),
        ModelShape("llama-13b", hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
        # From the checkpoints' config.json (meta-llama/Llama-3.1-8B and -70B, Qwen/Qwen2.5-7B and -72B;
        # Qwen2.5 ties embeddings only at 0.5-3B). Llama 3.1's RoPE frequency scaling does not change any
        # size lorabench models.
        ModelShape(
            "llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
            rope_theta=500000.0, max_context=131072,
        ),
        ModelShape(
            "llama-3.1-70b", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256,
            rope_theta=500000.0, max_context=131072,
        ),
        ModelShape(
            "qwen2.5-7b", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
            rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, max_context=32768, architecture="Qwen2ForCausalLM",
        ),
        ModelShape(
            "qwen2.5-72b", hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568, vocab=152064,
            rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, max_context=32768, architecture="Qwen2ForCausalLM",
        ),
    )
}

# What --model accepts, for help texts.
MODEL_HELP = f"a preset ({', '.join(MODELS)}) or a Hugging Face config.json (or its folder)"

# Hugging Face architectures whose decoder is the one lorabench models (RMSNorm, RoPE, GQA, SwiGLU).
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def shape_from_hf_config(path: str | Path) -> ModelShape:
    """The ModelShape of a Hugging Face config.json (or a checkpoint folder holding one). Its name is
    the path as given, so a run's config.json names the same file again."""
    given = str(path)
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LorabenchError(f"--model {given}: no such file (expected a preset name or a Hugging Face "
                             f"config.json; presets: {', '.join(MODELS)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LorabenchError(f"model config {path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise LorabenchError(f"model config {path}: expected a JSON object")
    architectures = config.get("architectures") or []
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    if arch not in HF_ARCHITECTURES:
        raise LorabenchError(f"model config {path}: architecture {arch!r} is not supported; lorabench models "
                             f"{', '.join(HF_ARCHITECTURES)}")

    def field_of(key: str, kind: type, default=None):
        value = config.get(key, default)
        if value is None:
            raise LorabenchError(f"model config {path}: field {key} is missing")
        if kind is bool:
            if not isinstance(value, bool):
                raise LorabenchError(f"model config {path}: field {key} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
                or value <= 0:
            raise LorabenchError(f"model config {path}: field {key} must be a positive {kind.__name__}, got {value!r}")
        return kind(value)

    hidden, heads = field_of("hidden_size", int), field_of("num_attention_heads", int)
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise LorabenchError(f"model config {path}: head_dim {head_dim} differs from hidden_size / "
                             f"num_attention_heads = {hidden // heads}; lorabench models only the latter")
    # Qwen2 always puts biases on q/k/v; Llama and Mistral only with attention_bias.
    qkv_bias = arch == "Qwen2ForCausalLM" or field_of("attention_bias", bool, False)
    return ModelShape(
        given, hidden=hidden, layers=field_of("num_hidden_layers", int), heads=heads,
        kv_heads=field_of("num_key_value_heads", int, heads), intermediate=field_of("intermediate_size", int),
        vocab=field_of("vocab_size", int), rope_theta=field_of("rope_theta", float, 10000.0),
        norm_eps=field_of("rms_norm_eps", float, 1e-6), qkv_bias=qkv_bias,
        tied_embeddings=field_of("tie_word_embeddings", bool, False),
        max_context=field_of("max_position_embeddings", int, 4096), architecture=arch,
    )


def is_config_path(name: str) -> bool:
    """Whether a --model value names a file or folder rather than a preset."""
    return name.endswith(".json") or "/" in name or Path(name).is_dir()


@dataclass(frozen=True)
class DeviceSpec:
    """What the cost model needs of a GPU. Rates in FLOP/s and bytes/s, sizes in bytes.

    The fields after `launch_overhead_s` feed the kernel physics (lorabench.sim.kernels: GEMM tiles
    in waves over the SMs) and tensor parallelism (all-reduces over the GPUs' link); their defaults
    keep a device without them on the plain roofline, with no FP8 and no tensor parallelism.
    """

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
    sm_count: int = 0  # streaming multiprocessors: a GEMM's output tiles run in waves of this many
    # Output tiles (rows x columns) of the GEMM library's main kernels on this architecture; a fitted
    # profile picks the one that explains the measured steps best (the first is the default).
    gemm_tiles: tuple[tuple[int, int], ...] = ((128, 128),)
    fp8_flops: float = 0.0  # dense FP8 matmul rate; 0 = no FP8 tensor cores
    link_latency_s: float = 0.0  # one all-reduce among the GPUs of a node: fixed cost
    link_bandwidth: float = 0.0  # and its bus bandwidth (NCCL's busbw), bytes/s; 0 = no GPU-to-GPU figures
    interconnect: str = ""  # what links the GPUs, in words


GB = 1e9
GIB = 2**30

# All-reduce among the GPUs of one node (latency + 2 (n - 1) / n x bytes / bus bandwidth), fitted by
# `lorabench profile --from-vidur` to Vidur's NCCL measurements (results/profiles/vidur-llama-2-7b/
# network/*/all_reduce.csv: 2, 4 and 8 GPUs of a DGX, 2 KB - 64 MB; about 10% mean error).
DGX_H100_LINK = dict(link_latency_s=29.7e-6, link_bandwidth=353 * GB, interconnect="NVLink 4 + NVSwitch")
DGX_A100_LINK = dict(link_latency_s=46.8e-6, link_bandwidth=168 * GB, interconnect="NVLink 3 + NVSwitch")
HOPPER_TILES = ((128, 256), (128, 128), (256, 128))  # cuBLAS sm90 kernels (warpgroup MMA)
AMPERE_TILES = ((128, 128), (128, 256), (256, 128))  # cuBLAS sm80 / sm89 kernels (mma.sync)

DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        # Measured 2026-11-29, ../shared/anchors.md: 694 TFLOP/s bf16 8192^3, 4,249 GB/s d2d copy,
        # 55.5 GB/s pinned h2d; 139 GiB visible to CUDA. Copy latency: a 27.3 MB adapter as 256
        # pinned tensors took 2.0 ms, packed in one buffer 0.50 ms: (2.0 - 0.5) / 255 = 5.9 us per copy.
        # Kernel cost: fitted to the decoder-layer times there (163.7 us at batch 1, ~10 kernels).
        # Datasheet: 132 SMs; FP8 at twice the bf16 rate (1,979 vs 989 TFLOP/s dense), applied to the
        # measured bf16 figure. Link: the same NVLink 4 + NVSwitch as a DGX H100 (assumed, not measured).
        DeviceSpec("h200", 694e12, 4249 * GB, 55.5 * GB, 139 * GIB, copy_latency_s=5.9e-6, measured=True,
                   sm_count=132, gemm_tiles=HOPPER_TILES, fp8_flops=2 * 694e12, **DGX_H100_LINK),
        # H100 SXM 80 GB datasheet: 989 TFLOP/s dense bf16, 1,979 dense FP8, 3.35 TB/s HBM3, 132 SMs,
        # PCIe Gen5 (50 GB/s pinned assumed). Kernel physics: results/profiles/h100-vidur.json.
        DeviceSpec("h100", 989e12, 3350 * GB, 50 * GB, 80 * GIB, sm_count=132, gemm_tiles=HOPPER_TILES,
                   fp8_flops=1979e12, **DGX_H100_LINK),
        # The H100 SXM 64 GB of the vLLM runs in ../shared/data (MareNostrum 5; 63.43 GiB visible to torch,
        # from their logs). Datasheet: 989 TFLOP/s dense bf16 (x 0.7, as h100 had); its HBM2e bandwidth is not
        # published for this variant: 0.9 x 2.0 TB/s is assumed (four HBM2e stacks, as the H100 PCIe's),
        # to be replaced by a calibrated figure (`lorabench calibrate`, results/engines/). The figures stay
        # as they were (the vLLM engine model is fitted on them); SMs, tiles and link as h100.
        DeviceSpec("h100-64gb", 989e12 * 0.7, 2000 * GB * 0.9, 50 * GB, int(63.43 * GIB), sm_count=132,
                   gemm_tiles=HOPPER_TILES, fp8_flops=1979e12 * 0.7, **DGX_H100_LINK),
        # A100 SXM 80 GB datasheet: 312 TFLOP/s dense bf16, 2,039 GB/s HBM2e, 108 SMs, no FP8 tensor
        # cores, PCIe Gen4 (24 GB/s pinned assumed). Kernel physics: results/profiles/a100-vidur.json.
        DeviceSpec("a100", 312e12, 2039 * GB, 24 * GB, 80 * GIB, sm_count=108, gemm_tiles=AMPERE_TILES,
                   **DGX_A100_LINK),
        # L40S datasheet (unmeasured): 362 TFLOP/s dense bf16, 733 dense FP8, 864 GB/s GDDR6, 142 SMs,
        # 48 GB, PCIe Gen4 and no NVLink: all-reduces cross PCIe (20 GB/s bus bandwidth and 30 us
        # assumed, as NCCL reaches over PCIe Gen4 without NVLink).
        DeviceSpec("l40s", 362e12, 864 * GB, 24 * GB, 48 * GIB, sm_count=142, gemm_tiles=AMPERE_TILES,
                   fp8_flops=733e12, link_latency_s=30e-6, link_bandwidth=20 * GB, interconnect="PCIe Gen4"),
        # B200 (HGX B200) datasheet, unmeasured: 2.25 PFLOP/s dense bf16, 4.5 dense FP8, 8 TB/s HBM3e,
        # 180 GB, 148 SMs, NVLink 5 (twice NVLink 4's bandwidth: the DGX H100 fit's bus bandwidth x 2,
        # its latency kept; assumed), PCIe Gen5 (as the H200's measured 55.5 GB/s). Tiles as Hopper's
        # (assumed: Blackwell's tcgen05 kernels pair SMs, which this model does not describe).
        DeviceSpec("b200", 2250e12, 8000 * GB, 55.5 * GB, 180 * GIB, sm_count=148, gemm_tiles=HOPPER_TILES,
                   fp8_flops=4500e12, link_latency_s=DGX_H100_LINK["link_latency_s"],
                   link_bandwidth=2 * DGX_H100_LINK["link_bandwidth"], interconnect="NVLink 5 + NVSwitch"),
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
    """A preset by name, or the shape of a Hugging Face config.json (a path to it or to its folder)."""
    if name in MODELS:
        return MODELS[name]
    if is_config_path(name):
        return shape_from_hf_config(name)
    raise LorabenchError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or give a Hugging Face "
                         "config.json")


def device_preset(name: str) -> DeviceSpec:
    try:
        return DEVICES[name]
    except KeyError:
        raise LorabenchError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None
