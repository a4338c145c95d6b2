"""Write the small trace samples shipped in workloads/traces/ (seeded: rerunning rewrites the same bytes).

    python scripts/make_trace_samples.py [--out workloads/traces]

One sample per public format that lorabench replays (lorabench/traces.py), a few hundred rows each,
with the shapes of the real traces but made up here (no real trace data is copied):

- azure_code_2023.csv, azure_conv_2024.csv: the Azure LLM inference traces' columns TIMESTAMP
  (date-times with 7 decimals, 100 ns ticks), ContextTokens, GeneratedTokens; code completion has
  long contexts and short outputs, conversation medium contexts and longer outputs; bursty arrivals.
- burstgpt.csv: BurstGPT's columns; whole-second timestamps, two models (ChatGPT, GPT-4) and two log
  types; a few failed requests with 0 response tokens, as BurstGPT records them.
- mooncake.jsonl: Mooncake's timestamp (ms), input_length, output_length and hash_ids (one id per
  512-token block; requests on the same document share their leading block ids, as prefix reuse).

Prompts stay within 8,000 tokens so the samples replay with the default --max-num-batched-tokens
(8192) without chunked prefill; real traces go longer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

ROWS = 300
MOONCAKE_BLOCK = 512
TICKS_PER_S = 10_000_000  # Azure's TIMESTAMP has 7 decimals: 100 ns ticks


def _lognormal(rng, n, median, sigma, lo, hi) -> np.ndarray:
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), lo, hi).astype(np.int64)


def _bursty_gaps(rng, n, rate, shape) -> np.ndarray:
    """Gamma gaps of mean 1/rate; shape < 1 is burstier than Poisson."""
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def azure(seed: int, start: str, rate: float, context: tuple, generated: tuple) -> pd.DataFrame:
    """An Azure-format trace: `context`, `generated` are (median, sigma, lo, hi) of lognormal lengths.
    Column seconds holds each row's true offset from the first row (not written to the file)."""
    rng = np.random.default_rng(seed)
    gaps = _bursty_gaps(rng, ROWS, rate, 0.4)
    ticks = np.concatenate([[0], np.cumsum(np.rint(gaps[1:] * TICKS_PER_S).astype(np.int64))])
    t0 = pd.Timestamp(start)
    stamps = [(t0 + pd.Timedelta(int(k) * 100, "ns")) for k in ticks]
    text = [s.strftime("%Y-%m-%d %H:%M:%S.") + f"{(s.microsecond * 10 + s.nanosecond // 100):07d}" for s in stamps]
    return pd.DataFrame({
        "TIMESTAMP": text,
        "ContextTokens": _lognormal(rng, ROWS, *context),
        "GeneratedTokens": _lognormal(rng, ROWS, *generated),
        "seconds": ticks / TICKS_PER_S,
    })


def burstgpt(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.floor(np.cumsum(_bursty_gaps(rng, ROWS, 0.5, 0.3)) + 5).astype(np.int64)
    model = np.where(rng.random(ROWS) < 0.8, "ChatGPT", "GPT-4")
    request = _lognormal(rng, ROWS, 400, 1.1, 1, 7900)
    response = _lognormal(rng, ROWS, 250, 0.9, 1, 2000)
    response[rng.random(ROWS) < 0.03] = 0  # failed requests
    log = np.where(rng.random(ROWS) < 0.6, "Conversation log", "API log")
    return pd.DataFrame({"Timestamp": t, "Model": model, "Request tokens": request, "Response tokens": response,
                         "Total tokens": request + response, "Log Type": log})


def mooncake(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    t = np.rint(np.cumsum(_bursty_gaps(rng, ROWS, 2.0, 0.5)) * 1e3).astype(np.int64)
    t -= t[0]
    inputs = _lognormal(rng, ROWS, 4000, 0.6, 64, 8000)
    outputs = _lognormal(rng, ROWS, 180, 0.7, 1, 1024)
    docs = rng.zipf(1.5, size=ROWS) % 60  # a few documents are read again and again
    shared = {d: int(rng.integers(2, 10)) for d in np.unique(docs)}  # leading blocks each document shares
    doc_base = {d: 10_000 * (k + 1) for k, d in enumerate(sorted(shared))}
    next_id = 0
    rows = []
    for i in range(ROWS):
        blocks = -(-int(inputs[i]) // MOONCAKE_BLOCK)
        prefix = min(blocks, shared[docs[i]])
        own = list(range(next_id, next_id + blocks - prefix))
        next_id += blocks - prefix
        ids = [doc_base[docs[i]] + b for b in range(prefix)] + own
        rows.append({"timestamp": int(t[i]), "input_length": int(inputs[i]), "output_length": int(outputs[i]),
                     "hash_ids": ids})
    return rows


def samples() -> dict[str, pd.DataFrame | list[dict]]:
    """Every sample by file name, with its true values (Azure's `seconds` column is not written)."""
    return {
        # (median, sigma, min, max) of ContextTokens and GeneratedTokens
        "azure_code_2023.csv": azure(2023, "2023-11-16 18:15:46.6805900", 5.0, (1500, 1.0, 3, 7900),
                                     (13, 1.2, 1, 900)),
        "azure_conv_2024.csv": azure(2024, "2024-05-10 00:00:00.0135432", 4.0, (1020, 1.0, 2, 7900),
                                     (129, 0.9, 1, 2000)),
        "burstgpt.csv": burstgpt(7),
        "mooncake.jsonl": mooncake(11),
    }


def render(data: pd.DataFrame | list[dict]) -> str:
    """The file text of one sample."""
    if isinstance(data, list):
        return "".join(json.dumps(row) + "\n" for row in data)
    return data.drop(columns=["seconds"], errors="ignore").to_csv(index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "workloads" / "traces")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in samples().items():
        (args.out / name).write_text(render(data))
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
