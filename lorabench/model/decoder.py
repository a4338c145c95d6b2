"""A Llama/Mistral-shaped decoder with random weights of the real shapes (nothing is downloaded).

RMSNorm, rotary position embeddings (rope_theta from the shape), grouped-query attention over a
block KV cache, SwiGLU MLP; q/k/v biases when the shape has `qkv_bias` (Qwen2), lm_head sharing
the embedding when it has `tied_embeddings`. Weights are bf16 on CUDA and fp32 on CPU by default,
drawn from a seeded generator with std 1/sqrt(d_in) so activations keep their scale, or read from a
Hugging Face checkpoint (`checkpoint.load_checkpoint`). Every linear layer may carry LoRA: `forward`
hands each (layer, module) to the strategy state with the step's `LoraBatch`, built once per step.
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


BIASED_MODULES = ("q_proj", "k_proj", "v_proj")  # the modules a shape with qkv_bias gives a bias


def bias_key(module: str) -> str:
    return f"{module}.bias"


def rope_frequencies(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) of plain RoPE, float32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rotary(positions: torch.Tensor, head_dim: int, theta: float,
           inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) for the half-split rotation Llama checkpoints use (inv_freq: a
    checkpoint's own frequencies, e.g. with Llama 3's scaling; default plain RoPE of `theta`)."""
    inv_freq = rope_frequencies(head_dim, theta, positions.device) if inv_freq is None else inv_freq.to(positions.device)
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
        # Drawn after every other weight, so shapes without them get the weights they always had.
        if shape.qkv_bias:
            for layer in self.layers:
                for m in BIASED_MODULES:
                    layer[bias_key(m)] = (torch.randn(shape.module_shape(m)[1], generator=g, device=self.device)
                                          * 0.1).to(self.dtype)
        if shape.tied_embeddings:
            self.lm_head = self.embed
        self.rope_inv_freq: torch.Tensor | None = None  # None: plain RoPE of shape.rope_theta

    @classmethod
    def from_weights(cls, shape: ModelShape, embed: torch.Tensor, layers: list[dict[str, torch.Tensor]],
                     final_norm: torch.Tensor, lm_head: torch.Tensor, rope_inv_freq: torch.Tensor | None = None) -> "Decoder":
        """A decoder with given weights (on their device, in their dtype): `layers[i]` maps every
        module of ALL_LINEAR to its (d_out, d_in) weight, "attn_norm" and "mlp_norm" to the norms,
        and "{q,k,v}_proj.bias" to biases when the shape has them."""
        model = cls.__new__(cls)
        model.shape, model.device, model.dtype = shape, embed.device, embed.dtype
        model.embed, model.layers, model.final_norm, model.lm_head = embed, layers, final_norm, lm_head
        model.rope_inv_freq = rope_inv_freq
        return model

    @property
    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm, self.lm_head] + [t for layer in self.layers for t in layer.values()]
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())  # a tied lm_head counts once

    def linear(self, layer: int, module: str, x: torch.Tensor, lora: LoraState | None, fb: ForwardBatch) -> torch.Tensor:
        weights = self.layers[layer]
        y = x @ weights[module].T
        bias = weights.get(bias_key(module))
        if bias is not None:
            y = y + bias
        return lora.apply(layer, module, x, y, fb.lora) if lora is not None else y

    @torch.no_grad()
    def forward(self, fb: ForwardBatch, kv: KVCache, lora: LoraState | None = None,
                attention_backend: str = "torch") -> torch.Tensor:
        """Logits (B, vocab) at each sequence's last new token, in batch order (fb.order)."""
        x = self.hidden_states(fb, kv, lora, attention_backend)
        return self.logits(x[fb.last_token])

    @torch.no_grad()
    def forward_all(self, fb: ForwardBatch, kv: KVCache, lora: LoraState | None = None,
                    attention_backend: str = "torch") -> torch.Tensor:
        """Logits (T, vocab) at every new token, in batch order (sequence b's are rows
        fb.cu_q[b]:fb.cu_q[b + 1]): what evaluating a model on text needs."""
        return self.logits(self.hidden_states(fb, kv, lora, attention_backend))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.final_norm, self.shape.norm_eps) @ self.lm_head.T

    def hidden_states(self, fb: ForwardBatch, kv: KVCache, lora: LoraState | None = None,
                      attention_backend: str = "torch") -> torch.Tensor:
        """The residual stream (T, hidden) after the last layer, at every new token."""
        s = self.shape
        x = self.embed[fb.input_ids]
        cos, sin = rotary(fb.positions, s.head_dim, s.rope_theta, self.rope_inv_freq)
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
        return x
