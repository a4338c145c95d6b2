"""The kernel bars, checked against a `lorabench bench-kernels` table of a GPU run, for the card
the table was measured on.

The bars compare CUDA-graph medians, timed the way the reference figures were measured
(`lorabench/data/h200_lora_layer.csv`: vLLM 0.33.0 and PyTorch on one H200, from anchors.md).
Every bar is a figure measured side by side in the same run on the same card, except vs-vllm,
whose figures are vLLM's kernels on an H200 and so hold for H200 tables only. Each bar is written
as "ours_us <= bar_us":

    vs-vllm        (H200 only) per-lora (the variant `lora_per_lora` picks for M) and paged are no
                   slower than vLLM's specialized kernels at every reference point with M >= 16;
    vs-gather-bmm  per-lora and paged lead torch gather-bmm (timed in the same run) at least as far
                   as vLLM's specialized kernels led it on the H200 at that point, and never trail it:
                   bar = gather-bmm x min(1, vLLM / gather-bmm of the reference). On an H200 whose
                   gather-bmm matches the reference this is the vs-vllm bar; on another card it
                   carries vLLM's lead there through a baseline measured on that card;
    bandwidth      at M = N = 1024, per-lora and paged move their unique adapter bytes at >= 30% of
                   the copy bandwidth measured in the same run (bar = floor / 0.30);
    compressed     compressed (R = 64, full S) takes at most 1.2x single LoRA's time at M = 256,
                   N = 1024.

Every row also gives `x_floor`, how many times the physical floor (unique adapter bytes / copy
bandwidth) the kernel takes, and `basis`, what its bar was made from. The reference's Zipf draws
are not ours, so its `distinct` adapter count is shown beside ours.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from lorabench.errors import LorabenchError
from lorabench.kernels import BGMV_MAX_TOKENS

BANDWIDTH_FRACTION = 0.30
BANDWIDTH_POINT = (1024, 1024)
COMPRESSED_RATIO = 1.2
COMPRESSED_POINT = (256, 1024)
VS_VLLM_MIN_TOKENS = 16
GATHER_BMM = "torch_gather_bmm"  # the bench-kernels column of the baseline
# What a bench-kernels CSV must hold for the check.
TABLE_COLUMNS = ("M", "N", "distinct", "floor_us", "strategy", "mode", "median_us")


def load_reference() -> pd.DataFrame:
    """The H200 reference figures, one row per (M, N), microseconds."""
    with resources.files("lorabench").joinpath("data/h200_lora_layer.csv").open() as f:
        return pd.read_csv(f, comment="#")


def read_table(path: Path) -> pd.DataFrame:
    """A bench-kernels CSV, with a clear error when it is not one."""
    if not path.is_file():
        raise LorabenchError(f"--check-targets {path}: no such file")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LorabenchError(f"--check-targets {path}: not a CSV ({' '.join(str(err).split())})") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise LorabenchError(f"--check-targets {path}: not a bench-kernels table (no column {', '.join(missing)})")
    return table


def per_lora_variant(m: int) -> str:
    """The per-lora column that `lora_per_lora(variant="auto")` runs for a batch of m tokens."""
    return "per_lora_bgmv" if m <= BGMV_MAX_TOKENS else "per_lora_sgmv"


def table_device(table: pd.DataFrame) -> str:
    """The device a bench-kernels table was measured on, as its `device` column names it."""
    return str(table["device"].iloc[0]) if "device" in table.columns and len(table) else "an unknown device"


def is_h200(device: str) -> bool:
    return "h200" in device.lower()


def check_targets(table: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (bar, strategy, point) that the table covers: ours_us, bar_us, ratio, ok, x_floor, basis.

    table: a bench-kernels table with CUDA-graph rows (mode "graph"); its `device` column picks the
    bars (vs-vllm on an H200 only). A strategy that failed (no time) misses its bar, and so does one
    whose same-run baseline failed.
    """
    graph = table[table["mode"] == "graph"]
    if graph.empty:
        modes = ", ".join(sorted(set(table["mode"].astype(str)))) or "none"
        raise LorabenchError(f"the table has no CUDA-graph timings (mode 'graph'; it has: {modes}): "
                             "the bars are for a GPU run of `lorabench bench-kernels`")
    reference = load_reference() if reference is None else reference
    times = graph.set_index(["M", "N", "strategy"])["median_us"]
    points = graph.drop_duplicates(["M", "N"]).set_index(["M", "N"])[["distinct", "floor_us"]]
    ref_distinct = {(r.M, r.N): r.distinct for r in reference.itertuples()}
    rows = []

    def add(target: str, strategy: str, m: int, n: int, bar_us: float, basis: str):
        if (m, n) not in points.index:
            return
        ours = float(times.get((m, n, strategy), float("nan")))
        floor = float(points.loc[(m, n), "floor_us"])
        rows.append(dict(
            target=target, strategy=strategy, M=m, N=n, distinct=int(points.loc[(m, n), "distinct"]),
            ref_distinct=ref_distinct.get((m, n), pd.NA), ours_us=ours, bar_us=bar_us, ratio=ours / bar_us,
            ok=bool(ours <= bar_us), x_floor=ours / floor if floor > 0 else float("nan"), basis=basis,
        ))

    vs_vllm_points = [ref for ref in reference.itertuples() if ref.M >= VS_VLLM_MIN_TOKENS]
    if is_h200(table_device(table)):
        for ref in vs_vllm_points:
            for strategy in (per_lora_variant(ref.M), "paged"):
                add("vs-vllm", strategy, ref.M, ref.N, ref.vllm_specialized_us, "vLLM 0.33.0 on an H200")
    for ref in vs_vllm_points:
        if (ref.M, ref.N, GATHER_BMM) not in times.index:
            continue  # a table from before the baseline was timed
        lead = min(1.0, ref.vllm_specialized_us / ref.torch_gather_bmm_us)
        for strategy in (per_lora_variant(ref.M), "paged"):
            add("vs-gather-bmm", strategy, ref.M, ref.N, lead * float(times[(ref.M, ref.N, GATHER_BMM)]),
                f"{lead:.2f} x {GATHER_BMM}")
    m, n = BANDWIDTH_POINT
    if (m, n) in points.index:
        bar = float(points.loc[(m, n), "floor_us"]) / BANDWIDTH_FRACTION
        for strategy in (per_lora_variant(m), "paged"):
            add("bandwidth", strategy, m, n, bar, f"floor / {BANDWIDTH_FRACTION:.2f}")
    m, n = COMPRESSED_POINT
    single = float(times.get((m, n, "single"), float("nan")))
    add("compressed", "compressed_R64", m, n, COMPRESSED_RATIO * single, f"{COMPRESSED_RATIO} x single")
    if not rows:
        raise LorabenchError("the table holds none of the reference points (M >= 16 and N in 8, 64, 1024): "
                             "run the full grid")
    return pd.DataFrame(rows).astype({"ref_distinct": "Int64"})


def print_targets(verdicts: pd.DataFrame, device: str) -> None:
    met = int(verdicts.ok.sum())
    source = "; vs-vllm: vLLM's H200 figures in lorabench/data/h200_lora_layer.csv" if is_h200(device) else ""
    print(f"\nkernel bars on {device} (CUDA-graph medians against figures measured in the same run{source}): "
          f"{met} of {len(verdicts)} met")
    if not is_h200(device):
        print(f"note: vLLM's figures were measured on an H200, so vs-vllm is not judged on {device}; "
              "vs-gather-bmm carries vLLM's lead over gather-bmm to this card")
    shown = verdicts.assign(ok=verdicts.ok.map({True: "yes", False: "NO"}))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(shown.to_string(index=False))
