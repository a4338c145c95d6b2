"""The quality study: what joint compression keeps of trained adapters' behaviour, on a CPU in minutes.

    python benchmarks/quality.py [--work WORK] [--out results/quality]

1. Pretrain a tiny Llama-shaped model (hidden 64, 2 layers, GQA 4/2 heads, SwiGLU 128, 64 tokens) on
   a synthetic language (benchmarks/quality_tasks.py) and save it as a Hugging Face checkpoint.
2. Train 48 rank-8 LoRA adapters (all linear modules, alpha 16) on 48 tasks in 4 groups: each task
   is its group's rule plus two exceptions of its own. Written with lorabench's adapter writer.
3. Compress them over a grid (full and diagonal shared bases at several ranks, clusters per module
   and per whole adapter, per-adapter SVD) with `lorabench compress`.
4. `lorabench eval` every version on held-out rows of each task, with the checkpoint as base.
5. Write WORK's eval to OUT: table.md (kept loss and accuracy improvement per method, and the
   agreement of the found clusters with the planted groups), summary.csv, eval.csv, clusters.csv,
   kept_improvement.png, study.json (settings, timings, machine, date).

Everything is seeded; steps whose output is in WORK already are skipped (delete WORK to redo them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_tasks import VOCAB, Language, make_tasks, sample  # noqa: E402
from quality_train import ATTN, MLP, TinyLlama, new_adapters, pretrain, token_loss, train_adapters  # noqa: E402

from lorabench.adapters import AdapterConfig, ModuleKey, write_adapter  # noqa: E402
from lorabench.cli import main as lorabench  # noqa: E402
from lorabench.compress import adjusted_rand_index  # noqa: E402
from lorabench.outputs.results import atomic_dir, write_text_atomic  # noqa: E402
from lorabench.quality.report import per_adapter_kept  # noqa: E402

SETTINGS = dict(
    seed=0, groups=4, per_group=12, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
    pretrain_steps=600, pretrain_batch=16, pretrain_lr=3e-3, length=48,
    rank=8, alpha=16, adapter_steps=300, adapter_batch=2, adapter_lr=3e-3, eval_rows=16,
)
# version name -> `lorabench compress` arguments
GRID = {
    "full-r8": ["--rank", "8"],
    "full-r16": ["--rank", "16"],
    "full-r32": ["--rank", "32"],
    "full-r16-k4-module": ["--rank", "16", "--clusters", "4"],
    "full-r16-k4-adapter": ["--rank", "16", "--clusters", "4", "--cluster-by", "adapter"],
    "diagonal-r16": ["--rank", "16", "--method", "diagonal"],
    "diagonal-r32": ["--rank", "32", "--method", "diagonal"],
    "svd-r2": ["--rank", "2", "--method", "svd"],
    "svd-r4": ["--rank", "4", "--method", "svd"],
}
MODULES = ATTN + MLP


@contextlib.contextmanager
def step(title: str, log: dict):
    """Time a stage into log[title] (seconds)."""
    print(f"== {title}", flush=True)
    start = time.perf_counter()
    yield
    log[title] = round(time.perf_counter() - start, 1)


def build_base(work: Path, s: dict, language: Language) -> tuple[TinyLlama, float]:
    model = TinyLlama(VOCAB, s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["intermediate"], seed=s["seed"])
    rng = np.random.default_rng([s["seed"], 10])
    b = s["pretrain_batch"]
    pool = torch.from_numpy(sample(language, None, s["pretrain_steps"] * b, s["length"], rng))  # drawn at once: fast
    losses = pretrain(model, lambda step: pool[None, step * b:(step + 1) * b], s["pretrain_steps"], s["pretrain_lr"],
                      lambda r: tqdm(r, desc="pretrain"))
    model.save_hf(work / "base")
    return model, float(np.mean(losses[-50:]))


def build_adapters(work: Path, s: dict, model: TinyLlama, language: Language, tasks) -> float:
    rng = np.random.default_rng([s["seed"], 11])
    lora = new_adapters(model, len(tasks), s["rank"], MODULES, seed=s["seed"] + 1)
    scale = s["alpha"] / s["rank"]
    b = s["adapter_batch"]
    pool = torch.from_numpy(np.stack([sample(language, t, s["adapter_steps"] * b, s["length"], rng) for t in tasks]))
    losses = train_adapters(model, lora, scale, lambda step: pool[:, step * b:(step + 1) * b], s["adapter_steps"],
                            s["adapter_lr"], lambda r: tqdm(r, desc="adapters"))
    config = AdapterConfig(r=s["rank"], lora_alpha=s["alpha"], target_modules=MODULES,
                           base_model_name_or_path=str(work / "base"))
    with atomic_dir(work / "adapters") as tmp:
        for j, task in enumerate(tasks):
            factors = {ModuleKey(i, m): (A[j].detach(), B[j].detach()) for (i, m), (A, B) in lora.items()}
            write_adapter(tmp / task.name, config, factors)
    return float(np.mean(losses[-50:]))


def reload_base(work: Path, s: dict) -> TinyLlama:
    """The pretrained model back from its checkpoint (read with safetensors, not lorabench)."""
    from safetensors.torch import load_file

    model = TinyLlama(VOCAB, s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["intermediate"], seed=0)
    t = load_file(str(work / "base" / "model.safetensors"))
    for name, param in model.hf_tensors().items():
        param.data = t[name]
    return model


def base_loss_here(work: Path, s: dict) -> float:
    """The base model's mean token loss on the eval rows, computed by the training code."""
    rows = [json.loads(line)["tokens"] for line in (work / "data.jsonl").read_text().splitlines()]
    with torch.no_grad():
        tokens = torch.tensor(rows)[None]
        return float(token_loss(reload_base(work, s)(tokens), tokens))


def write_data(work: Path, s: dict, language: Language, tasks) -> None:
    rng = np.random.default_rng([s["seed"], 12])  # held out: a stream the training never drew from
    lines = []
    for task in tasks:
        for row in sample(language, task, s["eval_rows"], s["length"], rng):
            lines.append(json.dumps({"adapter": task.name, "tokens": row.tolist()}))
    write_text_atomic(work / "data.jsonl", "\n".join(lines) + "\n")


def cluster_agreement(work: Path, tasks) -> pd.DataFrame:
    """ARI of every clustered version's groups with the planted ones: per module and overall."""
    planted = {t.name: t.group for t in tasks}
    rows = []
    for name in GRID:
        if "-k" not in name:
            continue
        errors = pd.read_csv(work / "compressed" / name / "errors.csv")
        per_module = [adjusted_rand_index([planted[a] for a in g["adapter"]], g["cluster"].tolist())
                      for _, g in errors.groupby(["layer", "module"])]
        rows.append({"version": name, "modules": len(per_module), "ari_mean": float(np.mean(per_module)),
                     "ari_min": float(np.min(per_module)), "ari_max": float(np.max(per_module))})
    return pd.DataFrame(rows)


def markdown_table(summary: pd.DataFrame, errors: dict) -> str:
    lines = ["| version | mean relative error | loss | KL vs original | top-1 agreement | accuracy | kept loss improvement "
             "| kept accuracy improvement |", "|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        err = "" if r["version"] in ("base", "original") else f"{errors[r['version']]:.3f}"
        lines.append(f"| {r['version']} | {err} | {r['loss']:.4f} | {r['kl_vs_original']:.4f} | {r['top1_agreement']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['kept_loss_improvement']:.1%} | {r['kept_accuracy_improvement']:.1%} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("results/quality-work"), help="intermediate files (kept)")
    parser.add_argument("--out", type=Path, default=Path("results/quality"), help="where the table and chart go")
    parser.add_argument("--seed", type=int, default=SETTINGS["seed"], help="seed of the language, tasks, models and data")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny ops: on a shared 2-core machine one thread ran 6x faster than two
    s, timings = {**SETTINGS, "seed": args.seed}, {}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    language = Language.make(s["seed"])
    tasks = make_tasks(s["seed"], s["groups"], s["per_group"])
    model, notes = None, json.loads((work / "notes.json").read_text()) if (work / "notes.json").exists() else {}
    if not (work / "base").exists():
        with step("pretrain", timings):
            model, notes["pretrain_final_loss"] = build_base(work, s, language)
    if not (work / "adapters").exists():
        with step("adapters", timings):
            model = model or reload_base(work, s)
            notes["adapters_final_loss"] = build_adapters(work, s, model, language, tasks)
    if not (work / "data.jsonl").exists():
        write_data(work, s, language, tasks)
    todo = [name for name in GRID if not (work / "compressed" / name).exists()]
    if todo:
        with step("compress", timings):
            for name in todo:
                code = lorabench(["compress", str(work / "adapters"), "--out", str(work / "compressed" / name),
                                  "--quiet", "--seed", str(s["seed"]), *GRID[name]])
                assert code == 0, name
    if not (work / "eval").exists():
        with step("eval", timings):
            code = lorabench(["eval", "--adapters", str(work / "adapters"), "--base", str(work / "base"), "--data",
                              str(work / "data.jsonl"), "--out", str(work / "eval"), "--device", "cpu",
                              "--compressed", *[str(work / "compressed" / n) for n in GRID]])
            assert code == 0
    notes["timings_s"] = {**notes.get("timings_s", {}), **timings}  # a stage skipped this time keeps its time
    write_text_atomic(work / "notes.json", json.dumps(notes, indent=1) + "\n")
    summary = pd.read_csv(work / "eval" / "summary.csv")
    table = pd.read_csv(work / "eval" / "eval.csv")
    errors = {n: json.loads((work / "compressed" / n / "summary.json").read_text())["mean_error"] for n in GRID}
    clusters = cluster_agreement(work, tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(args.out / "summary.csv", index=False, float_format="%.6g")
    table.to_csv(args.out / "eval.csv", index=False, float_format="%.6g")
    clusters.to_csv(args.out / "clusters.csv", index=False, float_format="%.4f")
    per_adapter_kept(table).to_csv(args.out / "kept_per_adapter.csv", index=False, float_format="%.6g")
    shutil.copy(work / "eval" / "charts" / "kept_improvement.png", args.out / "kept_improvement.png")
    text = markdown_table(summary, errors) + "\n\nAgreement of the clusters with the planted groups (adjusted Rand index):\n\n"
    text += "| version | per module: mean | min | max |\n|---|---|---|---|\n"
    text += "\n".join(f"| {r.version} | {r.ari_mean:.3f} | {r.ari_min:.3f} | {r.ari_max:.3f} |" for r in clusters.itertuples())
    (args.out / "table.md").write_text(text + "\n")
    study = {"command": " ".join(["python benchmarks/quality.py", *sys.argv[1:]]), "settings": s, "grid": GRID,
             "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), **notes,
             "base_loss_eval": float(summary.set_index("version").loc["base", "loss"]),
             "base_loss_training_code": base_loss_here(work, s)}
    # lorabench's decoder, loading the checkpoint, must compute what the training code computes.
    assert abs(study["base_loss_eval"] - study["base_loss_training_code"]) < 1e-4, study
    (args.out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    minutes = sum(study["timings_s"].values()) / 60
    (args.out / "README.md").write_text(
        f"# Quality study: what joint compression keeps of trained adapters' behaviour\n\n"
        f"Made by `{study['command']}` on {study['date']} ({study['machine']}; one thread) in {minutes:.1f} min "
        f"(stages, seconds: {study['timings_s']}). See README.md, section \"The quality study\", and "
        f"benchmarks/quality.py for what it does. Files: table.md (this table), summary.csv (per version), eval.csv "
        f"(per adapter and version), kept_per_adapter.csv, clusters.csv, study.json (settings), kept_improvement.png.\n\n"
        f"{text}\n\n![kept improvement against reconstruction error](kept_improvement.png)\n")
    print(text)
    print(json.dumps({k: study[k] for k in ("timings_s", "date")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
