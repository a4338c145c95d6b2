"""A collection of adapters of one base model, read lazily: one module across all adapters at a time.

A 1,000-adapter Mistral-7B collection is tens of GB; `load_collection` reads only headers and
configs, and `AdapterCollection.load_module` memory-maps each adapter's file for the two tensors
of the module asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lorabench.adapters import peft
from lorabench.adapters.types import Adapter, LoraStack, ModuleKey
from lorabench.errors import LorabenchError
from lorabench.presets import model_preset

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class AdapterCollection:
    """Adapters that all adapt the same modules of one base shape.

    shapes: module -> (d_in, d_out);  ranks: adapter index -> module -> rank.
    """

    root: Path
    adapters: list[Adapter]
    shapes: dict[ModuleKey, tuple[int, int]]
    ranks: list[dict[ModuleKey, int]]
    dtype: torch.dtype
    _hashes: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def modules(self) -> list[ModuleKey]:
        return sorted(self.shapes)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def scalings(self, key: ModuleKey) -> list[float]:
        return [a.config.scaling(key) for a in self.adapters]

    def load_module(
        self,
        key: ModuleKey,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        indices: list[int] | None = None,
    ) -> LoraStack:
        """Every adapter's (A, scaling * B) on one module, stacked (each file memory-mapped in turn)."""
        indices = range(len(self)) if indices is None else indices
        As, Bs, scales = [], [], []
        for i in indices:
            folder = Path(self.adapters[i].folder)
            try:
                A, B = peft.read_module(folder, key)
            except LorabenchError:
                raise
            except Exception as err:
                raise LorabenchError(f"adapter {folder}: cannot read module {key.name} ({err})") from None
            As.append(A)
            Bs.append(B)
            scales.append(self.adapters[i].config.scaling(key))
        return LoraStack.from_factors(As, Bs, scales, dtype=dtype, device=device)

    def uncompressed_params(self) -> int:
        """Numbers in all A and B of all adapters."""
        return sum(r * sum(self.shapes[k]) for ranks in self.ranks for k, r in ranks.items())

    def hashes(self, progress: bool = False) -> list[str]:
        """sha256 of each adapter's config and weights files (identifies the compressed sources)."""
        if self._hashes is None:
            # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
            bar = tqdm(self.adapters, desc="hashing", unit="adapter", disable=not progress or None)
            self._hashes = [hash_adapter(Path(a.folder)) for a in bar]
        return self._hashes


def hash_adapter(folder: Path) -> str:
    h = hashlib.sha256()
    for name in (peft.CONFIG_FILE, peft.WEIGHTS_FILE):
        try:
            with open(folder / name, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        except OSError as err:
            raise LorabenchError(f"adapter {folder}: cannot read {name} ({err.strerror})") from None
    return h.hexdigest()


def adapter_folders(root: Path) -> list[Path]:
    """The adapter folders of a collection directory: its non-hidden subfolders, sorted by name."""
    if not root.is_dir():
        raise LorabenchError(f"adapter collection {root}: not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise LorabenchError(f"adapter collection {root}: holds no adapter folders")
    return folders


def load_collection(root: str | Path, model: str | None = None) -> AdapterCollection:
    """Open a directory of PEFT adapters (one subfolder each), checking that they fit together.

    All adapters must adapt the same modules with the same (d_in, d_out); with `model` given, the
    shapes must also be that model preset's. Only headers and configs are read here.
    """
    root = Path(root)
    preset = model_preset(model) if model is not None else None
    adapters: list[Adapter] = []
    ranks: list[dict[ModuleKey, int]] = []
    shapes: dict[ModuleKey, tuple[int, int]] = {}
    first: Path | None = None
    dtype = None
    for folder in adapter_folders(root):
        config, modules, dtype_name = peft.scan_adapter(folder)
        if first is None:
            first, dtype = folder, _DTYPES.get(dtype_name, torch.float32)
            shapes = {k: (d_in, d_out) for k, (_, d_in, d_out) in modules.items()}
            if preset is not None:
                for k, (d_in, d_out) in shapes.items():
                    if preset.module_shape(k.module) != (d_in, d_out) or k.layer >= preset.layers:
                        raise LorabenchError(
                            f"adapter {folder}: key {peft.peft_key(k, 'A')!r} is for a ({d_out} x {d_in}) module, "
                            f"but model {preset.name} has {preset.module_shape(k.module)[::-1]} "
                            f"and {preset.layers} layers"
                        )
        else:
            missing = sorted(set(shapes) - set(modules))
            extra = sorted(set(modules) - set(shapes))
            if missing or extra:
                k, what = (missing[0], "lacks") if missing else (extra[0], "has")
                raise LorabenchError(
                    f"adapter {folder}: {what} key {peft.peft_key(k, 'A')!r} (target modules differ from "
                    f"adapter {first}: {len(missing)} modules missing, {len(extra)} extra)"
                )
            for k, (_, d_in, d_out) in modules.items():
                if shapes[k] != (d_in, d_out):
                    raise LorabenchError(
                        f"adapter {folder}: key {peft.peft_key(k, 'A')!r} is for a ({d_out} x {d_in}) module, "
                        f"but adapter {first} has ({shapes[k][1]} x {shapes[k][0]}): different base shapes"
                    )
        adapters.append(Adapter(folder.name, str(folder), config))
        ranks.append({k: r for k, (r, _, _) in modules.items()})
    return AdapterCollection(root, adapters, shapes, ranks, dtype)
