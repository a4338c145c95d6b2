"""The quality study's trainable tiny Llama, with many LoRA adapters trained side by side.

A Llama-shaped decoder in plain PyTorch (RMSNorm, half-split RoPE, grouped-query causal attention,
SwiGLU, untied head), written apart from `lorabench.model` on purpose: the study saves it as a
Hugging Face checkpoint and `lorabench eval` loads that into lorabench's own decoder, so the base
loss eval reports must equal the one measured here (the study checks it).

LoRA adapters are trained in one batch: tokens (n, b, T) are b sequences of each of n tasks, and
every linear layer adds s * B_i A_i x for the task's adapter i (PEFT's initialization: A uniform
in +-1/sqrt(d_in), B zero).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class TinyLlama(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, seed: int,
                 theta: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        self.config = dict(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                           intermediate=intermediate, theta=theta, eps=eps)
        g = torch.Generator().manual_seed(seed)
        head_dim = hidden // heads
        self.shapes = {"q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden),
                       "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, hidden),
                       "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
                       "down_proj": (hidden, intermediate)}

        def param(*shape, std):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * std)

        self.embed = param(vocab, hidden, std=1.0)
        self.lm_head = param(vocab, hidden, std=hidden**-0.5)
        self.final_norm = torch.nn.Parameter(torch.ones(hidden))
        self.weights = torch.nn.ParameterList()
        self.norms = torch.nn.ParameterList()
        for _ in range(layers):
            for m in ATTN + MLP:
                out, inp = self.shapes[m]
                self.weights.append(param(out, inp, std=inp**-0.5))
            self.norms.append(torch.nn.Parameter(torch.ones(hidden)))
            self.norms.append(torch.nn.Parameter(torch.ones(hidden)))

    def weight(self, layer: int, module: str) -> torch.Tensor:
        return self.weights[layer * 7 + (ATTN + MLP).index(module)]

    def _rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config["eps"]) * w

    def forward(self, tokens: torch.Tensor, lora: dict | None = None, scale: float = 1.0) -> torch.Tensor:
        """Logits (n, b, T, vocab) of tokens (n, b, T); lora[(layer, module)] = (A (n, r, d_in), B (n, d_out, r))."""
        c = self.config
        n, b, T = tokens.shape
        D = c["hidden"] // c["heads"]
        x = self.embed[tokens].reshape(n, b * T, c["hidden"])
        inv_freq = 1.0 / c["theta"] ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def linear(h, i, m):
            y = h @ self.weight(i, m).T
            if lora is not None and (i, m) in lora:
                A, B = lora[(i, m)]
                y = y + scale * torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))
            return y

        def heads(y, count):  # (n, bT, count*D) -> (n*b, count, T, D)
            return y.view(n * b, T, count, D).transpose(1, 2)

        def rope(y):
            y1, y2 = y[..., : D // 2], y[..., D // 2:]
            return y * cos + torch.cat([-y2, y1], -1) * sin

        for i in range(c["layers"]):
            h = self._rms(x, self.norms[2 * i])
            q = rope(heads(linear(h, i, "q_proj"), c["heads"]))
            k = rope(heads(linear(h, i, "k_proj"), c["kv_heads"])).repeat_interleave(c["heads"] // c["kv_heads"], 1)
            v = heads(linear(h, i, "v_proj"), c["kv_heads"]).repeat_interleave(c["heads"] // c["kv_heads"], 1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, b * T, -1)
            x = x + linear(o, i, "o_proj")
            h = self._rms(x, self.norms[2 * i + 1])
            x = x + linear(F.silu(linear(h, i, "gate_proj")) * linear(h, i, "up_proj"), i, "down_proj")
        return (self._rms(x, self.final_norm) @ self.lm_head.T).view(n, b, T, -1)

    def hf_tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter under the name transformers gives it in a LlamaForCausalLM checkpoint."""
        tensors = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm,
                   "lm_head.weight": self.lm_head}
        for i in range(self.config["layers"]):
            for m in ATTN + MLP:
                tensors[f"model.layers.{i}.{'self_attn' if m in ATTN else 'mlp'}.{m}.weight"] = self.weight(i, m)
            tensors[f"model.layers.{i}.input_layernorm.weight"] = self.norms[2 * i]
            tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = self.norms[2 * i + 1]
        return tensors

    def save_hf(self, folder: Path) -> Path:
        """config.json and model.safetensors as transformers names a LlamaForCausalLM's."""
        c = self.config
        folder.mkdir(parents=True, exist_ok=True)
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden"],
                  "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
                  "num_key_value_heads": c["kv_heads"], "intermediate_size": c["intermediate"],
                  "vocab_size": c["vocab"], "rope_theta": c["theta"], "rms_norm_eps": c["eps"],
                  "max_position_embeddings": 256, "hidden_act": "silu", "tie_word_embeddings": False,
                  "torch_dtype": "float32"}
        save_file({k: v.detach().contiguous() for k, v in self.hf_tensors().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        return folder


def token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over every predicted position."""
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), tokens[..., 1:].reshape(-1))


def pretrain(model: TinyLlama, batches, steps: int, lr: float, progress) -> list[float]:
    """AdamW with linear warm-up and cosine decay; `batches(step)` gives (1, b, T) tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))

    def loss_at(step: int) -> torch.Tensor:
        tokens = batches(step)
        return token_loss(model(tokens), tokens)
    return _optimize(opt, sched, loss_at, steps, progress)


def _optimize(opt, sched, loss_at, steps: int, progress) -> list[float]:
    """`steps` optimizer steps on loss_at(step); the losses."""
    losses = []
    for step in progress(range(steps)):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def new_adapters(model: TinyLlama, n: int, rank: int, modules, seed: int) -> dict:
    """PEFT's initialization for n adapters: A uniform in +-1/sqrt(d_in) (kaiming-uniform, a = sqrt 5), B zero."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(model.config["layers"]):
        for m in modules:
            out, inp = model.shapes[m]
            A = (torch.rand(n, rank, inp, generator=g) * 2 - 1) / math.sqrt(inp)
            lora[(i, m)] = (torch.nn.Parameter(A), torch.nn.Parameter(torch.zeros(n, out, rank)))
    return lora


def train_adapters(model: TinyLlama, lora: dict, scale: float, batches, steps: int, lr: float, progress) -> list[float]:
    """Adam on every adapter at once (the base frozen); `batches(step)` gives (n, b, T) tokens."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for pair in lora.values() for p in pair]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

    def loss_at(step: int) -> torch.Tensor:
        tokens = batches(step)
        return token_loss(model(tokens, lora, scale), tokens)
    return _optimize(opt, sched, loss_at, steps, progress)
