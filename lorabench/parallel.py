"""Tensor parallelism and number formats: what one GPU of a replica holds and moves.

A replica spans `tp` GPUs and shards the decoder as vLLM does (Megatron-style):

- column-parallel (q_proj, k_proj, v_proj, gate_proj, up_proj): each GPU holds 1 / tp of the output
  rows, so it computes 1 / tp of the attention heads and of the MLP's intermediate features;
- row-parallel (o_proj, down_proj): each GPU holds 1 / tp of the input columns and produces a partial
  sum; an all-reduce of the (tokens x hidden) output follows each, so two per layer;
- KV heads split like the query heads; when there are fewer KV heads than GPUs each GPU keeps one
  (replicas of it), as vLLM does, so the KV cache per GPU stops shrinking;
- the embedding and the LM head are split along the vocabulary (the logits are gathered on one GPU);
  the norms are replicated.

LoRA adapters follow vLLM's default (not `fully_sharded_loras`): on a column-parallel module A
(r x d_in) is replicated and B (d_out x r) split with the base weight's rows; on a row-parallel
module A is split with the base weight's columns and B replicated, so the shrink's partial sums ride
in the base layer's own all-reduce. Neither adds communication; each GPU reads a whole A (column) or
a whole B (row) per module. S-LoRA's scheme (and vLLM's `--fully-sharded-loras`) would also split the
column modules' A along the rank and the row modules' B along the output: 1 / tp of the adapter bytes
per GPU, at the cost of an all-gather of the (tokens x rank) intermediate per column module, a small,
latency-bound collective lorabench does not model. Compressed adapters shard their bases the same
way (U with B, V with A); the per-adapter R x R cores are replicated.

Number formats: base weights in bf16 or FP8 (`--weight-dtype`; the embedding and LM head stay bf16,
as FP8 checkpoints keep them); the KV cache in the model's dtype or FP8 (`--kv-cache-dtype`); LoRA
adapters stay bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.errors import LorabenchError
from lorabench.presets import ALL_LINEAR, DeviceSpec, ModelShape

WEIGHT_DTYPES = ("bf16", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype (bf16), as vLLM's --kv-cache-dtype auto
ACTIVATION_BYTES = 2  # bf16 activations, and what all-reduces move
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class Parallel:
    """How a replica runs: GPUs it spans and the number formats of its weights and KV cache."""

    tp: int = 1
    weight_dtype: str = "bf16"
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise LorabenchError(f"--tp must be >= 1, got {self.tp}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise LorabenchError(f"--weight-dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LorabenchError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")

    @property
    def weight_bytes(self) -> int:
        """Bytes per base-model linear weight."""
        return 1 if self.weight_dtype == "fp8" else 2

    @property
    def kv_bytes(self) -> int:
        """Bytes per KV-cache element."""
        return 1 if self.kv_cache_dtype == "fp8" else 2

    @property
    def default(self) -> bool:
        """One GPU, bf16 everywhere: the case every output before tensor parallelism was made in."""
        return self == Parallel()

    def check_device(self, device: DeviceSpec) -> None:
        """One clear error when the device cannot run this configuration."""
        if self.weight_dtype == "fp8" and not device.fp8_flops:
            raise LorabenchError(f"--weight-dtype fp8: device {device.name} has no FP8 tensor cores (Hopper, Ada and "
                                 "Blackwell GPUs do: h100, h200, l40s, b200); use --weight-dtype bf16")
        if self.tp > 1 and not device.link_bandwidth:
            raise LorabenchError(f"--tp {self.tp}: device {device.name} has no GPU-to-GPU link figures "
                                 "(link_latency_s, link_bandwidth); give them in a --profile")


@dataclass(frozen=True)
class Shard:
    """The part of `model` one GPU of a `tp`-way group holds. Sizes are per GPU."""

    model: ModelShape
    tp: int
    heads: int  # query heads
    kv_heads: int  # KV heads (a replica of one when the model has fewer than tp)
    intermediate: int  # MLP features
    vocab: int  # embedding / LM-head rows (vLLM pads the vocabulary to a multiple of tp)

    @property
    def q_dim(self) -> int:
        return self.heads * self.model.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.model.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a linear module's slice on this GPU."""
        h = self.model.hidden
        shapes = {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
            "down_proj": (self.intermediate, h),
        }
        if module not in shapes:
            self.model.module_shape(module)  # its error names the modules
        return shapes[module]

    def lora_elements(self, module: str) -> tuple[int, int]:
        """(A, B) elements per rank of a LoRA adapter on `module`, on this GPU (vLLM's sharding,
        module docstring): a column module keeps A whole and a slice of B, a row module the reverse."""
        d_in, d_out = self.module_shape(module)
        full_in, full_out = self.model.module_shape(module)
        return (full_in, d_out) if module in COLUMN_PARALLEL else (d_in, full_out)

    def weight_bytes(self, weight_bytes: int = 2) -> int:
        """Base-model bytes on this GPU: linear weights in `weight_bytes` each, everything else bf16
        (q/k/v biases, norms, embedding, LM head). With tp = 1 and bf16: model.params x 2."""
        m, b = self.model, ACTIVATION_BYTES
        linear = sum(d_in * d_out for d_in, d_out in map(self.module_shape, ALL_LINEAR))
        bias = self.q_dim + 2 * self.kv_dim if m.qkv_bias else 0
        per_layer = linear * weight_bytes + (bias + 2 * m.hidden) * b
        embeddings = (1 if m.tied_embeddings else 2) * self.vocab * m.hidden * b
        return m.layers * per_layer + embeddings + m.hidden * b

    def all_reduce_bytes(self, tokens: int) -> int:
        """Bytes of one of the layer's two all-reduces for `tokens` tokens (0 on one GPU)."""
        return 0 if self.tp == 1 else tokens * self.model.hidden * ACTIVATION_BYTES


def shard(model: ModelShape, tp: int = 1) -> Shard:
    """What one GPU of a `tp`-way tensor-parallel group holds; one clear error when the model cannot
    be split that way (vLLM's rules: tp divides the query heads and the MLP width, and either divides
    the KV heads or is a multiple of them)."""
    if tp < 1:
        raise LorabenchError(f"--tp must be >= 1, got {tp}")
    if model.heads % tp:
        raise LorabenchError(f"--tp {tp} does not divide model {model.name}'s {model.heads} attention heads; "
                             f"choose one of {', '.join(map(str, valid_tp(model)))}")
    if model.kv_heads % tp and tp % model.kv_heads:
        raise LorabenchError(f"--tp {tp}: model {model.name}'s {model.kv_heads} KV heads can neither be split "
                             f"{tp} ways nor replicated evenly; choose one of {', '.join(map(str, valid_tp(model)))}")
    if model.intermediate % tp:
        raise LorabenchError(f"--tp {tp} does not divide model {model.name}'s MLP width {model.intermediate}; "
                             f"choose one of {', '.join(map(str, valid_tp(model)))}")
    return Shard(model, tp, model.heads // tp, max(model.kv_heads // tp, 1), model.intermediate // tp,
                 -(-model.vocab // tp))


def valid_tp(model: ModelShape, up_to: int = 64) -> list[int]:
    """Tensor-parallel sizes the model can be split into (up to `up_to` GPUs)."""
    return [t for t in range(1, up_to + 1) if not model.heads % t and not model.intermediate % t
            and (not model.kv_heads % t or not t % model.kv_heads)]


def check_fits(model: ModelShape, parallel: Parallel, device: DeviceSpec, utilization: float) -> None:
    """One clear error when the base weights alone fill each GPU's budget (device memory x
    utilization) at this tensor-parallel size, naming the sizes and formats that would fit."""
    need = shard(model, parallel.tp).weight_bytes(parallel.weight_bytes)
    budget = device.memory_bytes * utilization
    if need < budget:
        return
    fits = []  # per weight format, the fewest GPUs that leave a fifth of the budget for the KV cache
    for dtype in WEIGHT_DTYPES if device.fp8_flops else WEIGHT_DTYPES[:1]:
        wbytes = Parallel(weight_dtype=dtype).weight_bytes
        tp = next((t for t in valid_tp(model, 16) if shard(model, t).weight_bytes(wbytes) < 0.8 * budget), None)
        if tp is not None:
            fits.append(f"--tp {tp}" + ("" if dtype == "bf16" else " --weight-dtype fp8"))
    hint = f"; it would fit with {' or '.join(fits)}" if fits else ""
    raise LorabenchError(
        f"model {model.name} does not fit {device.name} GPUs at --tp {parallel.tp}: its {parallel.weight_dtype} "
        f"weights take {need / 2**30:.1f} GiB per GPU, {utilization:g} x {device.memory_bytes / 2**30:.1f} GiB = "
        f"{budget / 2**30:.1f} GiB are available{hint}")
