"""scripts/gpu_check.sh, the one device check: its CPU rehearsal writes every phase's files within the
device tool's limits, every result carries its provenance, the schedule stops a step at its budget
and skips what the deadline leaves no time for, and the GPU plan runs the issue's commands."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)

PROVENANCE = ("device", "date", "versions", "command")


def unpack(out: Path, name: str, into: Path) -> Path:
    with tarfile.open(out / f"{name}.tar.gz") as tar:
        tar.extractall(into, filter="data")
    return into / name


def test_cpu_rehearsal_writes_every_phase(tmp_path):
    """Every phase, its steps but those left out to keep this test short: validate at 1,024 and 64
    adapters (the same command with another count) and the kernel tests (the suite runs them; their
    table is tested below)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "LORABENCH_CHECK_STARTED")}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--only", "correctness,2,profile,validate-1,run",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # What the device tool brings back: at most 8 plain files, no folders, nothing half-written.
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.log", "phase1-correctness.tar.gz", "phase2-kernels.tar.gz", "phase3-fidelity.tar.gz",
        "phase4-run.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"correctness": "ok", "kernel-grid": "ok", "check-targets": "skipped",
                      "profile": "ok", "validate-1": "ok", "run": "ok"}
    assert summary["environment"]["card"] == "cpu" and summary["check"].startswith("scripts/gpu_check.sh --only")

    p1 = unpack(out, "phase1-correctness", tmp_path)
    kernels, decoder = pd.read_csv(p1 / "kernels-vs-float64.csv"), pd.read_csv(p1 / "decoder-vs-fp32.csv")
    assert set(kernels.op) == {"single", "sgmv", "bgmv", "paged", "compressed_full", "compressed_diag"} and kernels.ok.all()
    assert set(decoder.strategy) == {"single", "per-lora", "paged", "compressed"} and decoder.ok.all()

    p2 = unpack(out, "phase2-kernels", tmp_path)
    grid = pd.read_csv(p2 / "kernels.csv")
    assert {"torch_gather_bmm", "base_gemm", "paged"} <= set(grid.strategy) and (grid.median_us > 0).all()

    p3 = unpack(out, "phase3-fidelity", tmp_path)
    profile = json.loads((p3 / "profile-cpu-tiny.json").read_text())
    assert profile["provenance"]["command"].endswith(f"--out {p3.parent / 'work' / p3.name / 'profile-cpu-tiny.json'}")
    table = pd.read_csv(p3 / "validate.csv")
    measured = pd.read_csv(p3 / "validate-1" / "measured" / "summary.csv").set_index("strategy")
    modeled = pd.read_csv(p3 / "validate-1" / "modeled" / "summary.csv").set_index("strategy")
    assert (table.n_loras == 1).all() and set(table.strategy) == set(measured.index)
    for _, row in table.iterrows():  # the errors, recomputed from the two runs' own summaries
        for column, label in (("output_throughput", "tok/s"), ("tpot_mean_ms", "TPOT mean ms")):
            want = modeled.at[row.strategy, column] / measured.at[row.strategy, column] - 1
            assert row[f"{label} error"] == pytest.approx(want)
    assert "--n-loras 1 " in table.command.iloc[0]

    p4 = unpack(out, "phase4-run", tmp_path)
    run = p4 / "run-zipf-1024"
    assert set(pd.read_csv(run / "summary.csv").executor) == {"measured"}
    stamp = json.loads((run / "provenance.json").read_text())
    assert "lorabench run" in stamp["command"] and "--n-loras 1024" in stamp["command"]

    # Every result table carries where, when, with what and how it was made.
    for folder in (p1, p2, p3):
        for path in folder.glob("*.csv"):
            table = pd.read_csv(path)
            assert set(PROVENANCE) <= set(table.columns), path
            assert (table.device == "cpu").all() and table.versions.str.startswith("torch ").all(), path
    for folder in (p3 / "validate-1" / "measured", p3 / "validate-1" / "modeled", run):
        assert set(PROVENANCE) <= set(json.loads((folder / "provenance.json").read_text())), folder
    assert "## Measured vs modeled" in (out / "summary.md").read_text()


def test_kernel_test_results_become_a_table(tmp_path):
    xml, csv = tmp_path / "t.xml", tmp_path / "t.csv"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_kernels_single" name="test_a[float16]" time="1.50" />
<testcase classname="tests.test_kernels_paged" name="test_b" time="0.25"><failure message="assert 2.5 &lt;= 1.0">long text</failure></testcase>
<testcase classname="tests.test_kernels_static" name="test_c" time="0.01"><skipped message="needs CUDA" /></testcase>
</testsuite></testsuites>""")
    step = gpu_check.Step("kernel-tests", 1, 1, (), (xml, csv))
    gpu_check.junit_table(None, step, "pytest")
    table = pd.read_csv(csv).fillna("")
    assert table.to_dict("records") == [
        dict(test="tests.test_kernels_single::test_a[float16]", outcome="passed", seconds=1.5, message=""),
        dict(test="tests.test_kernels_paged::test_b", outcome="failure", seconds=0.25, message="assert 2.5 <= 1.0"),
        dict(test="tests.test_kernels_static::test_c", outcome="skipped", seconds=0.01, message="needs CUDA")]


def fake_check(tmp_path: Path, deadline_s: float):
    env = dict(device="cpu", card="cpu", date="2026-12-06 00:00:00 UTC", versions="torch x, triton y")
    return gpu_check.Check(env, tmp_path / "out", tmp_path / "work", deadline_s, time.time(), "scripts/gpu_check.sh")


def python_step(name: str, phase: int, budget_s: float, code: str, writes: Path, **kwargs):
    return gpu_check.Step(name, phase, budget_s, (sys.executable, "-c", code), (writes,), **kwargs)


def test_the_schedule_stops_a_step_at_its_budget_and_skips_what_has_no_time(tmp_path):
    check = fake_check(tmp_path, deadline_s=12)
    d1, d3 = check.phase_dir(1), check.phase_dir(3)
    # writes a first table, then would write a second one 30 s later: stopped after 2 s and half that
    # again (its overrun), keeping the first
    slow = ("import sys, time; open(sys.argv[1], 'w').write('x\\n1\\n'); time.sleep(30); "
            "open(sys.argv[1], 'w').write('x\\n2\\n')")
    steps = [
        gpu_check.Step("slow", 1, 2, (sys.executable, "-c", slow, str(d1 / "slow.csv")), (d1 / "slow.csv",)),
        python_step("quick", 1, 5, f"open({str(d1 / 'quick.json')!r}, 'w').write('{{}}')", d1 / "quick.json"),
        python_step("needy", 3, 1, "", d3 / "x.csv", needs=(d3 / "missing.json",)),
        python_step("late", 3, 30, "", d3 / "late.csv"),  # 30 s budget, under 12 s left: skipped
    ]
    t0 = time.time()
    assert check.run(steps) == 1
    assert time.time() - t0 < 10
    records = {r["step"]: r for r in check.records}
    assert records["slow"]["status"] == "stopped at its budget"
    assert 2 * (1 + gpu_check.OVERRUN) - 0.5 < records["slow"]["seconds"] < 2 * (1 + gpu_check.OVERRUN) + gpu_check.STOP_GRACE_S
    assert pd.read_csv(d1 / "slow.csv").x.tolist() == [1] and "command" in pd.read_csv(d1 / "slow.csv").columns
    assert records["quick"]["status"] == "ok"
    assert json.loads((d1 / "quick.json").read_text())["provenance"]["device"] == "cpu"
    assert records["needy"]["status"] == "skipped" and "phase3-fidelity/missing.json" in records["needy"]["note"]
    assert records["late"]["status"] == "skipped" and records["late"]["note"].startswith("past the deadline")
    # the phases that ran are packed; a phase whose steps all skipped writes nothing
    assert sorted(p.name for p in check.out.iterdir()) == ["gpu_check.log", "phase1-correctness.tar.gz",
                                                           "summary.json", "summary.md"]
    summary = json.loads((check.out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["slow", "quick", "needy", "late"]


@pytest.mark.parametrize("card,device", [("h100", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200"),
                                         ("nvidia-rtx-6000", "NVIDIA RTX 6000")])
def test_the_gpu_plan_runs_the_issues_commands_within_8_minutes(tmp_path, card, device):
    env = dict(card=card, device=device, preset=card if card in ("h100", "h200") else None, xdist=True)
    steps = {s.name: s for s in gpu_check.plan(env, tmp_path)}
    assert list(steps) == list(gpu_check.BUDGETS_S)
    assert sum(s.budget_s for s in steps.values()) + gpu_check.SETUP_S[0] <= gpu_check.DEADLINE_S[0] <= 480
    assert [s.phase for s in steps.values()] == sorted(s.phase for s in steps.values())  # most important first
    text = {name: " ".join(s.argv) for name, s in steps.items()}
    assert "--model mistral-7b" in text["correctness"]
    assert dict(steps["kernel-tests"].env) == {"LORABENCH_TRITON_COMPILED": "1"} and "-n 12" in text["kernel-tests"]
    assert all(f in text["kernel-tests"] for f in gpu_check.KERNEL_TEST_FILES)
    assert "--m" not in text["kernel-grid"]  # the full grid
    assert steps["check-targets"].needs == (tmp_path / "phase2-kernels" / "kernels.csv",)
    device_flag = f"--device {card}" if card in ("h100", "h200") else "--device"
    for n in (1024, 64, 1):
        v = text[f"validate-{n}"]
        assert f"validate --workload zipf --model mistral-7b" in v and f"--n-loras {n} " in v
        assert (device_flag in v) == (card in ("h100", "h200"))
        assert steps[f"validate-{n}"].needs == (tmp_path / "phase3-fidelity" / f"profile-{card}-mistral-7b.json",)
    assert "profile --model llama-3.1-8b" in text["profile-llama-3.1-8b"]
    assert "run --workload zipf --model mistral-7b" in text["run"] and "--executor measured --n-loras 1024" in text["run"]
