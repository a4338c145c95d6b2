"""Check that PEFT itself loads adapters written by lorabench, with the same weights and scaling.

    python -m pip install -e ".[peft-check]"
    lorabench adapters synth --n 4 --model tiny --rank 4,12 --out /tmp/col
    python scripts/check_peft_loads.py /tmp/col/adapter_0000 [more adapter folders ...]

Each folder is loaded by `PeftModel.from_pretrained` onto a randomly initialised transformers Llama
of the `tiny` preset's shape (nothing is downloaded); the script asserts that PEFT's A, B and
scaling equal what `lorabench.adapters.read_adapter` reads, and that PEFT's LoRA forward equals
W x + s B A x on random inputs. Not part of the test suite: PEFT and transformers are optional.
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from lorabench.adapters import read_adapter
from lorabench.presets import model_preset


def check(folder: str) -> float:
    shape = model_preset("tiny")
    config = LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
    )
    model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), folder).eval()
    adapter_config, factors = read_adapter(folder)
    worst = 0.0
    for key, (A, B) in factors.items():
        layer = model.base_model.model.model.layers[key.layer]
        module = getattr(layer.self_attn if key.module in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp,
                         key.module)
        scale = module.scaling["default"]
        assert torch.equal(module.lora_A["default"].weight, A), f"{folder}: {key} lora_A differs"
        assert torch.equal(module.lora_B["default"].weight, B), f"{folder}: {key} lora_B differs"
        assert abs(scale - adapter_config.scaling(key)) < 1e-12, f"{folder}: {key} scaling differs"
        x = torch.randn(3, A.shape[1])
        want = module.base_layer(x) + scale * (x @ A.T @ B.T)
        worst = max(worst, float((module(x) - want).abs().max()))
    return worst


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for folder in sys.argv[1:]:
        print(f"{folder}: PEFT loads it; max |PEFT forward - W x - s B A x| = {check(folder):.3g}")
