"""Read and write LoRA adapters in PEFT's on-disk format.

One folder per adapter:
    adapter_config.json         PEFT LoraConfig (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors   base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
with lora_A: (r, d_in) and lora_B: (d_out, r). Tensors are only memory-mapped here (safe_open);
reading a module's tensors is `read_module`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from lorabench.adapters.types import AdapterConfig, ModuleKey
from lorabench.errors import LorabenchError
from lorabench.outputs.results import atomic_dir
from lorabench.presets import ATTENTION_MODULES, MLP_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def peft_key(key: ModuleKey, which: str) -> str:
    """The safetensors key of a module's lora_A or lora_B weight (which: 'A' or 'B')."""
    return f"base_model.{key.hf_path.replace('model.', 'model.model.', 1)}.lora_{which}.weight"


def parse_peft_key(name: str) -> tuple[ModuleKey, str] | None:
    """(module, 'A' or 'B') of a PEFT LoRA key, None if the key is not one."""
    m = _KEY.fullmatch(name)
    if not m:
        return None
    module = m.group(3)
    block = "self_attn" if module in ATTENTION_MODULES else "mlp" if module in MLP_MODULES else None
    if block != m.group(2):
        return None
    return ModuleKey(int(m.group(1)), module), m.group(4)


def read_config(folder: Path) -> AdapterConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LorabenchError(f"adapter {folder}: missing {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorabenchError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(raw, dict):
        raise LorabenchError(f"{path}: expected a JSON object")
    raw = dict(raw)

    def take(field: str, kind: type | tuple[type, ...], required: bool = True, default=None):
        if field not in raw:
            if required:
                raise LorabenchError(f"{path}: missing field {field!r}")
            return default
        value = raw.pop(field)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise LorabenchError(f"{path}: field {field!r} = {value!r} has the wrong type")
        return value

    peft_type = take("peft_type", str, required=False, default="LORA")
    if peft_type != "LORA":
        raise LorabenchError(f"{path}: field 'peft_type' is {peft_type!r}; only 'LORA' adapters are supported")
    r = take("r", int)
    alpha = take("lora_alpha", (int, float))
    if r is None or r <= 0 or alpha is None:
        raise LorabenchError(f"{path}: field 'r' must be a positive integer and 'lora_alpha' a number")
    if not 0 < alpha < math.inf:  # 0 would silently zero the adapter, < 0 flip its sign
        raise LorabenchError(f"{path}: field 'lora_alpha' must be a number > 0, got {alpha!r}")
    targets = take("target_modules", (list, str), required=False)
    if isinstance(targets, str):  # a regex: the actual modules come from the weight keys
        raw["target_modules"] = targets
        targets = None
    for flag in ("use_dora", "fan_in_fan_out"):
        if raw.get(flag):
            raise LorabenchError(f"{path}: field {flag!r} = true is not supported")
    config = AdapterConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=tuple(targets) if targets is not None else (),
        use_rslora=bool(take("use_rslora", bool, required=False, default=False)),
        base_model_name_or_path=take("base_model_name_or_path", str, required=False),
        task_type=take("task_type", str, required=False, default="CAUSAL_LM"),
        rank_pattern=take("rank_pattern", dict, required=False) or {},
        alpha_pattern=take("alpha_pattern", dict, required=False) or {},
        extra=raw,
    )
    return config


def scan_adapter(folder: Path) -> tuple[AdapterConfig, dict[ModuleKey, tuple[int, int, int]], str]:
    """Config, {module: (rank, d_in, d_out)} and dtype name of one adapter, from headers only.

    Every key must be a LoRA A/B weight of a target module, with both halves present and shapes
    (rank, d_in) and (d_out, rank) where rank is the config's rank for that module.
    """
    config = read_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        other = ", ".join(p.name for p in folder.glob("adapter_model.*")) or "none"
        raise LorabenchError(f"adapter {folder}: missing {WEIGHTS_FILE} (found: {other})")
    shapes: dict[ModuleKey, dict[str, list[int]]] = {}
    dtypes = set()
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                parsed = parse_peft_key(name)
                if parsed is None:
                    raise LorabenchError(f"{path}: key {name!r} is not a LoRA weight of a supported module")
                key, which = parsed
                sl = f.get_slice(name)
                shapes.setdefault(key, {})[which] = list(sl.get_shape())
                dtypes.add(sl.get_dtype())
    except LorabenchError:
        raise
    except Exception as err:  # safetensors raises its own types for corrupt files
        raise LorabenchError(f"{path}: cannot read safetensors file ({err})") from None
    if not shapes:
        raise LorabenchError(f"{path}: holds no LoRA weights")
    if len(dtypes) > 1:
        raise LorabenchError(f"{path}: mixes tensor dtypes {sorted(dtypes)}")
    missing = sorted(set(config.target_modules) - {key.module for key in shapes})
    if missing:
        raise LorabenchError(f"{folder / CONFIG_FILE}: target_modules names {', '.join(map(repr, missing))}, but "
                             f"{path} holds no weights for {'it' if len(missing) == 1 else 'them'}")
    modules: dict[ModuleKey, tuple[int, int, int]] = {}
    for key in sorted(shapes):
        halves = shapes[key]
        for which in "AB":
            if which not in halves:
                raise LorabenchError(f"{path}: key {peft_key(key, which)!r} is missing (its other half is present)")
        (ra, d_in), (d_out, rb) = halves["A"], halves["B"]
        rank = config.rank(key)
        if ra != rank:
            raise LorabenchError(
                f"{path}: key {peft_key(key, 'A')!r} has shape {halves['A']}, expected ({rank}, d_in) for rank {rank}"
            )
        if rb != rank:
            raise LorabenchError(
                f"{path}: key {peft_key(key, 'B')!r} has shape {halves['B']}, expected (d_out, {rank}) for rank {rank}"
            )
        if config.target_modules and key.module not in config.target_modules:
            raise LorabenchError(
                f"{path}: key {peft_key(key, 'A')!r} is for module {key.module!r}, not in target_modules "
                f"{list(config.target_modules)} of {folder / CONFIG_FILE}"
            )
        modules[key] = (rank, d_in, d_out)
    return config, modules, dtypes.pop()


def read_module(folder: Path, key: ModuleKey) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one module of one adapter, read through a memory map (only these bytes are touched);
    one clear error if either holds NaN or Inf."""
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        return check_finite(folder, key, f.get_tensor(peft_key(key, "A")), f.get_tensor(peft_key(key, "B")))


def check_finite(folder: Path, key: ModuleKey, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) unchanged, or a LorabenchError naming the adapter, the key and how many values are not finite."""
    for which, tensor in (("A", A), ("B", B)):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise LorabenchError(f"adapter {folder}: key {peft_key(key, which)!r} holds {bad} of {tensor.numel()} "
                                 "values that are NaN or infinite")
    return A, B


def read_adapter(folder: str | Path) -> tuple[AdapterConfig, dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]]:
    """Config and every module's (A, B) of one adapter (validated as `scan_adapter` does)."""
    folder = Path(folder)
    config, modules, _ = scan_adapter(folder)
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        factors = {k: check_finite(folder, k, f.get_tensor(peft_key(k, "A")), f.get_tensor(peft_key(k, "B")))
                   for k in modules}
    return config, factors


def write_adapter(
    folder: str | Path,
    config: AdapterConfig,
    factors: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]],
) -> Path:
    """Write one adapter in PEFT's format (atomically): `factors` maps module -> (A (r, d_in), B (d_out, r))."""
    folder = Path(folder)
    tensors = {}
    for key in sorted(factors):
        A, B = factors[key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{key.name}: A {tuple(A.shape)} and B {tuple(B.shape)} are not LoRA factors")
        tensors[peft_key(key, "A")] = A.detach().contiguous().cpu()
        tensors[peft_key(key, "B")] = B.detach().contiguous().cpu()
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
        # save() and a plain write, not save_file: that one makes the file 0600 whatever the umask
        (tmp / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
    return folder
