"""A local Hugging Face checkpoint of a Llama, Mistral or Qwen2 model, loaded into `Decoder`.

A checkpoint folder holds `config.json` and the weights in one or more `*.safetensors` files
(sharded or not; the index file is not needed). Nothing is downloaded. The tensors are named as
transformers names them (`model.layers.{i}.self_attn.q_proj.weight`, ...); every tensor the
decoder needs must be there with its shape, and a tensor the decoder has no place for (an o_proj
bias, an MLP bias, ...) is an error rather than silently dropped. RoPE frequencies follow the
config's `rope_scaling` (none, or Llama 3's); `sliding_window`, when the model uses one, caps the
sequence length the model is evaluated on (`ModelShape.max_context`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from lorabench.errors import LorabenchError
from lorabench.presets import ALL_LINEAR, ATTENTION_MODULES, ModelShape, shape_from_hf_config

from .decoder import BIASED_MODULES, Decoder, bias_key, default_dtype, rope_frequencies

CONFIG_FILE = "config.json"


def checkpoint_names(shape: ModelShape) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """Every tensor name of a checkpoint of `shape` -> (decoder slot, layer or None, shape). Slots:
    "embed", "final_norm", "lm_head", or a key of the decoder's per-layer dict."""
    names = {"model.embed_tokens.weight": ("embed", None, (shape.vocab, shape.hidden)),
             "model.norm.weight": ("final_norm", None, (shape.hidden,))}
    if not shape.tied_embeddings:
        names["lm_head.weight"] = ("lm_head", None, (shape.vocab, shape.hidden))
    for i in range(shape.layers):
        prefix = f"model.layers.{i}."
        for m in ALL_LINEAR:
            d_in, d_out = shape.module_shape(m)
            block = "self_attn" if m in ATTENTION_MODULES else "mlp"
            names[f"{prefix}{block}.{m}.weight"] = (m, i, (d_out, d_in))
            if shape.qkv_bias and m in BIASED_MODULES:
                names[f"{prefix}{block}.{m}.bias"] = (bias_key(m), i, (d_out,))
        names[f"{prefix}input_layernorm.weight"] = ("attn_norm", i, (shape.hidden,))
        names[f"{prefix}post_attention_layernorm.weight"] = ("mlp_norm", i, (shape.hidden,))
    return names


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict, where: Path) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: long wavelengths slowed by `factor`, short ones kept, and a smooth
    blend between the two thresholds (`low_freq_factor`, `high_freq_factor` of the original context)."""
    try:
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = float(scaling["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as err:
        raise LorabenchError(f"{where}: rope_scaling of type llama3 lacks a number for {err}") from None
    wavelength = 2 * math.pi / inv_freq.double()
    blend = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: slow band, 1: kept band
    out = (1 - blend) * inv_freq.double() / factor + blend * inv_freq.double()
    return out.float()


def _rope(config: dict, shape: ModelShape, where: Path) -> torch.Tensor | None:
    scaling = config.get("rope_scaling")
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind == "default":
        return None
    if kind == "llama3":
        return llama3_frequencies(rope_frequencies(shape.head_dim, shape.rope_theta), scaling, where)
    raise LorabenchError(f"{where}: rope_scaling type {kind!r} is not supported (lorabench's decoder does plain "
                         "RoPE and Llama 3's scaling)")


def _window(config: dict, arch: str) -> int | None:
    """The attention window the model really uses, if any (Qwen2 only with use_sliding_window)."""
    window = config.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not config.get("use_sliding_window", False):
        return None
    return int(window) if isinstance(window, int) and window > 0 else None


def checkpoint_shape(folder: str | Path) -> tuple[ModelShape, dict]:
    """The shape of a checkpoint folder's model (its context capped by an attention window it uses)
    and its config, checked as far as the config goes: what can be known before reading weights."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise LorabenchError(f"checkpoint {folder}: no {CONFIG_FILE} (expected a Hugging Face model folder)")
    shape = shape_from_hf_config(folder)  # checks the architecture
    config = json.loads((folder / CONFIG_FILE).read_text())
    where = folder / CONFIG_FILE
    if config.get("hidden_act", "silu") != "silu":
        raise LorabenchError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (lorabench's MLP is SwiGLU)")
    _rope(config, shape, where)
    window = _window(config, config["architectures"][0])
    if window is not None and window < shape.max_context:
        shape = dataclasses.replace(shape, max_context=window)
    return shape, config


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Decoder:
    """The decoder of a Hugging Face checkpoint folder, its weights in `dtype` (default bf16 on CUDA,
    fp32 on CPU) on `device`."""
    folder = Path(folder)
    shape, config = checkpoint_shape(folder)
    rope_inv_freq = _rope(config, shape, folder / CONFIG_FILE)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorabenchError(f"checkpoint {folder}: no *.safetensors weights (other formats are not read)")
    device, dtype = torch.device(device), dtype or default_dtype(device)
    expected = checkpoint_names(shape)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (shape.tied_embeddings and name == "lm_head.weight"):
                        continue  # a buffer recomputed from the config; a tied head is the embedding
                    if name not in expected:
                        raise LorabenchError(f"{path}: tensor {name!r} has no place in a {shape.layers}-layer "
                                             f"{config['architectures'][0]} as lorabench models it")
                    if tuple(f.get_slice(name).get_shape()) != expected[name][2]:
                        raise LorabenchError(f"{path}: tensor {name!r} has shape {f.get_slice(name).get_shape()}, "
                                             f"config.json implies {list(expected[name][2])}")
                    tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except LorabenchError:
            raise
        except Exception as err:  # safetensors raises its own types for corrupt files
            raise LorabenchError(f"{path}: cannot read safetensors file ({err})") from None
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise LorabenchError(f"checkpoint {folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(shape.layers)]
    slots: dict[str, torch.Tensor] = {}
    for name, (slot, layer, _) in expected.items():
        if layer is None:
            slots[slot] = tensors[name]
        else:
            layers[layer][slot] = tensors[name]
    lm_head = slots["embed"] if shape.tied_embeddings else slots["lm_head"]
    return Decoder.from_weights(shape, slots["embed"], layers, slots["final_norm"], lm_head, rope_inv_freq)
