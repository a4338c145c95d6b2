"""Correctness on the device: every Triton kernel against the float64 reference, and the decoder
with its fast paths (bf16 Triton LoRA kernels, the paged-decode attention kernel, CUDA-graph decode)
against the fp32 PyTorch reference on the same tokens.

    python -m lorabench.kernelbench.correctness --out DIR [--model mistral-7b]

writes DIR/kernels-vs-float64.csv and DIR/decoder-vs-fp32.csv and exits 1 if a case fails. On the
CPU (a rehearsal) the kernels run under Triton's interpreter (TRITON_INTERPRET=1) in fp16 at a small
shape (bf16 tl.dot is wrong in the interpreter), and the decoder is the tiny preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import pandas as pd
import torch

from lorabench.errors import LorabenchError
from lorabench.outputs.results import write_csv_atomic

# name -> (M, d_in, d_out, r, N): small ragged shapes (several tiles and blocks, tokens without
# adapter, heterogeneous ranks) and the benchmark's own shape, whose block sizes the interpreter
# tests do not reach.
CHECK_SHAPES = {"small": (70, 130, 40, 12, 9), "bench": (256, 4096, 4096, 16, 64)}
# The rehearsal's shape: a few interpreted programs per kernel.
INTERPRETER_SHAPES = {"small": (21, 40, 24, 5, 4)}
# The decoder's fast path against its fp32 reference: bf16 rounding over two layers stays well
# inside this; a wrong kernel or a stale graph input is far outside it.
DECODER_TOLERANCE = {"cuda": 0.05, "cpu": 1e-4}


def device_check(
    device: str = "cuda", dtypes=(torch.bfloat16, torch.float16), shapes=CHECK_SHAPES, seed: int = 0
) -> pd.DataFrame:
    """Every Triton kernel against the float64 reference: one row per (op, dtype, shape)."""
    from lorabench.kernels import testing
    from lorabench.kernels.bgmv import bgmv_lora
    from lorabench.kernels.compressed import compressed_lora
    from lorabench.kernels.paged import paged_lora
    from lorabench.kernels.sgmv import sgmv_lora
    from lorabench.kernels.single import single_lora

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for dtype in dtypes:
        for shape, (m, d_in, d_out, r, n) in shapes.items():
            ids = testing.zipf_ids(m, n, 1.0, gen, p_none=0.1).tolist()
            ranks = [max(1, r - (i % 5)) for i in range(n)]  # heterogeneous
            problems = {
                "single": (single_lora, testing.single_problem(m, d_in, d_out, r, dtype, device, gen)),
                "sgmv": (sgmv_lora, testing.per_lora_problem(ids, n, d_in, d_out, r, dtype, device, gen)),
                "bgmv": (bgmv_lora, testing.per_lora_problem(ids, n, d_in, d_out, r, dtype, device, gen)),
                "paged": (paged_lora, testing.paged_problem(
                    ids, ranks, d_in, d_out, max(d_in, d_out), dtype, device, gen)),
                "compressed_full": (compressed_lora, testing.compressed_problem(
                    ids, n, 2, 64, False, d_in, d_out, dtype, device, gen)),
                "compressed_diag": (compressed_lora, testing.compressed_problem(
                    ids, n, 2, 128, True, d_in, d_out, dtype, device, gen)),
            }
            for op, (fn, p) in problems.items():
                extra = {} if p.batch is None else {"batch": p.batch}
                try:
                    got = fn(**p.fresh_y(), **extra)
                    err, failure = testing.max_error(got.cpu(), p.expected()), ""
                except Exception as exc:  # noqa: BLE001 - report every kernel's failure, not the first
                    err, failure = math.inf, str(exc)[:200]
                rows.append(dict(op=op, dtype=str(dtype).removeprefix("torch."), shape=shape, M=m, d_in=d_in,
                                 d_out=d_out, rank=r, N=n, error_vs_tolerance=err, ok=err <= 1.0, failure=failure))
    return pd.DataFrame(rows)


def decoder_check(model: str, device: str, layers: int = 2, steps: int = 6) -> pd.DataFrame:
    """Every strategy's engine (bf16 with the Triton kernels, paged-decode attention and CUDA-graph
    decode on a GPU) against an fp32 engine with the PyTorch ops and attention, on the same tokens:
    a prefill of mixed lengths and adapters, then decode steps. One row per (strategy, step)."""
    from lorabench.model.batch import SeqWork
    from lorabench.model.lora import lora_backend
    from lorabench.model.serving import STRATEGIES, ServingSetup, build_engine
    from lorabench.presets import model_preset

    shape = dataclasses.replace(model_preset(model), layers=layers)
    prompts = [37, 5, 120, 64, 1, 9]
    rows = []
    for strategy in STRATEGIES:
        fast_setup = ServingSetup(shape, strategy, ranks=(16, 8, 32, 16, 8, 16), modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                  device=device, kv_tokens=2048, slots=6, compressed_rank=64, cuda_graphs=True,
                                  max_context=512)
        ref_setup = dataclasses.replace(fast_setup, dtype=torch.float32, attention_backend="torch", cuda_graphs=False)
        fast, fast_res = build_engine(fast_setup)
        ref, ref_res = build_engine(ref_setup)
        gen = torch.Generator().manual_seed(0)
        tokens = [torch.randint(shape.vocab, (n,), generator=gen).tolist() for n in prompts]
        adapters = [i % 6 for i in range(len(prompts))]
        for step in range(steps):
            fb_f = fast.prepare([SeqWork(i, t, fast_res.index(a)) for i, (t, a) in enumerate(zip(tokens, adapters))])
            fb_r = ref.prepare([SeqWork(i, t, ref_res.index(a)) for i, (t, a) in enumerate(zip(tokens, adapters))])
            with lora_backend("torch"):
                ref_logits = ref.model.forward(fb_r, ref.kv, ref.lora, "torch")
            fast_logits = fast.model.forward(fb_f, fast.kv, fast.lora, fast.attention_backend).float()
            mode = fast.mode_of(fb_f)
            run_tokens = fast.run(fb_f)  # a graph replay for decode steps when one was captured
            ref_row = {seq: b for b, seq in enumerate(fb_r.order)}
            errs, agree, same = [], 0, 0
            for b, seq in enumerate(fb_f.order):
                r = ref_logits[ref_row[seq]]
                errs.append(float((fast_logits[b] - r).norm() / r.norm()))
                agree += int(fast_logits[b].argmax() == r.argmax())
                same += int(run_tokens[b] == fast_logits[b].argmax())
            rows.append(dict(strategy=strategy, step="prefill" if step == 0 else "decode", mode=mode,
                             max_rel_err=max(errs), argmax_agree=agree / len(errs), run_equals_eager=same / len(errs),
                             graph_note=fast.graphs.disabled_reason if fast.graphs else f"no graphs ({device})"))
            next_ref = ref_logits.argmax(-1).tolist()
            tokens = [[next_ref[ref_row[i]]] for i in range(len(prompts))]  # both continue on the reference's tokens
        del fast, ref, fast_res, ref_res
        if device == "cuda":
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    table["ok"] = (table.max_rel_err < DECODER_TOLERANCE["cuda" if device == "cuda" else "cpu"]) & (table.run_equals_eager == 1)
    return table


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m lorabench.kernelbench.correctness", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for kernels-vs-float64.csv and decoder-vs-fp32.csv")
    p.add_argument("--model", default="mistral-7b" if cuda else "tiny", help="decoder preset (2 of its layers)")
    args = p.parse_args(argv)
    from lorabench.kernels.common import interpreting

    if not cuda and not interpreting():
        raise LorabenchError("no CUDA GPU: run with TRITON_INTERPRET=1 to check the kernels under Triton's interpreter")
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    dtypes = (torch.bfloat16, torch.float16) if cuda else (torch.float16,)
    kernels = device_check(device, dtypes, CHECK_SHAPES if cuda else INTERPRETER_SHAPES)
    write_csv_atomic(args.out / "kernels-vs-float64.csv", kernels)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(kernels.to_string(index=False), flush=True)
    decoder = decoder_check(args.model, device)
    write_csv_atomic(args.out / "decoder-vs-fp32.csv", decoder)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(decoder.to_string(index=False))
    failed = (~kernels.ok).sum() + (~decoder.ok).sum()
    print(f"correctness: {len(kernels)} kernel cases, {len(decoder)} decoder steps; "
          + ("all passed" if not failed else f"{failed} FAILED"))
    return 0 if not failed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LorabenchError as err:
        print(f"correctness: error: {err}", file=sys.stderr)
        sys.exit(2)
