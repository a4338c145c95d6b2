"""`lorabench fidelity --vidur DIR --device D`: the cost model's per-layer error against Vidur-format
measurements.

For every (num_tokens, tensor-parallel size) row of DIR/compute/<D>/<model>/mlp.csv: the measured
time of one decoder layer's non-attention operations on one GPU (the sum of Vidur's ops), the
modeled time (lorabench.fidelity.vidur.compare), and modeled / measured - 1. Prints the mean absolute
percentage error per token bucket and tensor-parallel size, then per size with its worst bucket,
and the overall figure last; `--out` writes every row as CSV. Any model and device in Vidur's layout
works: the model's shape comes from the CSV's own columns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorabench.errors import LorabenchError
from lorabench.fidelity import vidur
from lorabench.outputs.results import write_csv_atomic
from lorabench.presets import DEVICES, device_preset
from lorabench.sim.costmodel import Efficiency, apply_profile, find_profile, load_profile, profile_physics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vidur", required=True, type=Path, metavar="DIR",
                   help="a folder in Vidur's layout: compute/<device>/<hf model>/mlp.csv")
    p.add_argument("--device", required=True, help=f"the device preset the measurements are of ({', '.join(DEVICES)}), "
                   "also the folder name under compute/")
    p.add_argument("--model", help="the model folder under compute/<device>/, e.g. meta-llama/Llama-2-7b-hf "
                   "(default: the only one)")
    p.add_argument("--profile", help="profile JSON for the device (default: results/profiles/<device>-vidur.json when "
                   "it exists); none = the preset's plain roofline")
    p.add_argument("--out", type=Path, help="write every row (tp, num_tokens, measured_ms, modeled_ms, error) as CSV")


def main(args: argparse.Namespace) -> int:
    device = device_preset(args.device)
    table = vidur.read_compute(vidur.compute_path(args.vidur, device.name, args.model), args.model)
    efficiency, physics = Efficiency(), None
    profile_path = None if args.profile == "none" else args.profile or find_profile(device.name, "vidur")
    if profile_path is not None:
        profile = load_profile(profile_path)
        device, efficiency = apply_profile(profile, device, efficiency)
        physics = profile_physics(profile)
    if args.out is not None and args.out.exists():
        raise LorabenchError(f"--out {args.out}: already exists; choose a new file")
    comparison = vidur.compare(table, device, efficiency, physics)
    how = (f"profile {profile_path}" if profile_path else "no profile") + (
        ": kernel physics" if physics is not None else ": plain roofline")
    print(f"{table.model.name} on {device.name}, one layer's non-attention operations per GPU, modeled ({how}) vs "
          f"measured ({table.source}); mean |modeled / measured - 1| per token bucket and tensor-parallel size:")
    print(vidur.bucket_table(comparison).map(vidur.percent).to_string())
    summary = vidur.error_summary(comparison)
    for row in summary.itertuples():
        print(f"tp {row.tp}: {row.rows} rows, MAPE {vidur.percent(row.mape)}, worst bucket {row.worst_bucket} tokens "
              f"{vidur.percent(row.worst_bucket_mape)}")
    if args.out is not None:
        write_csv_atomic(args.out, comparison)
        print(f"wrote {args.out}")
    print(f"MAPE over all {len(comparison)} rows: {vidur.percent(comparison['error'].abs().mean())}")
    return 0
