#!/usr/bin/env bash
# The one device check of lorabench, on an H100 or an H200 within 8 minutes (or, without CUDA, its
# rehearsal on the CPU). Makes lorabench importable here without letting pip resolve anything (the
# GPU image has no network and a newer numpy than our pin), then runs scripts/gpu_check.py, which
# says what each phase does. Arguments go to gpu_check.py (--out, --only, --deadline-s, --list).
# On the device tool: command "scripts/gpu_check.sh", carry [".whl"] (README, "One GPU check").
set -uo pipefail
export LORABENCH_CHECK_STARTED=${LORABENCH_CHECK_STARTED:-$(date +%s)}  # the deadline counts from here
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Wheels of what the GPU image lacks (simpy), made by scripts/gpu_wheels.sh and carried in .whl:
# those whose package is not installed here go to a folder put on PYTHONPATH.
missing=()
for wheel in .whl/*.whl; do
    [[ -e $wheel ]] || continue
    name=$(basename "$wheel"); name=${name%%-*}
    "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null || missing+=("$wheel")
done
if ((${#missing[@]})); then
    site=$(mktemp -d -t lorabench-site.XXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${missing[@]}" \
        || { echo "gpu_check.sh: installing the carried wheels (${missing[*]}) failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# lorabench itself, without its dependencies (whatever extras pyproject.toml names). Where pip cannot
# build it, kernels/ and workloads/ are linked into lorabench/ for this run, as pyproject.toml maps them.
importable() { "$PY" -c "import importlib.util as u; exit(not (u.find_spec('lorabench.kernels') and u.find_spec('lorabench.workloads')))" 2>/dev/null; }
if ! importable; then
    pip_log=$(mktemp -t lorabench-pip.XXXX)
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . >"$pip_log" 2>&1; then
        echo "gpu_check.sh: pip could not install lorabench (see $pip_log); linking its folders instead"
        ln -s ../kernels lorabench/kernels && ln -s ../workloads lorabench/workloads
        trap 'rm -f lorabench/kernels lorabench/workloads' EXIT
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    importable || { echo "gpu_check.sh: lorabench is not importable" >&2; exit 1; }
fi

"$PY" scripts/gpu_check.py "$@"
