"""Hugging Face checkpoints into lorabench's decoder, against an independent float64 forward of the
same hand-written safetensors (tests/hf_reference.py): Llama, Qwen2 (q/k/v biases, tied embeddings),
Llama 3 RoPE scaling; and one clear error for each unusable checkpoint."""

import dataclasses

import pytest
import torch
from hf_reference import random_tensors, reference_logits, tiny_config, write_checkpoint
from safetensors.torch import save_file

from lorabench.errors import LorabenchError
from lorabench.model import BlockKVCache, Decoder, ForwardBatch, SeqWork
from lorabench.model.checkpoint import load_checkpoint
from lorabench.presets import model_preset


def all_logits(model, rows):
    """forward_all over a batch of rows: per row, its (L, vocab) logits."""
    kv = BlockKVCache(model.shape.layers, model.shape.kv_dim, 64, 16, model.dtype, model.device)
    fb = ForwardBatch.prepare(kv, [SeqWork(j, r) for j, r in enumerate(rows)], model.device)
    logits = model.forward_all(fb, kv)
    out = [None] * len(rows)
    for b, j in enumerate(fb.order):
        out[j] = logits[fb.cu_q[b]:fb.cu_q[b + 1]]
    return out


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@pytest.mark.parametrize("arch, overrides", [
    ("LlamaForCausalLM", {}),
    ("MistralForCausalLM", {"sliding_window": 64}),
    ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    ("Qwen2ForCausalLM", {}),
    ("LlamaForCausalLM", {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0}),
])
def test_checkpoint_matches_an_independent_float64_forward(tmp_path, arch, overrides):
    config = tiny_config(arch, **overrides)
    tensors = random_tensors(config, seed=len(overrides) + len(arch))
    if overrides.get("rope_scaling"):  # a buffer some checkpoints carry: recomputed, not read
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    write_checkpoint(tmp_path / "ckpt", config, tensors, shards=3)
    model = load_checkpoint(tmp_path / "ckpt", dtype=torch.float64)
    assert model.shape.qkv_bias == (arch == "Qwen2ForCausalLM")
    assert model.shape.tied_embeddings == config["tie_word_embeddings"]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(50, (n,), generator=g).tolist() for n in (23, 5, 40)]
    for row, got in zip(rows, all_logits(model, rows)):
        want = reference_logits(config, {k: v for k, v in tensors.items() if "rotary" not in k}, row)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_llama3_scaling_changes_the_low_frequencies_only(tmp_path):
    plain = tiny_config(rope_theta=500000.0)
    config = tiny_config(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    tensors = random_tensors(config)
    write_checkpoint(tmp_path / "a", plain, tensors)
    write_checkpoint(tmp_path / "b", config, tensors)
    base = load_checkpoint(tmp_path / "a", dtype=torch.float64)
    scaled = load_checkpoint(tmp_path / "b", dtype=torch.float64)
    assert base.rope_inv_freq is None
    freqs = 500000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # head_dim 8
    wavelength = 2 * torch.pi / freqs
    kept = wavelength < 16 / 4.0
    slowed = wavelength > 16 / 1.0
    torch.testing.assert_close(scaled.rope_inv_freq.double()[kept], freqs[kept], rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled.rope_inv_freq.double()[slowed], freqs[slowed] / 8, rtol=1e-6, atol=0)


def test_sliding_window_caps_the_context_and_bf16_weights_load(tmp_path):
    config = tiny_config("MistralForCausalLM", sliding_window=64)
    write_checkpoint(tmp_path / "m", config, random_tensors(config), dtype=torch.bfloat16)
    model = load_checkpoint(tmp_path / "m")
    assert model.shape.max_context == 64 and model.dtype == torch.float32
    qwen = tiny_config("Qwen2ForCausalLM", sliding_window=64, use_sliding_window=False)
    write_checkpoint(tmp_path / "q", qwen, random_tensors(qwen))
    assert load_checkpoint(tmp_path / "q").shape.max_context == 128


def test_random_decoder_with_biases_and_tied_head_matches_a_merged_reference():
    """The preset path (random weights) applies q/k/v biases and a tied head too; without them a
    shape's weights are those it always had."""
    tiny = model_preset("tiny")
    plain = Decoder(tiny, seed=3)
    shape = dataclasses.replace(tiny, name="tiny-qwen", qkv_bias=True, tied_embeddings=True)
    model = Decoder(shape, seed=3)
    assert torch.equal(model.layers[1]["down_proj"], plain.layers[1]["down_proj"])
    assert model.lm_head is model.embed and model.nbytes == plain.nbytes - plain.lm_head.nbytes + sum(
        model.layers[i][f"{m}.bias"].nbytes for i in range(2) for m in ("q_proj", "k_proj", "v_proj"))
    tensors = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.final_norm}
    for i, layer in enumerate(model.layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            block = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            tensors[f"model.layers.{i}.{block}.{m}.weight"] = layer[m]
            if f"{m}.bias" in layer:
                tensors[f"model.layers.{i}.{block}.{m}.bias"] = layer[f"{m}.bias"]
        tensors[f"model.layers.{i}.input_layernorm.weight"] = layer["attn_norm"]
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = layer["mlp_norm"]
    config = tiny_config("Qwen2ForCausalLM", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=176, vocab_size=256, rms_norm_eps=tiny.norm_eps, tie_word_embeddings=True)
    row = list(range(0, 200, 9))
    (got,) = all_logits(model, [row])
    torch.testing.assert_close(got.double(), reference_logits(config, tensors, row), rtol=1e-4, atol=1e-3)


def _bad(tmp_path, arch="LlamaForCausalLM", edit=None, config_edit=None):
    config = tiny_config(arch, **(config_edit or {}))
    tensors = random_tensors(tiny_config())
    if edit:
        edit(tensors)
    return write_checkpoint(tmp_path / "bad", config, tensors)


@pytest.mark.parametrize("case, words", [
    (dict(arch="GemmaForCausalLM"), "architecture 'GemmaForCausalLM' is not supported"),
    (dict(edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), "'model.layers.1.mlp.up_proj.weight' is missing"),
    (dict(edit=lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)})),
     "'model.layers.0.self_attn.o_proj.bias' has no place"),
    (dict(edit=lambda t: t.update({"model.norm.weight": torch.ones(31)})), "'model.norm.weight' has shape [31]"),
    (dict(config_edit={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling type 'yarn'"),
    (dict(config_edit={"hidden_act": "gelu"}), "hidden_act 'gelu'"),
])
def test_unusable_checkpoints_get_one_clear_error(tmp_path, case, words):
    folder = _bad(tmp_path, **case)
    with pytest.raises(LorabenchError, match=None) as err:
        load_checkpoint(folder)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_without_weights_or_with_a_corrupt_file(tmp_path):
    folder = tmp_path / "empty"
    write_checkpoint(folder, tiny_config(), {}, shards=0)
    with pytest.raises(LorabenchError, match=r"no \*\.safetensors"):
        load_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LorabenchError, match="cannot read safetensors"):
        load_checkpoint(folder)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LorabenchError, match="no config.json"):
        load_checkpoint(tmp_path)
