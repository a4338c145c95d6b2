"""Device check of the measured executor (issue 5), one script, under 8 minutes on an H200.

    python scripts/gpu_measured.py [--out results/h200] [--requests 600] [--deadline-s 440]

1. Correctness: every strategy at mistral-7b shapes with 2 layers, bf16 with the Triton kernels,
   the paged-decode kernel and CUDA-graph decode, against fp32 with the PyTorch reference ops and
   attention, on the same tokens (prefill of mixed lengths, then decode steps).
2. A short profile of mistral-7b (every strategy, rank 16), written to results/profiles/ too.
3. The zipf workload at n-loras 1024, 64 and 1 (in that order), every strategy, measured and modeled
   (with the fresh profile) on the same request stream; fidelity and throughput vs single.
Phases past --deadline-s are skipped (and say so). Without CUDA it runs the same steps with the
tiny preset and small counts (a smoke test), writing under results/cpu-smoke/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.fidelity.profile import run_profile
from lorabench.fidelity.validate import fidelity
from lorabench.model.batch import SeqWork
from lorabench.model.lora import lora_backend
from lorabench.model.serving import STRATEGIES, ServingSetup, build_engine
from lorabench.outputs.results import write_json_atomic
from lorabench.presets import device_name, model_preset

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def correctness(model: str, device: str, layers: int = 2) -> pd.DataFrame:
    shape = dataclasses.replace(model_preset(model), layers=layers)
    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    prompts = [37, 5, 120, 64, 1, 9]
    rows = []
    for strategy in STRATEGIES:
        fast_setup = ServingSetup(shape, strategy, ranks=(16, 8, 32, 16, 8, 16), modules=modules, device=device,
                                  kv_tokens=2048, slots=6, compressed_rank=64, cuda_graphs=True, max_context=512)
        ref_setup = dataclasses.replace(fast_setup, dtype=torch.float32, attention_backend="torch", cuda_graphs=False)
        fast, fast_res = build_engine(fast_setup)
        ref, ref_res = build_engine(ref_setup)
        gen = torch.Generator().manual_seed(0)
        tokens = [torch.randint(shape.vocab, (n,), generator=gen).tolist() for n in prompts]
        adapters = [i % 6 for i in range(len(prompts))]
        for step in range(6):
            seqs_f = [SeqWork(i, t, fast_res.index(a)) for i, (t, a) in enumerate(zip(tokens, adapters))]
            seqs_r = [SeqWork(i, t, ref_res.index(a)) for i, (t, a) in enumerate(zip(tokens, adapters))]
            fb_f, fb_r = fast.prepare(seqs_f), ref.prepare(seqs_r)
            with lora_backend("torch"):
                ref_logits = ref.model.forward(fb_r, ref.kv, ref.lora, "torch")
            eager_logits = fast.model.forward(fb_f, fast.kv, fast.lora, fast.attention_backend).float()
            mode = fast.mode_of(fb_f)
            run_tokens = fast.run(fb_f)  # a graph replay for decode steps when one was captured
            order_f, order_r = fb_f.order, fb_r.order
            ref_by_seq = {order_r[b]: ref_logits[b] for b in range(len(order_r))}
            errs, agree, graph_same = [], 0, 0
            for b, i in enumerate(order_f):
                r = ref_by_seq[i]
                errs.append(float((eager_logits[b] - r).norm() / r.norm()))
                agree += int(eager_logits[b].argmax() == r.argmax())
                graph_same += int(run_tokens[b] == eager_logits[b].argmax())
            rows.append(dict(strategy=strategy, step="prefill" if step == 0 else "decode", mode=mode,
                             max_rel_err=max(errs), argmax_agree=agree / len(errs), run_equals_eager=graph_same / len(errs),
                             graph_note=fast.graphs.disabled_reason if fast.graphs else "no graphs (not CUDA)"))
            next_ref = ref_logits.argmax(-1).tolist()
            tokens = [[next_ref[order_r.index(i)]] for i in range(len(prompts))]  # both continue on the reference's tokens
        del fast, ref, fast_res, ref_res
        if device == "cuda":
            torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def runs(model: str, modeled_device: str, profile: Path, out: Path, n_values, requests: int, rate: float,
         deadline: float) -> pd.DataFrame:
    tables = []
    for n in n_values:
        if time.time() - T0 > deadline:
            log(f"deadline reached: skipping n_loras={n}")
            continue
        # Both executors take the profile's device figures: the same memory plan and batches.
        base = RunConfig(workload="zipf", n_loras=n, requests=requests, rate=rate, model=model, device=modeled_device,
                         seed=0, profile=str(profile))
        log(f"measured run, n_loras={n}, {requests} requests at {rate:g}/s")
        measured = run_experiment(dataclasses.replace(base, executor="measured"), out / f"zipf-{n}-measured", progress=False)
        modeled = run_experiment(dataclasses.replace(base, executor="modeled"),
                                 out / f"zipf-{n}-modeled", progress=False)
        t = fidelity(measured, modeled)
        t.insert(0, "n_loras", n)
        t["vs_single_measured"] = measured["throughput_vs_single"].values
        t["vs_single_modeled"] = modeled["throughput_vs_single"].values
        t["device_measured"] = measured["device"].values
        tables.append(t)
        log("\n" + t[["n_loras", "strategy", "status", "tok/s measured", "vs_single_measured", "tok/s error",
                      "TTFT mean ms error", "TPOT mean ms error", "device_measured"]].to_string(index=False))
    return pd.concat(tables) if tables else pd.DataFrame()


def write_notes(path: Path, command: str, meta: dict, check: pd.DataFrame, table: pd.DataFrame, ok: bool) -> None:
    """What ran, where and when, and the figures the issue asks for, as text to commit beside them."""
    lines = [f"# Device check of the measured executor ({meta['device']}, {meta['date']})", "",
             f"Command: `python {command}`; torch {meta['torch']}; model {meta['model']} ({meta['dtype']}); "
             f"profile steps by mode {meta['modes']}.", "",
             f"Correctness (bf16 Triton + graphs vs fp32 PyTorch): {'ok' if ok else 'FAILED'}", "",
             "```", check.to_string(index=False), "```", ""]
    if len(table):
        cols = ["n_loras", "strategy", "status", "tok/s measured", "vs_single_measured", "vs_single_modeled",
                "tok/s error", "TTFT mean ms error", "TPOT mean ms error", "device_measured"]
        lines += ["Throughput relative to single, and modeled-vs-measured errors (modeled / measured - 1):", "",
                  "```", table[cols].to_string(index=False), "```", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/h200" if cuda else "results/cpu-smoke"))
    # Wall time follows the served time: about 20 ms per step and, whatever the request count, a
    # tail of ~1,000 decode steps for the longest outputs; 600 requests at 100/s keep 12 measured
    # runs near 4.5 minutes with batches full while requests arrive.
    p.add_argument("--requests", type=int, default=600 if cuda else 12)
    p.add_argument("--rate", type=float, default=100.0, help="arrivals per second (enough to fill batches)")
    p.add_argument("--deadline-s", type=float, default=440.0, help="skip the runs not started by then")
    args = p.parse_args()
    model = "mistral-7b" if cuda else "tiny"
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"device check on {device_name(torch.device(device))}, torch {torch.__version__}, out {args.out}")

    check = correctness(model, device)
    write_json_atomic(args.out / "correctness.json", {"rows": check.to_dict("records")})
    log("correctness (bf16 Triton vs fp32 reference):\n" + check.to_string(index=False))
    ok = bool((check["max_rel_err"] < (0.05 if cuda else 1e-4)).all() and (check["run_equals_eager"] == 1).all())

    log("profile")
    data = run_profile(model, list(STRATEGIES), [16], 1024, ("q_proj", "k_proj", "v_proj", "o_proj"), 64,
                       "full" if cuda else "quick", 3, device, cuda_graphs=True, progress=False)
    name = data["meta"]["device"]
    profile = args.out / f"profile-{name}-{model}.json"
    write_json_atomic(profile, data)
    if cuda:
        write_json_atomic(Path("results/profiles") / f"{name}-{model}.json", data)
    log(f"profile: modes {data['meta']['modes']}, fit {pd.DataFrame(data['meta']['fit']).T.to_string()}")

    modeled_device = name if name in ("h200", "h100", "a100", "l40s") else "h200"
    table = runs(model, modeled_device, profile, args.out, (1024, 64, 1), args.requests, args.rate, args.deadline_s)
    if len(table):
        table.to_csv(args.out / "fidelity.csv", index=False)
    write_notes(args.out / "NOTES.md", " ".join(sys.argv), data["meta"], check, table, ok)
    log(f"done; correctness {'ok' if ok else 'FAILED'}; results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
