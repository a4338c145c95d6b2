#!/usr/bin/env bash
# Remake a committed reference capacity search: results/reference/remake-capacity.sh [WORKLOAD] (default zipf).
# Modeled H200, Mistral-7B, every strategy, the run's default SLOs (p99 TTFT <= 2 s, p99 TPOT <= 100 ms);
# 1 to 4,096 adapters on one GPU, or for the cluster workload 10,000 adapters on 1 to 8 GPUs behind
# a least-loaded router (how many GPUs for 160 req/s). Keeps the tables, config and chart; the cached
# evaluations (one JSON per simulation) stay in a temporary folder.
set -euo pipefail
workload=${1:-zipf}
ref="$(dirname "$0")/h200-modeled-capacity-$workload"
tmp=$(mktemp -d)
case "$workload" in
    cluster) grid=(--n-loras 10000 --replicas 1,2,3,4,5,6,7,8 --router least-loaded --target-rate 160) ;;
    *) grid=(--n-loras 1,4,16,64,256,1024,4096) ;;
esac
lorabench capacity --workload "$workload" "${grid[@]}" --strategy all \
    --model mistral-7b --device h200 --executor modeled --jobs 2 --out "$tmp/capacity" --no-progress
rm -rf "$ref"/{capacity.csv,evaluations.csv,config.json,charts} && mkdir -p "$ref"  # README.md is written by hand
cp -r "$tmp/capacity"/{capacity.csv,evaluations.csv,config.json,charts} "$ref"/
echo "remade $ref (cached evaluations: $tmp/capacity/evaluations)"
