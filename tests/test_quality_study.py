"""The quality study's pieces (benchmarks/quality_*.py): its training model, saved as a Hugging Face
checkpoint with adapters written by lorabench's writer, gives what `lorabench eval` computes with
lorabench's decoder; its tasks are seeded and share their group's rule."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality_tasks import VOCAB, Language, make_tasks, sample  # noqa: E402
from quality_train import ATTN, MLP, TinyLlama, new_adapters, token_loss  # noqa: E402

from lorabench.adapters import AdapterConfig, ModuleKey, write_adapter  # noqa: E402
from lorabench.cli import main  # noqa: E402


def test_trainer_and_lorabench_eval_agree_on_base_and_adapted_losses(tmp_path):
    model = TinyLlama(VOCAB, 32, 2, 4, 2, 48, seed=3)
    model.save_hf(tmp_path / "base")
    lora = new_adapters(model, 2, 4, ATTN + MLP, seed=5)
    g = torch.Generator().manual_seed(6)
    for _, B in lora.values():  # a trained adapter's B is not zero
        B.data = torch.randn(B.shape, generator=g) * 0.3
    config = AdapterConfig(r=4, lora_alpha=8, target_modules=ATTN + MLP)
    for j in range(2):
        write_adapter(tmp_path / "adapters" / f"a{j}", config,
                      {ModuleKey(i, m): (A[j].detach(), B[j].detach()) for (i, m), (A, B) in lora.items()})
    tokens = torch.from_numpy(sample(Language.make(0), None, 6, 20, np.random.default_rng(1))).view(2, 3, 20)
    rows = [{"adapter": f"a{j}", "tokens": tokens[j, b].tolist()} for j in range(2) for b in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--adapters", str(tmp_path / "adapters"), "--base", str(tmp_path / "base"), "--data",
                 str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    got = pd.read_csv(tmp_path / "o" / "eval.csv").set_index(["adapter", "version"])["loss"]
    with torch.no_grad():
        for j in range(2):
            base = float(token_loss(model(tokens[j:j + 1]), tokens[j:j + 1]))
            adapted = token_loss(model(tokens, lora, scale=2.0)[j], tokens[j])
            assert abs(got[(f"a{j}", "base")] - base) < 1e-5
            assert abs(got[(f"a{j}", "original")] - float(adapted)) < 1e-5
            assert abs(base - float(adapted)) > 1e-2


def test_tasks_share_their_group_rule_and_are_seeded():
    tasks = make_tasks(0, groups=3, per_group=4, exceptions=2)
    assert [t.group for t in tasks] == [g for g in range(3) for _ in range(4)]
    for a in tasks:  # two tasks of a group differ at most in their 2 + 2 exceptions
        for b in tasks:
            if a.group == b.group:
                assert (a.class_map == b.class_map).sum() >= 8 - 2 * 2
    again = make_tasks(0, groups=3, per_group=4, exceptions=2)
    assert all((a.class_map == b.class_map).all() for a, b in zip(tasks, again))
    lang = Language.make(0)
    x, y = (sample(lang, tasks[0], 5, 30, np.random.default_rng(7)) for _ in range(2))
    assert (x == y).all() and x.min() >= 0 and x.max() < VOCAB
    # The task's rule shows in its data: most next classes are the mapped ones.
    follows = (tasks[0].class_map[x[:, :-1] // 8] == x[:, 1:] // 8).mean()
    assert follows > 0.7
