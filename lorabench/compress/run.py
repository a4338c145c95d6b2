"""Compress a whole adapter collection module by module, or add adapters to a compressed one.

Only one module's factors (all adapters) are in memory at a time; each module's result is written
as soon as it is fitted, into a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save
from tqdm import tqdm

from lorabench.adapters.collection import AdapterCollection, adapter_folders, hash_adapter
from lorabench.compress.collection import FORMAT, METADATA_FILE, MODULES_DIR, VERSION, CompressedCollection
from lorabench.compress.adapter_clusters import cluster_adapters
from lorabench.compress.fit import ModuleFit, resolve_weights
from lorabench.compress.module import CompressConfig, compress_module
from lorabench.compress.report import ERRORS_FILE, error_rows, summarize, summary_table, write_reports
from lorabench.errors import LorabenchError
from lorabench.outputs.results import atomic_dir

SCALING_NOTE = (
    "each adapter's LoRA scaling (lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA) is folded into its "
    "cores S_i: its delta is U_k S_i V_k^T; rebuilt factors B' = U_k S_i, A' = V_k^T have scaling 1"
)


def _weights(collection: AdapterCollection, weights: dict[str, float] | None) -> torch.Tensor | None:
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(collection.names))
    if unknown:
        raise LorabenchError(f"--weights: adapter {unknown[0]!r} is not in {collection.root}")
    bad = [name for name, w in weights.items()
           if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < math.inf]
    if bad:
        raise LorabenchError(f"--weights: weight of {bad[0]!r} must be a finite number >= 0, got {weights[bad[0]]!r}")
    return torch.tensor([float(weights.get(n, 1.0)) for n in collection.names], dtype=torch.float64)


def _save_module(folder: Path, name: str, U, V, S, cluster_of, dtype: torch.dtype) -> None:
    tensors = {
        "U": U.to(dtype).contiguous().cpu(),
        "V": V.to(dtype).contiguous().cpu(),
        "S": S.to(dtype).contiguous().cpu(),
        "cluster_of": cluster_of.to(torch.int64).contiguous().cpu(),
    }
    # save() and a plain write, not save_file: that one makes the file 0600 whatever the umask
    (folder / MODULES_DIR / f"{name}.safetensors").write_bytes(save(tensors))


def _sizes(params_gpu: int, params_uncompressed: int, element_size: int) -> dict:
    """Numbers and bytes of a compressed module (bases + cores) and of its source (every A and B)."""
    return {
        "params_gpu": params_gpu,
        "params_uncompressed": params_uncompressed,
        "bytes_gpu": params_gpu * element_size,
        "bytes_uncompressed": params_uncompressed * element_size,
    }


def _module_record(key, d_in, d_out, fit: ModuleFit, element_size: int, params_uncompressed: int, seconds: float) -> dict:
    return {
        "name": key.name,
        "d_in": d_in,
        "d_out": d_out,
        "clusters": fit.clusters,
        "rank": fit.rank,
        "mean_error": fit.mean_error,
        "max_error": fit.max_error,
        "iterations": fit.iterations,
        "seconds": seconds,
        **_sizes(fit.U.numel() + fit.V.numel() + fit.S.numel(), params_uncompressed, element_size),
    }


def compress_collection(
    collection: AdapterCollection,
    config: CompressConfig,
    out: str | Path,
    weights: dict[str, float] | None = None,
    memory_budget: float | None = None,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Compress every module of `collection` into the folder `out`; returns summary.json's content.

    memory_budget: GPU bytes for the whole compressed collection (used with clusters="auto"),
    shared among modules in proportion to d_in + d_out. dtype: stored dtype (default: the adapters').
    """
    start = time.perf_counter()
    dtype = dtype or collection.dtype
    element_size = torch.empty((), dtype=dtype).element_size()
    w = _weights(collection, weights)
    hashes = collection.hashes(progress)
    sizes = {k: sum(collection.shapes[k]) for k in collection.modules}
    assignment = None
    if config.cluster_by == "adapter":  # one group per adapter, from every module's evidence, before any module is fitted
        assignment = cluster_adapters(
            lambda key: collection.load_module(key, dtype=compute_dtype, device=device), collection.modules,
            config.rank, int(config.clusters), config.method,
            lambda stack: resolve_weights(stack.norms2(), w, config.normalize), tol=config.tol,
            max_iter=config.max_iter, max_rounds=config.max_rounds, seed=config.seed)
    records, frames = [], []
    with atomic_dir(out) as tmp:
        (tmp / MODULES_DIR).mkdir()
        # disable=None: tqdm draws bars only on a terminal, so a log gets no cursor codes
        bar = tqdm(collection.modules, desc="modules", unit="module", disable=not progress or None)
        for key in bar:
            t0 = time.perf_counter()
            d_in, d_out = collection.shapes[key]
            stack = collection.load_module(key, dtype=compute_dtype, device=device)
            max_bytes = None if memory_budget is None else int(memory_budget * sizes[key] / sum(sizes.values()))
            fit = compress_module(stack, config, w, max_bytes=max_bytes, element_size=element_size, assignment=assignment)
            _save_module(tmp, key.name, fit.U, fit.V, fit.S, fit.cluster_of, dtype)
            ranks = sum(r[key] for r in collection.ranks)
            records.append(
                _module_record(key, d_in, d_out, fit, element_size, ranks * (d_in + d_out),
                               time.perf_counter() - t0)
            )
            frames.append(error_rows(key, collection.names, fit))
            bar.set_postfix(mean_error=f"{records[-1]['mean_error']:.3f}")
        errors = pd.concat(frames, ignore_index=True)
        settings = {
            "method": config.method, "rank": config.rank, "clusters": config.clusters,
            "target_error": config.target_error, "normalize": config.normalize, "weighted": weights is not None,
            "memory_budget": memory_budget, "seed": config.seed, "tol": config.tol, "max_iter": config.max_iter,
            "dtype": str(dtype).removeprefix("torch."), "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "device": device,
        }
        if config.cluster_by != "module":  # named only when set: default outputs stay as they were
            settings["cluster_by"] = config.cluster_by
        metadata = {
            "format": FORMAT, "version": VERSION, **settings, "scaling": SCALING_NOTE,
            "source": str(collection.root),
            "target_modules": sorted({k.module for k in collection.modules}),
            "adapters": [
                {"name": a.name, "sha256": h, "r": a.config.r, "lora_alpha": a.config.lora_alpha,
                 "use_rslora": a.config.use_rslora, "base_model_name_or_path": a.config.base_model_name_or_path}
                for a, h in zip(collection.adapters, hashes)
            ],
            "modules": records,
        }
        summary = summarize(errors, records, time.perf_counter() - start, **settings)
        if config.clusters == "auto":
            summary["target_met"] = bool(all(m["mean_error"] <= config.target_error for m in records))
        metadata.update({k: summary[k] for k in ("mean_error", "max_error", "bytes_gpu", "bytes_uncompressed", "seconds")})
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
        write_reports(tmp, errors, summary)
    if progress:
        print(summary_table(errors, records, summary))
    return summary


def add_adapters(
    compressed: CompressedCollection,
    new_dir: str | Path,
    out: str | Path,
    progress: bool = True,
) -> dict:
    """Fit every adapter folder of `new_dir` onto `compressed`'s bases (no refitting of the bases) and
    write the enlarged compressed collection to `out`; returns its summary."""
    start = time.perf_counter()
    folders = adapter_folders(Path(new_dir))
    clash = sorted(set(compressed.adapter_names) & {f.name for f in folders})
    if clash:
        raise LorabenchError(f"adapter {Path(new_dir) / clash[0]}: a compressed adapter has the same name")
    fits = [compressed.fit_adapter(f)
            for f in tqdm(folders, desc="adapters", unit="adapter", disable=not progress or None)]
    meta = json.loads(json.dumps(compressed.metadata))
    dtype = getattr(torch, meta["dtype"])
    element_size = torch.empty((), dtype=dtype).element_size()
    errors = pd.read_csv(compressed.root / ERRORS_FILE)
    new_rows = []
    with atomic_dir(out) as tmp:
        (tmp / MODULES_DIR).mkdir()
        for record, key in zip(meta["modules"], compressed.modules):
            mod = compressed.module(key)
            S = torch.cat([mod.S, torch.stack([f.S[key].to(mod.S.dtype) for f in fits])])
            cluster_of = torch.cat([mod.cluster_of, torch.tensor([f.cluster[key] for f in fits])])
            _save_module(tmp, key.name, mod.U, mod.V, S, cluster_of, dtype)
            for f in fits:
                new_rows.append({"adapter": f.name, "layer": key.layer, "module": key.module, "cluster": f.cluster[key],
                                 "relative_error": f.errors[key] if f.norms2[key] > 0 else math.nan,
                                 "norm": f.norms2[key] ** 0.5})
            new_ranks = sum(f.ranks[key] for f in fits)
            record.update(_sizes(mod.U.numel() + mod.V.numel() + S.numel(),
                                 record["params_uncompressed"] + new_ranks * (record["d_in"] + record["d_out"]),
                                 element_size))
        errors = pd.concat([errors, pd.DataFrame(new_rows)], ignore_index=True)
        for record, key in zip(meta["modules"], compressed.modules):
            rows = errors[(errors["layer"] == key.layer) & (errors["module"] == key.module)]
            record["mean_error"], record["max_error"] = float(rows["relative_error"].mean()), float(rows["relative_error"].max())
        for folder, f in zip(folders, fits):
            meta["adapters"].append(
                {"name": f.name, "sha256": hash_adapter(folder), "r": f.config.r, "lora_alpha": f.config.lora_alpha,
                 "use_rslora": f.config.use_rslora, "base_model_name_or_path": f.config.base_model_name_or_path,
                 "fitted_onto_existing_bases": True}
            )
        settings = {k: meta[k] for k in ("method", "rank", "clusters", "dtype")}
        summary = summarize(errors, meta["modules"], time.perf_counter() - start, **settings, added=len(folders))
        meta.update({k: summary[k] for k in ("mean_error", "max_error", "bytes_gpu", "bytes_uncompressed")})
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        write_reports(tmp, errors, summary)
    if progress:
        print(summary_table(errors, meta["modules"], summary))
    return summary
