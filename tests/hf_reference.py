"""A tiny Hugging Face-style checkpoint written by hand, and an independent float64 forward of it.

`write_checkpoint` writes config.json and safetensors shards with transformers' tensor names (no
lorabench code involved); `reference_logits` computes the logits at every position straight from
those named tensors in float64, following the transformers Llama/Qwen2 definitions (RMSNorm,
half-split RoPE with optional Llama 3 frequency scaling, grouped-query causal attention, SwiGLU,
q/k/v biases, tied embeddings), with an optional per-(layer, module) weight change for LoRA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str = "LlamaForCausalLM", **overrides) -> dict:
    config = {"architectures": [arch], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 50, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "hidden_act": "silu",
              "tie_word_embeddings": False}
    config.update(overrides)
    return config


def random_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    qwen = config["architectures"][0] == "Qwen2ForCausalLM"
    t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.5,
         "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g)}
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = torch.randn(vocab, h, generator=g) / math.sqrt(h)
    for i in range(config["num_hidden_layers"]):
        for m, (rows, cols) in shapes.items():
            block = "self_attn" if m in ATTN else "mlp"
            t[f"model.layers.{i}.{block}.{m}.weight"] = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
            if qwen and m in ("q_proj", "k_proj", "v_proj"):
                t[f"model.layers.{i}.{block}.{m}.bias"] = 0.3 * torch.randn(rows, generator=g)
        t[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return t


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 2,
                     dtype=torch.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n].to(dtype).contiguous() for n in names[s::shards]}
        save_file(part, str(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    return folder


def _inv_freq(config: dict, head_dim: int) -> list[float]:
    """Per frequency, in plain Python floats: RoPE, with Llama 3's piecewise rescaling when configured."""
    theta = config["rope_theta"]
    freqs = [theta ** (-(2 * j) / head_dim) for j in range(head_dim // 2)]
    scaling = config.get("rope_scaling")
    if not scaling:
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def reference_logits(config: dict, tensors: dict[str, torch.Tensor], tokens: list[int], delta=None) -> torch.Tensor:
    """float64 logits (L, vocab) at every position of `tokens`; delta(layer, module) -> a float64
    (d_out, d_in) weight change or None."""
    t = {k: v.double() for k, v in tensors.items()}
    h, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    D, eps, L = h // heads, config["rms_norm_eps"], len(tokens)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def lin(x, i, m):
        block = "self_attn" if m in ATTN else "mlp"
        w = t[f"model.layers.{i}.{block}.{m}.weight"]
        d = delta(i, m) if delta else None
        y = x @ (w if d is None else w + d).T
        bias = t.get(f"model.layers.{i}.{block}.{m}.bias")
        return y if bias is None else y + bias

    freqs = torch.tensor(_inv_freq(config, D), dtype=torch.float64)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * freqs[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    x = t["model.embed_tokens.weight"][torch.tensor(tokens)]
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for i in range(config["num_hidden_layers"]):
        a = rms(x, t[f"model.layers.{i}.input_layernorm.weight"])
        q = rope(lin(a, i, "q_proj").view(L, heads, D))
        k = rope(lin(a, i, "k_proj").view(L, kv_heads, D)).repeat_interleave(heads // kv_heads, 1)
        v = lin(a, i, "v_proj").view(L, kv_heads, D).repeat_interleave(heads // kv_heads, 1)
        p = torch.softmax((torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)).masked_fill(~mask, -math.inf), -1)
        x = x + lin(torch.einsum("hqk,khd->qhd", p, v).reshape(L, h), i, "o_proj")
        a = rms(x, t[f"model.layers.{i}.post_attention_layernorm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(a, i, "gate_proj")) * lin(a, i, "up_proj"), i, "down_proj")
    head = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
    return rms(x, t["model.norm.weight"]) @ head.T
