"""`lorabench plot`: comparison charts of a sweep folder (and of `lorabench compress` outputs).

Kinds: throughput (output tokens/s against the number of adapters), relative (the same divided by
single-LoRA's at each point, with the paper's 0.8 headline), latency (TTFT and TPOT p50/p99),
memory (GPU memory split as stacked bars), cdf (latency distributions at one point), compression
(reconstruction error against rank and number of clusters), capacity (the highest request rate
meeting the SLOs against the number of adapters, from a `lorabench capacity` folder). Every chart is
written as PNG and SVG; every chart's title names device, model, workload and executor; a strategy
has one colour in all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from lorabench.errors import LorabenchError  # noqa: E402
from lorabench.outputs.tables import point_dir, read_capacity, read_sweep, require_results  # noqa: E402

SWEEP_KINDS = ("throughput", "relative", "latency", "memory", "cdf")
KINDS = SWEEP_KINDS + ("compression", "capacity", "replicas")
FORMATS = ("png", "svg")

# One colour per strategy in every chart (colour-blind-safe Okabe-Ito hues).
STRATEGY_COLORS = {
    "single": "#000000",
    "per-lora": "#E69F00",
    "paged": "#0072B2",
    "compressed": "#009E73",
}
_SPARE_COLORS = ("#CC79A7", "#D55E00", "#56B4E9", "#F0E442")

PAPER_HEADLINE = 0.8  # "Compress then Serve": >1,000 adapters at ~80% of single-LoRA throughput


def strategy_color(name: str) -> str:
    if name in STRATEGY_COLORS:
        return STRATEGY_COLORS[name]
    return _SPARE_COLORS[sum(map(ord, name)) % len(_SPARE_COLORS)]  # stable across charts and runs


def strategies_in(table: pd.DataFrame) -> list[str]:
    """Strategies in the fixed order (single first), then any others by name."""
    present = set(table["strategy"])
    return [s for s in STRATEGY_COLORS if s in present] + sorted(present - set(STRATEGY_COLORS))


def ok_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"] == "ok"]


def title_line(table: pd.DataFrame) -> str:
    """'device h200 · model mistral-7b · workload zipf · modeled executor' (all values if mixed)."""

    def values(col: str) -> str:
        return "/".join(str(v) for v in dict.fromkeys(table[col].dropna()))

    return (f"device {values('device')} · model {values('model')} · workload {values('workload')} · "
            f"{values('executor')} executor")


def log2_n_axis(ax: plt.Axes, table: pd.DataFrame) -> None:
    ax.set_xscale("log", base=2)
    ns = sorted(table["n_loras"].unique())
    ax.set_xticks(ns)
    ax.set_xticklabels([f"{n:,}" for n in ns], rotation=45 if len(ns) > 8 else 0)
    ax.set_xlabel("number of adapters (log2 scale)")
    ax.grid(True, which="major", alpha=0.3)


def not_run_note(fig: plt.Figure, table: pd.DataFrame, source: str = "sweep.csv") -> None:
    """Say which points have no result, so a missing marker is not mistaken for a zero."""
    bad = table[table["status"] != "ok"]
    if bad.empty:
        return
    parts = [f"{s} at N={', '.join(f'{n:,}' for n in g['n_loras'])}" for s, g in bad.groupby("strategy", sort=False)]
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.text(0.01, 0.005, f"no result (see status in {source}): " + "; ".join(parts), fontsize=7, va="bottom",
             wrap=True)


def relative_to_single(table: pd.DataFrame) -> pd.DataFrame:
    """Each ok row's output_throughput divided by single-LoRA's at the same n_loras."""
    ok = ok_rows(table)
    single = ok[ok["strategy"] == "single"].set_index("n_loras")["output_throughput"]
    if single.empty:
        raise LorabenchError("relative chart: the sweep has no successful single-LoRA rows to divide by")
    rel = ok[ok["n_loras"].isin(single.index)].copy()
    rel["relative"] = rel["output_throughput"].to_numpy() / single.loc[rel["n_loras"]].to_numpy()
    return rel


def lines_per_strategy(ax: plt.Axes, rows: pd.DataFrame, column: str, style: str = "o-", suffix: str = "") -> None:
    """One line of `column` against n_loras per strategy, in the strategy's colour."""
    for s in strategies_in(rows):
        mine = rows[rows["strategy"] == s].sort_values("n_loras")
        ax.plot(mine["n_loras"], mine[column], style, color=strategy_color(s), label=s + suffix)


# --- chart kinds (each returns a Figure) --------------------------------------------------------


def plot_throughput(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines_per_strategy(ax, ok_rows(table), "output_throughput")
    log2_n_axis(ax, table)
    ax.set_ylabel("output throughput (tokens/s)")
    ax.set_ylim(bottom=0)
    ax.legend(title="strategy")
    ax.set_title(f"Output tokens/s against number of adapters\n{title_line(table)}", fontsize=10)
    not_run_note(fig, table)
    return fig


def plot_relative(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rel = relative_to_single(table)
    lines_per_strategy(ax, rel, "relative")
    ax.axhline(PAPER_HEADLINE, color="grey", linestyle="--", linewidth=1,
               label="0.8: paper's headline\n(compressed, >1,000 adapters)")
    log2_n_axis(ax, table)
    ax.set_ylabel("output throughput / single-LoRA's (ratio)")
    ax.set_ylim(0, max(1.1, float(rel["relative"].max()) * 1.05))
    ax.legend(title="strategy", loc="lower left", fontsize=8)
    ax.set_title(f"Throughput relative to single-LoRA\n{title_line(table)}", fontsize=10)
    not_run_note(fig, table)
    return fig


def plot_latency(table: pd.DataFrame) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = ok_rows(table)
    for ax, metric, label in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            lines_per_strategy(ax, ok, f"{metric}_{q}_ms", style, suffix=f" {q}")
        log2_n_axis(ax, table)
        values = ok[[f"{metric}_p50_ms", f"{metric}_p99_ms"]].to_numpy(dtype=float)
        if values.size and np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 30:
            ax.set_yscale("log")  # queueing delays span decades
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(f"{metric.upper()}: {label}, p50 (solid) and p99 (dashed)", fontsize=9)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Latency against number of adapters\n{title_line(table)}", fontsize=10)
    fig.tight_layout()
    not_run_note(fig, table)
    return fig


MEMORY_PARTS = (  # column, label, how the part is drawn inside the strategy's colour
    ("memory_weights_gib", "base weights", dict(alpha=1.0, hatch="")),
    ("memory_kv_gib", "KV cache", dict(alpha=0.45, hatch="")),
    ("memory_adapters_gib", "adapters", dict(alpha=0.8, hatch="///")),
)


def plot_memory(table: pd.DataFrame) -> plt.Figure:
    ok = ok_rows(table)
    ns = sorted(table["n_loras"].unique())
    strategies = strategies_in(table)
    width = 0.8 / len(strategies)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(ns) + 3), 4.8))
    for i, s in enumerate(strategies):
        rows = ok[ok["strategy"] == s].set_index("n_loras")
        x = np.array([ns.index(n) for n in rows.index]) - 0.4 + width * (i + 0.5)
        bottom = np.zeros(len(rows))
        for col, _, look in MEMORY_PARTS:
            values = rows[col].fillna(0).to_numpy(dtype=float)
            ax.bar(x, values, width, bottom=bottom, color=strategy_color(s), edgecolor="white", linewidth=0.5,
                   **look)
            bottom += values
    ax.set_xticks(range(len(ns)))
    ax.set_xticklabels([f"{n:,}" for n in ns], rotation=45 if len(ns) > 8 else 0)
    ax.set_xlabel("number of adapters (one group of bars per point, one bar per strategy)")
    ax.set_ylabel("GPU memory (GiB)")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(color=strategy_color(s), label=s) for s in strategies]
    handles += [Patch(facecolor="grey", label=label, **look) for _, label, look in MEMORY_PARTS]
    ax.legend(handles=handles, fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"GPU memory: weights, KV cache and adapters\n{title_line(table)}", fontsize=10)
    fig.tight_layout()
    not_run_note(fig, table)
    return fig


def request_latencies(requests: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT (excluding the first token) and E2E latency, in ms."""
    ttft = (requests["first_token_s"] - requests["arrival_s"]) * 1e3
    e2el = (requests["finish_s"] - requests["arrival_s"]) * 1e3
    multi = requests["output_tokens"] > 1
    tpot = ((requests["finish_s"] - requests["first_token_s"])[multi] / (requests["output_tokens"][multi] - 1)) * 1e3
    return {"ttft": ttft.to_numpy(), "tpot": tpot.to_numpy(), "e2el": e2el.to_numpy()}


def default_cdf_point(table: pd.DataFrame) -> int:
    """The largest number of adapters at which every strategy ran (else the largest with any)."""
    ok = ok_rows(table)
    if ok.empty:
        raise LorabenchError("cdf chart: no successful rows in the sweep")
    complete = [n for n, g in table.groupby("n_loras") if (g["status"] == "ok").all()]
    return int(max(complete) if complete else ok["n_loras"].max())


def plot_cdf(table: pd.DataFrame, folder: Path, n_loras: int | None = None) -> plt.Figure:
    n = default_cdf_point(table) if n_loras is None else n_loras
    rows = ok_rows(table)[ok_rows(table)["n_loras"] == n]
    if rows.empty:
        raise LorabenchError(f"cdf chart: no successful strategy at --point {n} (points: "
                             f"{', '.join(map(str, sorted(table['n_loras'].unique())))})")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    labels = {"ttft": "TTFT (ms)", "tpot": "TPOT (ms)", "e2el": "end-to-end latency (ms)"}
    for s in strategies_in(rows):
        path = point_dir(folder, n) / "requests" / f"{s}.csv"
        if not path.exists():
            raise LorabenchError(f"{path}: missing (the cdf chart reads each strategy's requests)")
        latencies = request_latencies(pd.read_csv(path))
        for ax, (metric, values) in zip(axes, latencies.items()):
            values = np.sort(values)
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", color=strategy_color(s),
                    label=s)
    for ax, metric in zip(axes, labels):
        low, high = ax.dataLim.x0, ax.dataLim.x1
        if low > 0 and high / low > 100:  # queueing delays span decades: a linear axis hides the body
            ax.set_xscale("log")
        ax.set_xlabel(labels[metric] + (", log scale" if ax.get_xscale() == "log" else ""))
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="strategy", fontsize=8)
    fig.suptitle(f"Latency distributions at {n:,} adapters\n{title_line(rows)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_capacity(table: pd.DataFrame) -> plt.Figure:
    """The highest sustainable rate against the number of adapters, one line per strategy (and number
    of replicas); against the number of replicas when the search had one number of adapters and several
    of replicas ("how many GPUs")."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = ok_rows(table)
    replicas = sorted(table["replicas"].dropna().unique()) if "replicas" in table else [1]
    by_replicas = len(replicas) > 1 and table["n_loras"].nunique() == 1
    if by_replicas:
        for s in strategies_in(ok):
            rows = ok[ok["strategy"] == s].sort_values("replicas")
            ax.plot(rows["replicas"], rows["max_rate"], "o-", color=strategy_color(s), label=s)
        ax.set_xticks(replicas)
        ax.set_xlabel(f"replicas (GPUs behind the router), {int(table['n_loras'].iloc[0]):,} adapters")
    else:
        for g, style in zip(replicas, ("o-", "s--", "^:", "d-.", "v-")):
            suffix = f", {int(g)} replicas" if len(replicas) > 1 else ""
            lines_per_strategy(ax, ok[ok["replicas"] == g] if "replicas" in ok else ok, "max_rate", style, suffix)
        log2_n_axis(ax, table)
    capped = ok[ok["bound_by"].astype(str).str.startswith("ceiling")]
    if not capped.empty:  # nothing failed up to the ceiling: the true capacity is higher
        x = capped["replicas"] if by_replicas else capped["n_loras"]
        ax.plot(x, capped["max_rate"], "^", color="grey", markersize=11, fillstyle="none",
                label="search ceiling\n(capacity is higher)")
    ax.set_ylabel("highest sustainable rate (requests/s)")
    ax.set_ylim(bottom=0)
    if ok.size:  # no line to label when no search found a rate
        ax.legend(title="strategy", fontsize=8)
    objectives = "/".join(dict.fromkeys(table["objectives"].dropna()))
    ax.set_title(f"Highest request rate meeting {objectives}\n{title_line(table)}", fontsize=10)
    not_run_note(fig, table, "capacity.csv")
    return fig


def read_replicas(folder: Path) -> dict[str, pd.DataFrame]:
    """replicas/<strategy>.csv of a run folder served by a cluster (`lorabench run --replicas G`)."""
    files = sorted((folder / "replicas").glob("*.csv")) if (folder / "replicas").is_dir() else []
    if not files:
        raise LorabenchError(f"{folder}: no replicas/*.csv, not a run folder of `lorabench run --replicas G` (G > 1)")
    tables = {f.stem: pd.read_csv(f) for f in files}
    return {name: tables[name] for name in strategies_in(pd.DataFrame({"strategy": list(tables)}))}


def plot_replicas(folder: Path) -> plt.Figure:
    """Per replica: tokens it served (prompt + output) and its adapter hit rate, one bar per strategy."""
    tables = {name: t for name, t in read_replicas(folder).items() if len(t)}
    fig, (load_ax, hit_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(tables), 1)
    for i, (name, t) in enumerate(tables.items()):
        x = t["replica"].to_numpy() + (i - (len(tables) - 1) / 2) * width
        tokens = (t["prompt_tokens"] + t["output_tokens"]) / 1e6
        load_ax.bar(x, tokens, width, color=strategy_color(name), label=name)
        hit_ax.bar(x, t["adapter_hit_rate"], width, color=strategy_color(name), label=name)
    replicas = max((len(t) for t in tables.values()), default=0)
    for ax in (load_ax, hit_ax):
        ax.set_xticks(range(replicas))
        ax.set_xlabel("replica")
        ax.grid(True, axis="y", alpha=0.3)
    load_ax.set_ylabel("tokens served (millions, prompt + output)")
    hit_ax.set_ylabel("adapter hit rate")
    hit_ax.set_ylim(0, 1.05)
    if tables:
        fig.legend(*load_ax.get_legend_handles_labels(), loc="lower center", ncol=len(tables), fontsize=8)
    summary = pd.read_csv(folder / "summary.csv") if (folder / "summary.csv").exists() else None
    if summary is not None and "router" in summary:
        load_ax.set_title(f"Load per replica ({summary['router'].iloc[0]} router)\n{title_line(summary)}", fontsize=10)
        hit_ax.set_title("Adapter hit rate per replica", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below
    return fig


# --- compression outputs ------------------------------------------------------------------------


COMPRESSION_FIELDS = ("mean_error", "max_error", "bytes_gpu", "bytes_uncompressed", "seconds")
COMPRESSION_META = ("rank", "method", "clusters")


def read_compression(folder: str | Path) -> pd.DataFrame:
    """One row per `lorabench compress` output found in `folder` (itself or its subfolders)."""
    folder = Path(folder)
    paths = sorted(folder.rglob("summary.json"))
    if not paths:
        raise LorabenchError(f"{folder}: no summary.json from `lorabench compress` in it or its subfolders")
    rows = []
    for path in paths:
        data = read_json(path)
        meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        row = {"path": str(path.parent)}
        for key in COMPRESSION_FIELDS + COMPRESSION_META:
            if key not in data and key not in meta:
                raise LorabenchError(f"{path}: missing field {key!r}")
            row[key] = data.get(key, meta.get(key))
        if row["clusters"] == "auto":
            row["clusters"] = chosen_clusters(path.parent / "metadata.json")
        rows.append(row)
    return pd.DataFrame(rows)


def chosen_clusters(metadata: Path) -> int:
    """With --clusters auto each module picks its own k: plot the modules' median."""
    modules = read_json(metadata).get("modules") if metadata.exists() else None
    if not modules or any("clusters" not in m for m in modules):
        raise LorabenchError(f"{metadata}: clusters 'auto' needs the modules' chosen clusters here")
    return int(np.median([m["clusters"] for m in modules]))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise LorabenchError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise LorabenchError(f"{path}: expected a JSON object")
    return data


def plot_compression(runs: pd.DataFrame) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, x, group, group_label in ((axes[0], "rank", "clusters", "clusters"),
                                      (axes[1], "clusters", "rank", "rank")):
        for (method, key), rows in runs.groupby(["method", group]):
            rows = rows.sort_values(x)
            line, = ax.plot(rows[x], rows["mean_error"], "o-", label=f"{method}, {group_label} {key} (mean)")
            ax.plot(rows[x], rows["max_error"], "v:", color=line.get_color(), label=f"{method}, {group_label} {key} (max)")
        ax.set_xscale("log", base=2)
        ticks = sorted(runs[x].unique())
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel("shared rank R" if x == "rank" else "number of clusters k")
        ax.set_ylabel("relative reconstruction error ||BA - U S V^T||² / ||BA||²")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ratio = runs["bytes_uncompressed"].sum() / max(runs["bytes_gpu"].sum(), 1)
    fig.suptitle(f"Joint compression error ({len(runs)} runs; mean GPU bytes {ratio:.1f}x smaller "
                 "than the uncompressed adapters)", fontsize=10)
    fig.tight_layout()
    return fig


# --- writing ------------------------------------------------------------------------------------


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write stem.png and stem.svg; return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def compression_source(folder: Path) -> Path:
    """Compress outputs live in the folder itself, or in a `compression/` folder of a sweep."""
    return folder / "compression" if (folder / "compression").is_dir() else folder


def make_chart(kind: str, folder: Path, table: pd.DataFrame | None, point: int | None = None) -> plt.Figure:
    if kind == "compression":
        return plot_compression(read_compression(compression_source(folder)))
    if kind == "cdf":
        return plot_cdf(table, folder, point)
    if kind == "capacity":
        capacity = read_capacity(folder)
        require_results(capacity, folder / "capacity.csv")
        return plot_capacity(capacity)
    if kind == "replicas":
        return plot_replicas(folder)
    return {"throughput": plot_throughput, "relative": plot_relative, "latency": plot_latency,
            "memory": plot_memory}[kind](table)


def available_kinds(folder: Path) -> tuple[str, ...]:
    """What `--kind all` draws: the sweep charts if there is a sweep.csv, compression if outputs exist,
    capacity if there is a capacity.csv."""
    kinds = SWEEP_KINDS if (folder / "sweep.csv").exists() else ()
    if any(compression_source(folder).rglob("summary.json")) and (not kinds or (folder / "compression").is_dir()):
        kinds += ("compression",)
    if (folder / "capacity.csv").exists():
        kinds += ("capacity",)
    if (folder / "replicas").is_dir():
        kinds += ("replicas",)
    return kinds or SWEEP_KINDS  # nothing found: let read_sweep say what is missing


def render(folder: str | Path, kind: str = "all", out: Path | None = None,
           point: int | None = None) -> dict[str, list[Path]]:
    """Render `kind` (or, for "all", every kind the folder has data for); return {kind: [png, svg]}.

    For one kind, `out` is the file stem (default FOLDER/charts/<kind>); for "all", a folder
    (default FOLDER/charts).
    """
    folder = Path(folder)
    if kind not in KINDS + ("all",):
        raise LorabenchError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}, all")
    kinds = available_kinds(folder) if kind == "all" else (kind,)
    table = read_sweep(folder)[0] if set(kinds) & set(SWEEP_KINDS) else None
    if table is not None:
        require_results(table, folder / "sweep.csv")
    if kind == "all":
        out_dir = Path(out) if out else folder / "charts"
        stems = {k: out_dir / k for k in kinds}
    else:
        stems = {kind: strip_suffix(Path(out)) if out else folder / "charts" / kind}
    return {k: save(make_chart(k, folder, table, point), stem) for k, stem in stems.items()}


def strip_suffix(path: Path) -> Path:
    return path.with_suffix("") if path.suffix.lower() in (".png", ".svg") else path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a sweep folder (or a folder of `lorabench compress` outputs, or "
                        "of `lorabench capacity`)")
    parser.add_argument("--kind", default="all", choices=KINDS + ("all",), help="which chart (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="file stem for one kind (writes .png and .svg), a folder for all "
                             "(default: FOLDER/charts)")
    parser.add_argument("--point", type=int, default=None,
                        help="number of adapters of the point the cdf chart shows (default: the largest "
                             "where every strategy ran)")


def main(args: argparse.Namespace) -> int:
    written = render(args.folder, args.kind, args.out, args.point)
    for kind, paths in written.items():
        print(f"{kind:12s} " + "  ".join(str(p) for p in paths))
    return 0
