"""Real adapter collections into the model's host layouts.

`peft_adapters(folder, shape, modules, n)`: the first n adapters of a PEFT collection (the adapters
helper's `load_collection`) as `AdapterWeights`, scaling folded into B, per-layer ranks padded to
the adapter's largest with zero rows (the product is unchanged).
`compressed_weights(folder, shape, modules, n)`: a collection written by `lorabench compress`, its
per-(layer, module) bases, S_i and clusters stacked over layers (clusters padded to the largest K).
`stacked_adapter(shape, factors, scalings)`: one adapter's per-(layer, module) factors as
`AdapterWeights` (the layout `peft_adapters` builds), layers it does not adapt left at zero.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorabench.errors import LorabenchError
from lorabench.presets import ModelShape

from .adapters import AdapterWeights, CompressedWeights


def _check_modules(source: str, have: set, shape: ModelShape, modules) -> None:
    want = {(layer, m) for layer in range(shape.layers) for m in modules}
    missing = sorted(want - have)
    if missing:
        layer, m = missing[0]
        raise LorabenchError(f"{source}: no weights for layers.{layer}.{m} ({len(missing)} module(s) missing); "
                             f"the run targets {', '.join(modules)} of {shape.layers} layers")


def peft_adapters(folder, shape: ModelShape, modules, n: int) -> list[AdapterWeights]:
    from lorabench.adapters import ModuleKey, load_collection
    from lorabench.adapters.peft import read_module

    coll = load_collection(folder)
    if len(coll) < n:
        raise LorabenchError(f"--adapters {folder}: holds {len(coll)} adapters, the run asks for {n} (--n-loras)")
    _check_modules(f"--adapters {folder}", {(k.layer, k.module) for k in coll.shapes}, shape, modules)
    for k, (d_in, d_out) in coll.shapes.items():
        if k.module in modules and (d_in, d_out) != shape.module_shape(k.module):
            raise LorabenchError(f"--adapters {folder}: {k.name} is {d_in}x{d_out}, model {shape.name} has "
                                 f"{shape.module_shape(k.module)}")
    out = []
    for i in range(n):
        adapter = coll.adapters[i]
        keys = [ModuleKey(layer, m) for m in modules for layer in range(shape.layers)]
        factors = {key: read_module(Path(adapter.folder), key) for key in keys}
        out.append(stacked_adapter(shape, factors, {key: adapter.config.scaling(key) for key in keys}))
    return out


def stacked_adapter(shape: ModelShape, factors: dict, scalings: dict | None = None) -> AdapterWeights:
    """`factors` {ModuleKey: (A (r, d_in), B (d_out, r))} of one adapter as AdapterWeights: per module
    A (layers, rank, d_in) and B (layers, d_out, rank) in float32, B times its scaling (default 1),
    rank the adapter's largest (smaller ranks and layers without factors padded with zeros)."""
    rank = max(a.shape[0] for a, _ in factors.values())
    weights = {}
    for m in dict.fromkeys(key.module for key in factors):  # modules in the order given
        d_in, d_out = shape.module_shape(m)
        A, B = torch.zeros(shape.layers, rank, d_in), torch.zeros(shape.layers, d_out, rank)
        for key, (a, b) in factors.items():
            if key.module == m:
                A[key.layer, : a.shape[0]] = a.float()
                B[key.layer, :, : b.shape[1]] = b.float() * (1.0 if scalings is None else scalings[key])
        weights[m] = (A, B)
    return AdapterWeights(rank, 1.0, weights)


def compressed_weights(folder, shape: ModelShape, modules, n: int) -> CompressedWeights:
    from lorabench.adapters import ModuleKey
    from lorabench.compress.collection import CompressedCollection

    coll = CompressedCollection.load(folder)
    if len(coll) != n:
        raise LorabenchError(f"--compressed {folder}: holds {len(coll)} adapters, the run asks for {n} (--n-loras)")
    _check_modules(f"--compressed {folder}", {(k.layer, k.module) for k in coll.modules}, shape, modules)
    R = coll.rank
    out = {}
    for m in modules:
        per_layer = [coll.module(ModuleKey(layer, m)) for layer in range(shape.layers)]
        K = max(c.U.shape[0] for c in per_layer)
        d_in, d_out = shape.module_shape(m)
        U, V = torch.zeros(shape.layers, K, d_out, R), torch.zeros(shape.layers, K, d_in, R)
        for layer, c in enumerate(per_layer):
            if c.U.shape[1:] != (d_out, R) or c.V.shape[1:] != (d_in, R):
                raise LorabenchError(f"--compressed {folder}: layers.{layer}.{m} has U {tuple(c.U.shape)}, "
                                     f"V {tuple(c.V.shape)}; model {shape.name} needs (K, {d_out}, {R}), (K, {d_in}, {R})")
            U[layer, : c.U.shape[0]], V[layer, : c.V.shape[0]] = c.U.float(), c.V.float()
        S = torch.stack([c.S.float() for c in per_layer])
        cluster_of = torch.stack([c.cluster_of.long() for c in per_layer])
        out[m] = (U, V, S, cluster_of)
    return CompressedWeights(R, out)
