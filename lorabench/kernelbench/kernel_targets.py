"""The kernel bars of the H200, checked against a `lorabench bench-kernels` table.

The bars compare CUDA-graph medians, timed the way the reference figures were measured
(`lorabench/data/h200_lora_layer.csv`: vLLM 0.33.0 and PyTorch on one H200, from anchors.md).
Each bar is written as "ours_us <= bar_us":

    vs-vllm     per-lora (the variant `lora_per_lora` picks for M) and paged are no slower than vLLM's
                specialized kernels at every reference point with M >= 16;
    bandwidth   at M = N = 1024, per-lora and paged move their unique adapter bytes at >= 30% of the
                copy bandwidth measured in the same run (bar = floor / 0.30);
    compressed  compressed (R = 64, full S) takes at most 1.2x single LoRA's time at M = 256, N = 1024.

Every row also gives `x_floor`, how many times the physical floor (unique adapter bytes / copy
bandwidth) the kernel takes. The reference's Zipf draws are not ours, so its `distinct` adapter
count is shown beside ours.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
from lorabench.kernels import BGMV_MAX_TOKENS

from lorabench.errors import LorabenchError

BANDWIDTH_FRACTION = 0.30
BANDWIDTH_POINT = (1024, 1024)
COMPRESSED_RATIO = 1.2
COMPRESSED_POINT = (256, 1024)
VS_VLLM_MIN_TOKENS = 16
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


def check_targets(table: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (bar, strategy, point) that the table covers: ours_us, bar_us, ratio, ok, x_floor.

    table: a bench-kernels table with CUDA-graph rows (mode "graph"). A strategy that failed
    (no time) misses its bar.
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

    def add(target: str, strategy: str, m: int, n: int, bar_us: float):
        if (m, n) not in points.index:
            return
        ours = float(times.get((m, n, strategy), float("nan")))
        floor = float(points.loc[(m, n), "floor_us"])
        rows.append(dict(
            target=target, strategy=strategy, M=m, N=n, distinct=int(points.loc[(m, n), "distinct"]),
            ref_distinct=ref_distinct.get((m, n), pd.NA), ours_us=ours, bar_us=bar_us, ratio=ours / bar_us,
            ok=bool(ours <= bar_us), x_floor=ours / floor if floor > 0 else float("nan"),
        ))

    for ref in reference.itertuples():
        if ref.M < VS_VLLM_MIN_TOKENS:
            continue
        for strategy in (per_lora_variant(ref.M), "paged"):
            add("vs-vllm", strategy, ref.M, ref.N, ref.vllm_specialized_us)
    m, n = BANDWIDTH_POINT
    if (m, n) in points.index:
        bar = float(points.loc[(m, n), "floor_us"]) / BANDWIDTH_FRACTION
        for strategy in (per_lora_variant(m), "paged"):
            add("bandwidth", strategy, m, n, bar)
    m, n = COMPRESSED_POINT
    single = float(times.get((m, n, "single"), float("nan")))
    add("compressed", "compressed_R64", m, n, COMPRESSED_RATIO * single)
    if not rows:
        raise LorabenchError("the table holds none of the reference points (M >= 16 and N in 8, 64, 1024): "
                             "run the full grid")
    return pd.DataFrame(rows).astype({"ref_distinct": "Int64"})


def print_targets(verdicts: pd.DataFrame, device: str) -> None:
    met = int(verdicts.ok.sum())
    print(f"\nH200 kernel bars (CUDA-graph medians; vLLM figures: lorabench/data/h200_lora_layer.csv): "
          f"{met} of {len(verdicts)} met")
    if "h200" not in device.lower():
        print(f"note: the bars were measured on an H200; this table comes from {device}")
    shown = verdicts.assign(ok=verdicts.ok.map({True: "yes", False: "NO"}))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(shown.to_string(index=False))
