"""A Llama/Mistral-shaped decoder with random weights of the real shapes (nothing is downloaded).

RMSNorm, rotary position embeddings (rope_theta from the shape), grouped-query attention over a
block KV cache, SwiGLU MLP, untied lm_head. Weights are bf16 on CUDA and fp32 on CPU by default,
drawn from a seeded generator with std 1/sqrt(d_in) so activations keep their scale. Every linear
layer may carry LoRA: `forward` hands each (layer, module) to the strategy state with the step's
`LoraBatch`, built once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorabench.presets import ALL_LINEAR, ModelShape

from .attention import attention, store_kv
from .batch import ForwardBatch
from .kv_cache import KVCache
from .lora import LoraState


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) for the half-split rotation Llama checkpoints use."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


class Decoder:
    """Weights as plain tensors: linear weights (d_out, d_in) as nn.Linear stores them."""

    def __init__(self, shape: ModelShape, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0):
        self.shape = shape
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)

        def linear(d_in: int, d_out: int) -> torch.Tensor:
            w = torch.randn(d_out, d_in, generator=g, device=self.device, dtype=torch.float32)
            return (w / d_in**0.5).to(self.dtype)

        def norm() -> torch.Tensor:
            return (1 + 0.1 * torch.randn(shape.hidden, generator=g, device=self.device)).to(self.dtype)

        self.embed = torch.randn(shape.vocab, shape.hidden, generator=g, device=self.device).to(self.dtype)
        self.layers = []
        for _ in range(shape.layers):
            layer = {m: linear(*shape.module_shape(m)) for m in ALL_LINEAR}
            layer["attn_norm"], layer["mlp_norm"] = norm(), norm()
            self.layers.append(layer)
        self.final_norm = norm()
        self.lm_head = linear(shape.hidden, shape.vocab)

    @property
    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm, self.lm_head] + [t for layer in self.layers for t in layer.values()]
        return sum(t.nbytes for t in tensors)

    def linear(self, layer: int, module: str, x: torch.Tensor, lora: LoraState | None, fb: ForwardBatch) -> torch.Tensor:
        y = x @ self.layers[layer][module].T
        return lora.apply(layer, module, x, y, fb.lora) if lora is not None else y

    @torch.no_grad()
    def forward(self, fb: ForwardBatch, kv: KVCache, lora: LoraState | None = None,
                attention_backend: str = "torch") -> torch.Tensor:
        """Logits (B, vocab) at each sequence's last new token, in batch order (fb.order)."""
        s = self.shape
        x = self.embed[fb.input_ids]
        cos, sin = rotary(fb.positions, s.head_dim, s.rope_theta)
        T = x.shape[0]
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w["attn_norm"], s.norm_eps)
            q = apply_rotary(self.linear(i, "q_proj", h, lora, fb).view(T, s.heads, s.head_dim), cos, sin)
            k = apply_rotary(self.linear(i, "k_proj", h, lora, fb).view(T, s.kv_heads, s.head_dim), cos, sin)
            v = self.linear(i, "v_proj", h, lora, fb)
            store_kv(kv.storage[i], fb, k.reshape(T, s.kv_dim), v, kv.v_col)
            o = attention(q, kv.storage[i], fb, s.kv_heads, kv.v_col, attention_backend)
            x = x + self.linear(i, "o_proj", o, lora, fb)
            h = rms_norm(x, w["mlp_norm"], s.norm_eps)
            gate = F.silu(self.linear(i, "gate_proj", h, lora, fb)) * self.linear(i, "up_proj", h, lora, fb)
            x = x + self.linear(i, "down_proj", gate, lora, fb)
        x = rms_norm(x[fb.last_token], self.final_norm, s.norm_eps)
        return x @ self.lm_head.T
