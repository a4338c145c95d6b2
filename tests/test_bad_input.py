"""Bad input gets one clear line and exit status 2, never a traceback or a silently wrong result.

One table: (case, command line, expected exit status, words the one-line message must hold). Every
command runs in this process (`lorabench.cli.main`), on small inputs written once per module.
"""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabench.adapters.synth import SynthSpec, write_synth_collection
from lorabench.cli import main

TRACE_HEADER = "arrival_s,adapter,prompt_tokens,output_tokens\n"


def workload_toml(trace: str | None = None, **tables: str) -> str:
    """A small workload TOML: a trace replay when `trace` names a CSV, else Poisson arrivals."""
    text = 'name = "t"\nn_loras = 8\nrequests = 20\n'
    if trace is not None:
        text += ('[arrival]\nkind = "trace"\n[popularity]\nkind = "trace"\n[prompt]\nkind = "trace"\n'
                 f'[output]\nkind = "trace"\n[trace]\npath = "{trace}"\n')
    for table, body in tables.items():
        text += f"[{table}]\n{body}\n"
    return text


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every bad file of the table, in one folder."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "header-only.csv": TRACE_HEADER,
        "name-among-ids.csv": TRACE_HEADER + "0.1,1,10,10\n0.2,x,10,10\n0.3,2,10,10\n",
        "zones.csv": ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68+00:00,24,6\n"
                      "2023-11-16 18:15:47.68,24,6\n"),
        "profile-zero.json": json.dumps({"device": {"mem_bandwidth": 0}}),
        "profile-nan.json": '{"device": {"mem_bandwidth": NaN}}',
        "profile-typo.json": json.dumps({"devise": {"mem_bandwidth": 4.2e12}}),
        "weights-nan.json": '{"adapter_0000": NaN}',
        "a-file": "not a folder",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    workloads = {
        "header-only.toml": workload_toml("header-only.csv"),
        "name-among-ids.toml": workload_toml("name-among-ids.csv"),
        "zones.toml": workload_toml("zones.csv").replace('[popularity]\nkind = "trace"', '[popularity]\nkind = "uniform"'),
        "negative-seed.toml": 'seed = -1\n',
        "lognormal.toml": workload_toml(prompt='kind = "lognormal"\nmedian = 100.0\nmin = 50\nmax = 10'),
        "endless-output.toml": workload_toml(output="kind = \"fixed\"\nvalue = 1000000000000"),
        "long-prompts.toml": workload_toml(prompt="kind = \"fixed\"\nvalue = 30000", output="kind = \"fixed\"\nvalue = 10"),
    }
    for name, text in workloads.items():
        (root / name).write_text(text)

    spec = SynthSpec(n=3, ranks=(4,), layers=1, modules=("q_proj", "v_proj"), seed=0)
    good = write_synth_collection(spec, root / "adapters", progress=False)
    for variant in ("nan", "alpha", "targets"):
        write_synth_collection(spec, root / f"adapters-{variant}", progress=False)
    weights = root / "adapters-nan" / "adapter_0001" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key][0, 0], tensors[key][1, 2] = math.nan, math.inf
    save_file(tensors, weights, metadata={"format": "pt"})
    for variant, change in (("alpha", {"lora_alpha": 0}), ("targets", {"target_modules": ["q_proj", "v_proj",
                                                                                           "o_proj"]})):
        config = root / f"adapters-{variant}" / "adapter_0001" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    assert good.is_dir()
    return root


RUN = ["run", "--requests", "20", "--no-progress", "--jobs", "1"]

# (case, argv with {d} for the inputs folder, exit status, words of the message)
CASES = [
    # 1. NaN/Inf adapters, lora_alpha <= 0, NaN weights
    ("nan adapter: compress", ["compress", "{d}/adapters-nan", "--rank", "2", "--out", "{d}/out-nan", "--quiet"], 2,
     ["adapter_0001", "lora_A.weight", "2 of", "NaN or infinite"]),
    ("nan adapter: info", ["adapters", "info", "{d}/adapters-nan"], 2, ["adapter_0001", "lora_A.weight", "2 of"]),
    ("nan weight", ["compress", "{d}/adapters", "--rank", "2", "--weights", "{d}/weights-nan.json", "--out",
                    "{d}/out-w", "--quiet"], 2, ["--weights", "adapter_0000", "finite"]),
    ("lora_alpha 0", ["adapters", "info", "{d}/adapters-alpha"], 2, ["adapter_0001", "lora_alpha", "> 0"]),
    # 2. nothing can run
    ("weights do not fit", RUN + ["--model", "llama-13b", "--device", "l40s", "--gpu-memory-utilization", "0.5",
                                  "--out", "{d}/out-fit"], 2, ["llama-13b does not fit l40s", "would fit with --tp 2"]),
    ("engine fitted on one bf16 GPU", RUN + ["--engine", "vllm-v1", "--tp", "2", "--out", "{d}/out-eng"], 2,
     ["engine vllm-v1", "one GPU in bf16", "--engine ideal"]),
    ("longer than the context", RUN + ["--workload", "{d}/endless-output.toml", "--out", "{d}/out-ctx"], 2,
     ["exceed", "32,768-token context", "mistral-7b", "1,000,000,000,000 output"]),
    ("never admitted", RUN + ["--workload", "{d}/long-prompts.toml", "--chunked-prefill", "--gpu-memory-utilization",
                              "0.12", "--out", "{d}/out-kv"], 2, ["no strategy could run", "can never be admitted"]),
    ("sweep of nothing", ["sweep", "--n-loras", "1,2", "--requests", "20", "--device", "l40s",
                          "--gpu-memory-utilization", "0.1", "--no-progress", "--out", "{d}/sweep-none"], 2,
     ["no strategy ran at any point", "does not fit l40s"]),
    ("capacity of nothing", ["capacity", "--n-loras", "1", "--requests", "20", "--device", "l40s",
                             "--gpu-memory-utilization", "0.1", "--no-progress", "--out", "{d}/capacity-none"], 2,
     ["no strategy found a rate", "not searched", "does not fit l40s"]),
    # 5. tracebacks that are one line now
    ("trace of a header", RUN + ["--workload", "{d}/header-only.toml", "--model", "tiny", "--out", "{d}/o1"], 2,
     ["header-only.csv", "no rows"]),
    ("--seed -1", RUN + ["--seed", "-1", "--out", "{d}/o2"], 2, ["--seed", ">= 0"]),
    ("seed = -1", RUN + ["--workload", "{d}/negative-seed.toml", "--out", "{d}/o3"], 2,
     ["negative-seed.toml", "seed", ">= 0"]),
    ("profile bandwidth 0", RUN + ["--profile", "{d}/profile-zero.json", "--out", "{d}/o4"], 2,
     ["profile-zero.json", "mem_bandwidth", "> 0"]),
    ("profile bandwidth NaN", RUN + ["--profile", "{d}/profile-nan.json", "--out", "{d}/o5"], 2,
     ["profile-nan.json", "mem_bandwidth", "finite"]),
    ("azure time zones", RUN + ["--workload", "{d}/zones.toml", "--out", "{d}/o6"], 2,
     ["zones.csv, line 3", "TIMESTAMP", "time zone"]),
    ("compress into a file", ["compress", "{d}/adapters", "--rank", "2", "--out", "{d}/a-file/out", "--quiet"], 2,
     ["--out", "a-file/out", "cannot write there"]),
    # 6. silently wrong input
    ("profile section typo", RUN + ["--profile", "{d}/profile-typo.json", "--out", "{d}/o7"], 2,
     ["profile-typo.json", "unknown section", "'devise'"]),
    ("a name among adapter ids", RUN + ["--workload", "{d}/name-among-ids.toml", "--out", "{d}/o8"], 2,
     ["name-among-ids.csv, line 3", "'x'", "adapter id"]),
    ("--tol -1", ["compress", "{d}/adapters", "--rank", "2", "--tol", "-1", "--out", "{d}/o9", "--quiet"], 2,
     ["--tol", "-1"]),
    ("target module without tensors", ["adapters", "info", "{d}/adapters-targets"], 2,
     ["adapter_0001", "target_modules", "'o_proj'", "no weights"]),
    ("--rate inf", RUN + ["--rate", "inf", "--out", "{d}/o10"], 2, ["--rate", "finite", "inf"]),
    ("lognormal lengths", RUN + ["--workload", "{d}/lognormal.toml", "--out", "{d}/o11"], 2,
     ["lognormal.toml", "[prompt]", "median 100, sigma 1, min 50, max 10"]),
]


@pytest.mark.parametrize("argv,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_status_2(inputs, capsys, argv, status, words):
    code = main([a.format(d=inputs) for a in argv])
    out, err = capsys.readouterr()
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorabench {argv[0]}: error: "), err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in err and "Lengths(" not in err


def test_a_failed_run_leaves_no_folder_and_a_failed_capacity_no_chart(inputs, capsys):
    """The cases above that ran nothing wrote no run folder, and no empty chart."""
    main([a.format(d=inputs) for a in CASES[4][1]])
    main([a.format(d=inputs) for a in CASES[8][1]])
    capsys.readouterr()
    assert not (inputs / "out-fit").exists()
    assert (inputs / "capacity-none" / "capacity.csv").exists() and not (inputs / "capacity-none" / "charts").exists()


def test_a_sweep_where_nothing_ran_is_not_charted(inputs, capsys):
    main([a.format(d=inputs) for a in CASES[7][1]])
    capsys.readouterr()
    for command in (["plot", str(inputs / "sweep-none")], ["report", str(inputs / "sweep-none")],
                    ["plot", str(inputs / "capacity-none")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "nothing to show, no strategy ran" in err and "does not fit l40s" in err
    assert not (inputs / "sweep-none" / "charts").exists()


def test_zero_adapters_are_reported_apart_not_averaged_in(tmp_path, capsys):
    """An all-zero adapter has no relative error; averaging a 0 in would pull mean_error down."""
    spec = SynthSpec(n=4, ranks=(4,), layers=1, modules=("q_proj",), seed=1)
    source = write_synth_collection(spec, tmp_path / "adapters", progress=False)
    weights = source / "adapter_0002" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    assert main(["compress", str(source), "--rank", "2", "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    errors = pd.read_csv(tmp_path / "c" / "errors.csv")
    zero = errors["adapter"] == "adapter_0002"
    assert (errors.loc[zero, "norm"] == 0).all() and errors.loc[zero, "relative_error"].isna().all()
    assert errors.loc[~zero, "relative_error"].notna().all()
    assert summary["mean_error"] == pytest.approx(errors.loc[~zero, "relative_error"].mean(), rel=1e-5)
    assert summary["mean_error"] > errors["relative_error"].fillna(0).mean()  # what averaging a 0 in would give
    assert summary["zero_norm_adapters"] == ["adapter_0002"] and "adapter_0002" in printed
    assert main(["adapters", "info", str(source)]) == 0
    assert "adapter_0002 (1 of 1 modules)" in capsys.readouterr().out
