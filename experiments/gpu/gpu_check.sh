#!/usr/bin/env bash
# The batched-inversion GPU table of docs/benchmarks.md, as one short script for a borrowed GPU
# machine where the project is not installed (gpu_env.sh puts it on the path). Nothing here needs
# flwr or opacus.
#
#   bash experiments/gpu/gpu_check.sh OUTDIR
#
# 1. the harness's batched section (the loop, the grouped-conv engine and vmap, interleaved in one
#    process) at the full preset's sizes (Conv4-64 teachers, 20 images a class, NGF 64) for
#    T = 4, 16, 64;
# 2. the same at the quick preset's sizes (Conv4-16 teachers, 4 images a class, NGF 16);
# 3. the tiny preset, every section, on cuda (the harness's smoke test, on a GPU).
# Each step is bounded by `timeout`, so one that hangs does not cost the others.
set -u
out=$(realpath -m "${1:?usage: gpu_check.sh OUTDIR}")   # absolute: gpu_env.sh moves into the repository
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"

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
