"""Profiles: the fit recovers a known cost model; a profile measured on the CPU is written, read
back, and drives the modeled executor."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from lorabench.cli import main as cli_main
from lorabench.experiments.runner import RunConfig, run_experiment
from lorabench.fidelity import calibration
from lorabench.fidelity.profile import grid_steps, run_profile
from lorabench.model import target_modules
from lorabench.outputs.results import write_json_atomic
from lorabench.presets import device_preset, model_preset
from lorabench.sim import costmodel

MODULES = target_modules("q_proj,k_proj,v_proj,o_proj")


def test_fit_recovers_the_times_of_a_known_cost_model():
    """Points timed by the cost model itself with other factors: the calibration must reproduce them."""
    shape, device = model_preset("mistral-7b"), device_preset("h200")
    truth = dataclasses.replace(costmodel.Efficiency(), gemm_flops=0.55, memory=0.6, lora_kernel_s=3e-6,
                                step_overhead_s=2e-4, lora_segment_s=1e-6)
    true_device = dataclasses.replace(device, launch_overhead_s=9e-6)
    points = []
    for strategy in ("per-lora", "compressed"):
        for tokens, ctx, prefill, distinct in grid_steps("full", 256):
            adapters = [i % distinct for i in range(len(tokens))]
            p = calibration.ProfilePoint(strategy, 16, tokens, ctx, adapters, prefill, 0.0)
            seconds = calibration.predict([p], shape, true_device, truth, MODULES, 64, 64)[0]
            points.append(dataclasses.replace(p, seconds=float(seconds)))
    fitted_device, _, by_strategy, _ = calibration.calibrate(points, shape, device, MODULES, 64, 64)
    for strategy in ("per-lora", "compressed"):
        mine = [p for p in points if p.strategy == strategy]
        default = calibration.predict(mine, shape, device, costmodel.Efficiency(), MODULES, 64, 64)
        assert np.median(np.abs(default / [p.seconds for p in mine] - 1)) > 0.05  # the defaults do not fit
        fitted = calibration.predict(mine, shape, fitted_device, by_strategy[strategy], MODULES, 64, 64)
        np.testing.assert_allclose(fitted, [p.seconds for p in mine], rtol=0.03)


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = run_profile("tiny", ["single", "paged"], [4], 16, MODULES, 16, "quick", 1, "cpu", False, progress=False)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("profiles") / "cpu-tiny.json"
    write_json_atomic(path, data)
    return path, data


def test_profile_written_on_cpu_loads_back(cpu_profile):
    path, data = cpu_profile
    points = calibration.load_points(path)
    assert len(points) == 2 * len(grid_steps("quick", 16))
    assert all(p.seconds > 0 for p in points) and {p.strategy for p in points} == {"single", "paged"}
    assert json.loads(path.read_text())["meta"]["modes"] == {"eager": len(points)}
    assert set(data["efficiency_by_strategy"]) == {"single", "paged"}


def test_profile_drives_the_modeled_executor(cpu_profile, tmp_path):
    path, data = cpu_profile
    shape, base = model_preset("tiny"), device_preset("h200")
    config = RunConfig(model="tiny", profile=str(path))
    device, _ = costmodel.apply_profile(costmodel.load_profile(path), base, costmodel.Efficiency())
    assert device.bf16_flops == data["device"]["bf16_flops"] and device.mem_bandwidth == data["device"]["mem_bandwidth"]
    for strategy in ("single", "paged"):
        mine = [p for p in calibration.load_points(path) if p.strategy == strategy]
        lora = costmodel.LoraSetup(strategy, np.full(16, 4), MODULES, 16, np.zeros(16, dtype=np.int64), 16)
        ex = costmodel.make_executor(config, shape, device, lora)
        eff = costmodel.Efficiency(**data["efficiency_by_strategy"][strategy])
        assert ex.eff == eff
        want = calibration.predict(mine, shape, device, eff, MODULES, 16, 16)
        got = [ex.step(p.step()) for p in mine]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        plain = costmodel.make_executor(RunConfig(model="tiny"), shape, base, lora)
        assert not np.allclose([plain.step(p.step()) for p in mine], got, rtol=0.05)
    summary = run_experiment(RunConfig(model="tiny", profile=str(path), strategies=("paged",), n_loras=16,
                                       requests=20, ranks=(4,)), progress=False)
    assert (summary["status"] == "ok").all() and (summary["output_throughput"] > 0).all()


@pytest.mark.parametrize("argv,message", [
    (["profile", "--strategy", "bogus"], "--strategy"),
    (["profile", "--ranks", "8,x"], "--ranks"),
    (["profile", "--device", "cuda:0"] if not torch.cuda.is_available() else ["profile", "--n-loras", "0"], ""),
    (["profile", "--model", "mistral-7b", "--device", "cpu"], "too large to execute on the CPU"),
])
def test_profile_bad_arguments_get_one_clear_error(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorabench profile: error:") and message in err and "Traceback" not in err


def test_fidelity_is_modeled_over_measured_minus_one():
    from lorabench.fidelity.validate import fidelity

    measured = pd.DataFrame(dict(strategy=["single", "paged"], status=["ok", "ok"], output_throughput=[100.0, 80.0],
                                 ttft_mean_ms=[10.0, 20.0], tpot_mean_ms=[5.0, 4.0]))
    modeled = measured.assign(output_throughput=[110.0, 60.0], ttft_mean_ms=[9.0, 20.0], tpot_mean_ms=[5.5, 3.0])
    t = fidelity(measured, modeled).set_index("strategy")
    np.testing.assert_allclose(t["tok/s error"], [0.1, -0.25])
    np.testing.assert_allclose(t["TTFT mean ms error"], [-0.1, 0.0])
    np.testing.assert_allclose(t["TPOT mean ms error"], [0.1, -0.25])


def test_validate_end_to_end_on_cpu(cpu_profile, tmp_path, capsys):
    from test_measured import WORKLOAD

    path, _ = cpu_profile
    workload = tmp_path / "w.toml"
    workload.write_text(WORKLOAD)
    out = tmp_path / "val"
    argv = ["validate", "--workload", str(workload), "--model", "tiny", "--strategy", "paged", "--profile", str(path),
            "--out", str(out), "--no-progress", "--max-num-seqs", "8", "--max-num-batched-tokens", "512"]
    threads = torch.get_num_threads()
    try:
        assert cli_main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # validate runs single-threaded on the CPU
    printed = capsys.readouterr().out
    assert "paged" in printed and "tok/s error" in printed
    for kind in ("measured", "modeled"):
        summary = pd.read_csv(out / kind / "summary.csv")
        assert list(summary["strategy"]) == ["single", "paged"] and (summary["status"] == "ok").all()
        assert (summary["executor"] == kind).all()
