"""Model presets against the public checkpoints, and Hugging Face config.json reading."""

import json

import pytest

from lorabench.errors import LorabenchError
from lorabench.presets import MODELS, model_preset, shape_from_hf_config

# Parameter counts of the checkpoints' safetensors files as their Hugging Face pages list them.
PUBLISHED_PARAMS = {
    "llama-7b": 6_738_415_616,  # meta-llama/Llama-2-7b-hf
    "llama-13b": 13_015_864_320,  # meta-llama/Llama-2-13b-hf
    "mistral-7b": 7_241_732_096,  # mistralai/Mistral-7B-v0.1
    "llama-3.1-8b": 8_030_261_248,  # meta-llama/Llama-3.1-8B
    "llama-3.1-70b": 70_553_706_496,  # meta-llama/Llama-3.1-70B
    "qwen2.5-7b": 7_615_616_512,  # Qwen/Qwen2.5-7B
    "qwen2.5-72b": 72_706_203_648,  # Qwen/Qwen2.5-72B
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_the_checkpoints(name):
    assert MODELS[name].params == PUBLISHED_PARAMS[name]


def qwen_config(**overrides) -> dict:
    # Qwen/Qwen2.5-0.5B's config.json (a checkpoint that ties its embeddings)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "vocab_size": 151936, "torch_dtype": "bfloat16",
    }
    return {**config, **overrides}


def test_a_qwen2_config_gives_biases_tied_embeddings_and_its_parameter_count(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(qwen_config()))
    shape = shape_from_hf_config(path)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (896, 24, 14, 2, 64)
    assert shape.qkv_bias and shape.tied_embeddings and shape.max_context == 32768
    # Qwen/Qwen2.5-0.5B lists 494,032,768 parameters
    assert shape.params == 494_032_768
    assert model_preset(str(tmp_path)).params == shape.params  # the checkpoint folder works too


def test_a_llama_config_read_from_json_equals_the_preset(tmp_path):
    preset = MODELS["llama-3.1-8b"]
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "vocab_size": 128256, "attention_bias": False, "head_dim": 128,
    }))
    shape = model_preset(str(path))
    assert shape.name == str(path)
    fields = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "rope_theta", "norm_eps", "qkv_bias",
              "tied_embeddings", "max_context", "params")
    assert {f: getattr(shape, f) for f in fields} == {f: getattr(preset, f) for f in fields}


@pytest.mark.parametrize("config, words", [
    (qwen_config(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported"),
    ({k: v for k, v in qwen_config().items() if k != "architectures"}, "architecture None is not supported"),
    ({k: v for k, v in qwen_config().items() if k != "hidden_size"}, "field hidden_size is missing"),
    (qwen_config(num_hidden_layers="24"), "field num_hidden_layers must be a positive int"),
    (qwen_config(tie_word_embeddings="yes"), "field tie_word_embeddings must be true or false"),
    (qwen_config(head_dim=128), "head_dim 128 differs"),
    (qwen_config(num_key_value_heads=3), "do not divide"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_configs_get_one_clear_error(tmp_path, config, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(LorabenchError, match=words.replace("(", r"\(").replace(")", r"\)")):
        model_preset(str(path))


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(LorabenchError, match="unknown model 'gpt-9'"):
        model_preset("gpt-9")
    with pytest.raises(LorabenchError, match="no such file"):
        model_preset(str(tmp_path / "none" / "config.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LorabenchError, match="not readable JSON"):
        model_preset(str(tmp_path / "bad.json"))


def test_run_takes_a_config_json_as_model(tmp_path, capsys):
    from lorabench.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(qwen_config()))
    code = main(["run", "--model", str(path), "--workload", "zipf", "--n-loras", "8", "--requests", "40",
                 "--strategy", "per-lora", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    summary = (tmp_path / "run" / "summary.csv").read_text()
    assert str(path) in summary
