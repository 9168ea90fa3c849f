#!/usr/bin/env bash
# The batched-inversion engines on a borrowed GPU machine, as one short script (gpu_env.sh puts the
# project, not installed there, on the path).
#
#   bash benchmarks/gpu_engines.sh OUTDIR
#
# 1. the harness's batched section at the full preset's sizes (sequential loop, grouped-conv engine,
#    vmap engine, interleaved in one process; T = 4, 16, 64; float64 agreement on cuda);
# 2. the same at the quick preset's sizes;
# 3. torch.profiler tables and TF32 / channels-last / bf16-autocast timings at the full sizes, T = 16.
set -u
out=$(realpath -m "${1:?usage: gpu_engines.sh OUTDIR}")   # absolute: gpu_env.sh moves into the repository
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
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
