#!/usr/bin/env bash
# Wheels of what lorabench needs and the GPU machines' image lacks, into .whl (ignored by git), for
# the device tool to carry: run(command="scripts/gpu_check.sh", carry=[".whl"]); gpu_check.sh installs
# them there with pip --no-index. The image's package list (the device tool's KINDS.md) has every
# dependency of lorabench but simpy. Name more packages as arguments (NAME or NAME==VERSION) when
# the check reports them missing; without a version, the one installed here is taken (the version
# the tests ran with), else the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
packages=(simpy "$@")
rm -rf .whl && mkdir .whl  # one version of each: two stop the install there
for name in "${packages[@]}"; do
    spec=$name
    if [[ $name != *==* ]]; then
        version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
        spec=$name${version:+==$version}
    fi
    # The GPU machines: x86-64, CPython 3.12 (a pure-Python wheel matches any of these platforms).
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl
