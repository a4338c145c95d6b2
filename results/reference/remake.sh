#!/usr/bin/env bash
# Remake a committed reference sweep: results/reference/remake.sh WORKLOAD (zipf, offline, ...).
# Modeled H200, Mistral-7B, every strategy, 1 to 4,096 adapters. Keeps the table, config, report and
# charts; the per-point run folders (tens of MB of CSVs) stay in a temporary folder.
set -euo pipefail
workload=${1:?usage: $0 WORKLOAD}
ref="$(dirname "$0")/h200-modeled-$workload"
tmp=$(mktemp -d)
lorabench sweep --workload "$workload" --n-loras 1,2,4,8,16,32,64,128,256,512,1024,2048,4096 \
    --strategy all --model mistral-7b --device h200 --executor modeled --out "$tmp/sweep" --no-progress
lorabench report "$tmp/sweep"
rm -rf "$ref"/{sweep.csv,config.json,report.md,charts} && mkdir -p "$ref"  # README.md is written by hand
cp -r "$tmp/sweep"/{sweep.csv,config.json,report.md,charts} "$ref"/
echo "remade $ref (run folders: $tmp/sweep/points)"
