#!/usr/bin/env bash
# The batched-inversion engines on a borrowed GPU machine, as one short script (see gpu_check.sh for
# the path shim: the machine's python3 has torch but not this project installed).
#
#   bash benchmarks/gpu_engines.sh OUTDIR
#
# 1. the harness's batched section at the full preset's sizes (sequential loop, grouped-conv engine,
#    vmap engine, interleaved in one process; T = 4, 16, 64; float64 agreement on cuda);
# 2. the same at the quick preset's sizes;
# 3. torch.profiler tables and TF32 / channels-last timings at the full sizes, T = 16.
set -u
out=${1:?usage: gpu_engines.sh OUTDIR}
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
shim=$(mktemp -d)
mkdir -p "$shim/free_dfml"
for p in common client server; do ln -s "$repo/$p" "$shim/free_dfml/$p"; done
export PYTHONPATH="$shim:$repo" PYTHONUNBUFFERED=1 FREE_DFML_CACHE="${FREE_DFML_CACHE:-$(mktemp -d)}"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
cd "$repo"
if [ "$dev" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
fi
work=$(mktemp -d)
bench() {   # name, seconds, preset
    local t0=$SECONDS
    timeout "$2" $py -m benchmarks.run --preset "$3" --device "$dev" --out "$work/$1" --only batched \
        >"$work/$1.log" 2>&1
    local rc=$?
    echo "[gpu_engines] $1: rc $rc in $((SECONDS - t0)) s"
    cp "$work/$1/results.json" "$out/$1.json" 2>/dev/null
    cp "$work/$1/results.md" "$out/$1.md" 2>/dev/null
    cp "$work/$1/batched_speedup.png" "$out/$1.png" 2>/dev/null
    [ $rc -eq 0 ] || cp "$work/$1.log" "$out/$1.log"
}
bench full-engines ${T_FULL:-200} full
bench quick-engines ${T_QUICK:-90} quick
t0=$SECONDS
timeout ${T_PROF:-120} $py -m benchmarks.profile_batched "$dev" full 16 >"$out/profile-full-T16-engines.txt" 2>&1
echo "[gpu_engines] profile: rc $? in $((SECONDS - t0)) s"
grep -E "^===|tf32|channels" "$out/profile-full-T16-engines.txt"
