"""PEFT adapter folders: bit-exact round trip, lazy per-module stacks, scaling, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabench.adapters import AdapterConfig, ModuleKey, load_collection, read_adapter, write_adapter
from lorabench.adapters.peft import parse_peft_key, peft_key
from lorabench.adapters.synth import SynthSpec, write_synth_collection
from lorabench.errors import LorabenchError


@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory):
    spec = SynthSpec(n=4, ranks=(2, 4), clusters=2, layers=1, modules=("q_proj", "k_proj", "down_proj"), seed=3)
    return write_synth_collection(spec, tmp_path_factory.mktemp("c") / "coll", progress=False)


def test_keys_are_peft_keys():
    key = ModuleKey(3, "q_proj")
    assert peft_key(key, "A") == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert peft_key(ModuleKey(0, "gate_proj"), "B") == "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"
    assert parse_peft_key(peft_key(key, "B")) == (key, "B")
    assert parse_peft_key("base_model.model.model.layers.3.mlp.q_proj.lora_A.weight") is None  # wrong block


def test_scaling_follows_peft():
    c = AdapterConfig(r=16, lora_alpha=32, target_modules=("q_proj",))
    assert c.scaling(ModuleKey(0, "q_proj")) == 2.0
    rs = AdapterConfig(r=16, lora_alpha=32, target_modules=("q_proj",), use_rslora=True)
    assert rs.scaling(ModuleKey(0, "q_proj")) == 8.0
    pattern = AdapterConfig(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 4},
                            alpha_pattern={"layers.1.self_attn.v_proj": 2})
    assert pattern.rank(ModuleKey(0, "v_proj")) == 4 and pattern.scaling(ModuleKey(0, "v_proj")) == 8.0
    assert pattern.scaling(ModuleKey(1, "v_proj")) == 0.5 and pattern.rank(ModuleKey(0, "q_proj")) == 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    spec = SynthSpec(n=2, ranks=(3, 5), layers=2, modules=("q_proj", "v_proj", "up_proj"), rslora=True, dtype=dtype)
    src = write_synth_collection(spec, tmp_path / "src", progress=False)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        config, factors = read_adapter(folder)
        out = write_adapter(tmp_path / "copy" / folder.name, config, factors)
        assert json.loads((out / "adapter_config.json").read_text()) == json.loads((folder / "adapter_config.json").read_text())
        a, b = load_file(folder / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        assert (out / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_written_config_has_what_peft_needs(collection_dir):
    raw = json.loads((collection_dir / "adapter_0000" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["bias"] == "none"
    for field in ("r", "lora_alpha", "target_modules", "use_rslora", "base_model_name_or_path"):
        assert field in raw


def test_load_module_stacks_scaled_factors_of_mixed_ranks(collection_dir):
    coll = load_collection(collection_dir, model="tiny")
    assert len(coll) == 4 and {r for per in coll.ranks for r in per.values()} <= {2, 4}
    key = ModuleKey(0, "down_proj")
    stack = coll.load_module(key, dtype=torch.float64)
    assert stack.A.shape == (4, 4, 176) and stack.Bt.shape == (4, 4, 64)
    for i, adapter in enumerate(coll.adapters):
        config, factors = read_adapter(adapter.folder)
        A, B = factors[key]
        delta = config.scaling(key) * B.double() @ A.double()
        assert torch.allclose(stack.Bt[i].T @ stack.A[i], delta, atol=1e-12)
        assert stack.norms2()[i] == pytest.approx(float((delta**2).sum()), rel=1e-10)


def test_tensors_are_read_only_when_a_module_is_loaded(tmp_path, collection_dir):
    """load_collection reads headers; tensor bytes are read by load_module (memory-mapped), so a
    file rewritten in between is seen, and one removed in between is named in the error."""
    root = tmp_path / "coll"
    shutil.copytree(collection_dir, root)
    coll = load_collection(root)
    path = root / "adapter_0002" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: torch.full_like(t, 3.0) for k, t in tensors.items()}, path)
    key = ModuleKey(0, "q_proj")
    assert (coll.load_module(key).A[2, : coll.ranks[2][key]] == 3.0).all()
    path.unlink()
    with pytest.raises(LorabenchError, match=r"adapter .*adapter_0002: cannot read module layers\.0\.q_proj"):
        coll.load_module(key)


def _break(root, how):
    """Damage adapter_0001 of a copied collection in one way; return the message expected."""
    folder = root / "adapter_0001"
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    tensors = load_file(weights_path)
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "missing config":
        config_path.unlink()
        return r"adapter_0001: missing adapter_config\.json"
    if how == "missing weights":
        weights_path.rename(folder / "adapter_model.bin")
        return r"adapter_0001: missing adapter_model\.safetensors \(found: adapter_model\.bin\)"
    if how == "malformed json":
        config_path.write_text("{ 'r': 4,")
        return r"adapter_0001/adapter_config\.json: malformed JSON"
    if how == "missing field":
        raw = json.loads(config_path.read_text())
        del raw["lora_alpha"]
        config_path.write_text(json.dumps(raw))
        return r"adapter_0001/adapter_config\.json: missing field 'lora_alpha'"
    if how == "not lora":
        raw = json.loads(config_path.read_text())
        raw["peft_type"] = "IA3"
        config_path.write_text(json.dumps(raw))
        return r"adapter_0001/adapter_config\.json: field 'peft_type' is 'IA3'"
    if how == "bad shape":
        tensors[q_a] = tensors[q_a][:, :-1].contiguous()
        save_file(tensors, weights_path)
        return rf"adapter .*adapter_0001: key '{q_a}' is for a \(64 x 63\) module, but adapter .*adapter_0000 has \(64 x 64\): different base shapes"
    if how == "wrong rank":
        tensors[q_a] = tensors[q_a][:-1].contiguous()
        save_file(tensors, weights_path)
        return rf"adapter_0001/adapter_model\.safetensors: key '{q_a}' has shape \[\d+, 64\], expected"
    if how == "missing half":
        del tensors[q_a.replace("lora_A", "lora_B")]
        save_file(tensors, weights_path)
        return r"adapter_0001/adapter_model\.safetensors: key '.*q_proj\.lora_B\.weight' is missing"
    if how == "unknown key":
        tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
        save_file(tensors, weights_path)
        return r"adapter_0001/adapter_model\.safetensors: key 'base_model\.model\.lm_head\.weight' is not a LoRA weight"
    if how == "different targets":
        for k in [k for k in tensors if ".k_proj." in k]:
            del tensors[k]
        save_file(tensors, weights_path)
        raw = json.loads(config_path.read_text())
        raw["target_modules"] = [m for m in raw["target_modules"] if m != "k_proj"]
        config_path.write_text(json.dumps(raw))
        return r"adapter_0001: lacks key '.*k_proj\.lora_A\.weight' \(target modules differ from adapter .*adapter_0000"
    if how == "not a target":
        raw = json.loads(config_path.read_text())
        raw["target_modules"] = ["q_proj", "down_proj"]
        config_path.write_text(json.dumps(raw))
        return r"adapter_0001/adapter_model\.safetensors: key '.*k_proj\.lora_A\.weight' is for module 'k_proj', not in target_modules"
    raise AssertionError(how)


CASES = ["missing config", "missing weights", "malformed json", "missing field", "not lora", "bad shape",
         "wrong rank", "missing half", "unknown key", "different targets", "not a target"]


@pytest.mark.parametrize("how", CASES)
def test_malformed_collections_get_clear_errors(tmp_path, collection_dir, how):
    root = tmp_path / "coll"
    shutil.copytree(collection_dir, root)
    expected = _break(root, how)
    with pytest.raises(LorabenchError, match=expected):
        load_collection(root)


def test_shapes_checked_against_a_model_and_empty_collections(tmp_path, collection_dir):
    with pytest.raises(LorabenchError, match=r"adapter_0000: key '.*' is for a .* but model llama-7b has"):
        load_collection(collection_dir, model="llama-7b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorabenchError, match="holds no adapter folders"):
        load_collection(tmp_path / "empty")
    with pytest.raises(LorabenchError, match="not a directory"):
        load_collection(tmp_path / "nowhere")
