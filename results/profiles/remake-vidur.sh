#!/usr/bin/env bash
# Refit the shipped kernel-physics profiles of the h100 and a100 presets from Vidur's measurements
# (results/profiles/vidur-llama-2-7b/, README.md there) and print their fidelity. About 30 s on a
# 2-core CPU; no GPU needed. Run from the repository root.
set -euo pipefail
for device in h100 a100; do
    lorabench profile --from-vidur results/profiles/vidur-llama-2-7b --device "$device" \
        --out "results/profiles/$device-vidur.json"
    lorabench fidelity --vidur results/profiles/vidur-llama-2-7b --device "$device" \
        --profile "results/profiles/$device-vidur.json"
done
