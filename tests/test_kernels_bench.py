"""`lorabench bench-kernels` on a tiny CPU grid, its gather-bmm baseline against the float64
reference, and the GPU device check run under the interpreter."""

import pandas as pd
import pytest
import torch

from lorabench.cli import main
from lorabench.kernelbench.bench_kernels import gather_bmm
from lorabench.kernelbench.correctness import device_check
from lorabench.kernels import LoraBatch, reference, testing


def test_device_check_runs_every_kernel():
    table = device_check("cpu", dtypes=(torch.float32, torch.float16), shapes={"small": (21, 40, 24, 5, 4)})
    assert set(table.op) == {"single", "sgmv", "bgmv", "paged", "compressed_full", "compressed_diag"}
    assert len(table) == 12 and table.ok.all(), table.to_string()


@pytest.mark.parametrize("seed", range(3))
def test_gather_bmm_baseline_matches_the_float64_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    m, n, d_in, d_out, r = 37, 6, 48, 40, 8
    ids = testing.zipf_ids(m, n, 1.0, gen)
    x, y = torch.randn(m, d_in, generator=gen, dtype=torch.float64), torch.randn(m, d_out, generator=gen, dtype=torch.float64)
    A, B = torch.randn(n, r, d_in, generator=gen, dtype=torch.float64), torch.randn(n, d_out, r, generator=gen, dtype=torch.float64)
    scales = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    want = reference.per_lora(x, y.clone(), A, B, scales, LoraBatch.build(ids))
    got = gather_bmm(x, y.clone(), A, B, scales, ids.long())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bench_writes_a_consistent_csv(tmp_path, capsys):
    out = tmp_path / "k.csv"
    assert main(["bench-kernels", "--m", "1,5", "--n", "1,3", "--d", "32", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table.strategy) == {"base_gemm", "single", "per_lora", "paged", "torch_gather_bmm", "compressed_R64",
                                   "compressed_R128"}
    assert len(table) == 4 * 7 and (table["mode"] == "cpu").all()
    assert (table.distinct <= table[["M", "N"]].min(axis=1)).all() and (table.distinct >= 1).all()
    # unique adapter bytes: distinct adapters x rank 16 x (d_in + d_out) x 4 bytes (fp32)
    assert ((table.unique_adapter_mb * 1e6 - table.distinct * 16 * 64 * 4).abs() < 1e-6).all()
    floor = table.unique_adapter_mb * 1e6 / (table.copy_gbps * 1e9) * 1e6
    assert ((table.floor_us - floor).abs() <= 1e-9 * floor).all()
    assert (table.median_us > 0).all() and not list(tmp_path.glob(".*tmp"))
    assert "median microseconds (cpu)" in capsys.readouterr().out
    assert set(table.command) == {"lorabench bench-kernels --m 1,5 --n 1,3 --d 32 --seed 0"}


def test_bad_arguments_are_reported(capsys):
    assert main(["bench-kernels", "--m", "0,4"]) == 2
    assert "--m values must be >= 1" in capsys.readouterr().err
    assert main(["bench-kernels", "--n", "a"]) == 2
    assert "--n takes comma-separated integers" in capsys.readouterr().err
    assert main(["bench-kernels", "--device-check"]) == 2
    assert "--device-check needs a CUDA GPU" in capsys.readouterr().err


def test_a_failing_strategy_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import lorabench.kernelbench.bench_kernels as bench

    real = bench.time_call
    calls = []

    def flaky(call, device):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("capture failed")
        return real(call, device)

    monkeypatch.setattr(bench, "time_call", flaky)
    out = tmp_path / "k.csv"
    assert main(["bench-kernels", "--m", "2", "--n", "2", "--d", "16", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    failed = table[table.error.notna()]
    assert len(failed) == 1 and failed.median_us.isna().all() and "capture failed" in failed.error.iloc[0]
    assert table.median_us.notna().sum() == len(table) - 1
    assert "failed: capture failed" in capsys.readouterr().err
