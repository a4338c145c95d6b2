"""What an adapter, and each compressed version of it, does to a base model's predictions.

For every adapter and its rows of text, the base model is run alone (`base`), with the adapter
(`original`) and with each compressed version (named after its folder). Per version: the mean
next-token cross entropy over every predicted token (natural log), the share of tokens predicted
right (`accuracy`, top-1), and, against the original adapter at the same positions, the mean KL
divergence KL(original || version) of the next-token distributions and the share of positions where
both pick the same top token (`top1_agreement`).

Rows run in batches of about `batch_tokens` tokens through lorabench's decoder (all positions'
logits, `Decoder.forward_all`); each batch runs every version while the original's log-probabilities
are at hand, so nothing vocabulary-sized is kept between batches. Every version's delta is applied
as one LoRA adapter (`SingleLora`): the original's factors with their scaling, a compressed
version's rebuilt factors B' = U_k S_i, A' = V_k^T.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm import tqdm

from lorabench.adapters.collection import AdapterCollection
from lorabench.adapters.peft import read_adapter
from lorabench.compress.collection import CompressedCollection
from lorabench.compress.report import ERRORS_FILE
from lorabench.errors import LorabenchError
from lorabench.model.adapters import AdapterWeights
from lorabench.model.batch import ForwardBatch, SeqWork
from lorabench.model.collections import stacked_adapter
from lorabench.model.decoder import Decoder
from lorabench.model.kv_cache import BlockKVCache
from lorabench.model.lora import SingleLora
from lorabench.presets import ModelShape

COLUMNS = ("adapter", "version", "tokens", "loss", "kl_vs_original", "top1_agreement", "accuracy", "relative_error")
BLOCK = 16  # KV-cache block size, tokens


@dataclass(frozen=True)
class Version:
    """One way to run an adapter: `weights(name)` gives its delta (None: the base model alone);
    `errors` the compression's relative reconstruction error per adapter (empty if not compressed)."""

    name: str
    weights: Callable[[str], AdapterWeights | None]
    errors: dict[str, float]


def original_version(collection: AdapterCollection, shape: ModelShape) -> Version:
    folders = {a.name: Path(a.folder) for a in collection.adapters}

    def weights(name: str) -> AdapterWeights:
        config, factors = read_adapter(folders[name])
        return stacked_adapter(shape, factors, {key: config.scaling(key) for key in factors})
    return Version("original", weights, {})


def compressed_version(folder: str | Path, collection: AdapterCollection, shape: ModelShape) -> Version:
    """A compressed collection of (some of) `collection`'s adapters, checked to be made from the same files."""
    compressed = CompressedCollection.load(folder)
    sources = {a["name"]: a.get("sha256") for a in compressed.metadata["adapters"]}
    for name, digest in zip(collection.names, collection.hashes()):
        if name not in sources:
            raise LorabenchError(f"--compressed {folder}: holds no adapter {name!r} of {collection.root}")
        if sources[name] != digest:
            raise LorabenchError(f"--compressed {folder}: adapter {name!r} was compressed from other files than "
                                 f"{collection.root / name} (sha256 differs)")
    errors = pd.read_csv(Path(folder) / ERRORS_FILE).groupby("adapter")["relative_error"].mean().to_dict()

    @functools.cache  # read once, when first needed: each adapter's factors need every module
    def modules() -> dict:
        return {key: compressed.module(key) for key in compressed.modules}

    def weights(name: str) -> AdapterWeights:
        return stacked_adapter(shape, compressed.factors(name, modules()))
    return Version(Path(folder).name, weights, errors)


@dataclass
class _Sums:
    tokens: int = 0
    loss: float = 0.0
    correct: int = 0
    kl: float = 0.0
    agree: int = 0


def _batches(rows: list[list[int]], batch_tokens: int) -> list[list[list[int]]]:
    """Rows in file order, grouped so a batch holds at most batch_tokens tokens (or one longer row)."""
    batches, current, size = [], [], 0
    for row in rows:
        if current and size + len(row) > batch_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(row)
        size += len(row)
    return batches + ([current] if current else [])


def _blocks(batch: list[list[int]]) -> int:
    return sum(-(-len(row) // BLOCK) for row in batch)


class _Runner:
    """Runs batches of rows through the decoder: log-probabilities at every predicted position."""

    def __init__(self, model: Decoder, max_blocks: int):
        s = model.shape
        self.model = model
        self.kv = BlockKVCache(s.layers, s.kv_dim, max_blocks, BLOCK, model.dtype, model.device)

    def log_probs(self, batch: list[list[int]], lora: SingleLora | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities (P, vocab) float32, targets (P,)) over every row's predicted positions."""
        fb = ForwardBatch.prepare(self.kv, [SeqWork(j, row) for j, row in enumerate(batch)], self.model.device)
        try:
            logits = self.model.forward_all(fb, self.kv, lora)
        finally:
            for j in range(len(batch)):
                self.kv.release(j)
        ordered = [batch[j] for j in fb.order]
        # Position t of a row predicts its token t + 1: all rows but each one's last.
        keep = torch.cat([torch.arange(start, start + len(row) - 1) for start, row in zip(fb.cu_q, ordered)])
        targets = torch.tensor([t for row in ordered for t in row[1:]], device=logits.device)
        return torch.log_softmax(logits[keep.to(logits.device)].float(), dim=-1), targets


def evaluate(model: Decoder, rows: dict[str, list[list[int]]], versions: list[Version], batch_tokens: int = 4096,
             progress: bool = True) -> pd.DataFrame:
    """One row per adapter and version (`base`, then `versions` in order): the COLUMNS. An adapter
    without rows gets rows with tokens 0 and empty metrics."""
    batches = {name: _batches(seqs, batch_tokens) for name, seqs in rows.items()}
    max_blocks = max((_blocks(b) for bs in batches.values() for b in bs), default=1)
    runner = _Runner(model, max_blocks)
    total = sum(len(row) - 1 for seqs in rows.values() for row in seqs) * (len(versions) + 1)
    bar = tqdm(total=total, desc="eval", unit="tok", disable=not progress)
    records = []
    names = ["base"] + [v.name for v in versions]
    for adapter, adapter_batches in batches.items():
        states = {"base": None}
        for v in versions if adapter_batches else ():  # no rows: nothing to run, nothing to load
            states[v.name] = SingleLora(v.weights(adapter), model.device, model.dtype)
        sums = {name: _Sums() for name in names}
        for batch in adapter_batches:
            ref_logp, targets = runner.log_probs(batch, states["original"])
            ref_top = ref_logp.argmax(-1)
            ref_p = ref_logp.exp()
            for name in names:
                logp = ref_logp if name == "original" else runner.log_probs(batch, states[name])[0]
                top = logp.argmax(-1)
                s = sums[name]
                s.tokens += targets.numel()
                s.loss -= float(logp.gather(1, targets[:, None]).double().sum())
                s.correct += int((top == targets).sum())
                if name != "original":
                    s.kl += float((ref_p * (ref_logp - logp)).sum(-1).double().sum())
                    s.agree += int((top == ref_top).sum())
                else:
                    s.agree += targets.numel()
                bar.update(targets.numel())
        for name in names:
            s = sums[name]
            n = s.tokens or math.nan
            errors = next((v.errors for v in versions if v.name == name), {})
            records.append({
                "adapter": adapter, "version": name, "tokens": s.tokens, "loss": s.loss / n,
                "kl_vs_original": s.kl / n, "top1_agreement": s.agree / n, "accuracy": s.correct / n,
                "relative_error": errors.get(adapter, math.nan),
            })
    bar.close()
    return pd.DataFrame(records, columns=list(COLUMNS))
