#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, as one short script for a borrowed GPU machine whose
# python3 already has torch (and numpy, safetensors, matplotlib, fontTools) but not this project
# installed: the three source folders are put on the path as the free_dfml namespace package, which
# is what `pip install .` maps them to. Nothing here needs flwr or opacus.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1. batched inversion vs the sequential loop at the full preset's sizes (Conv4-64 teachers,
#    20 images a class, NGF 64) for T = 4, 16, 64;
# 2. the same at the quick preset's sizes (Conv4-16 teachers, 4 images a class, NGF 16);
# 3. the tiny preset, every section, on cuda (the harness's smoke test, on a GPU).
# Each step is bounded by `timeout`, so one that hangs does not cost the others.
set -u
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
shim=$(mktemp -d)
mkdir -p "$shim/free_dfml"
for p in common client server; do ln -s "$repo/$p" "$shim/free_dfml/$p"; done
export PYTHONPATH="$shim:$repo" PYTHONUNBUFFERED=1 FREE_DFML_CACHE="${FREE_DFML_CACHE:-$(mktemp -d)}"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}   # DEVICE=cpu: a dry run of the plumbing on a machine without a GPU
cd "$repo"
if [ "$dev" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
fi

work=$(mktemp -d)
step() {   # name, seconds, preset, args...
    local name=$1 secs=$2 preset=$3; shift 3
    local t0=$SECONDS
    timeout "$secs" $py -m benchmarks.run --preset "$preset" --device "$dev" --out "$work/$name" "$@" \
        >"$work/$name.log" 2>&1
    local rc=$?
    echo "[gpu_check] $name: rc $rc in $((SECONDS - t0)) s"
    tail -3 "$work/$name.log"
    cp "$work/$name/results.json" "$out/$name.json" 2>/dev/null
    cp "$work/$name/results.md" "$out/$name.md" 2>/dev/null
    [ $rc -eq 0 ] || cp "$work/$name.log" "$out/$name.log"
}
step full-batched ${T_FULL:-300} full --only batched
step quick-batched ${T_QUICK:-120} quick --only batched
step tiny ${T_TINY:-150} tiny
