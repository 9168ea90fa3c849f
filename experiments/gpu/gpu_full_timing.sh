#!/usr/bin/env bash
# What the `full` preset's pieces cost on a borrowed GPU machine, as one short script (gpu_env.sh puts
# the project, not installed there, on the path): the glyph splits rendered (IPC images a class), then
# the harness's accuracy section at the full preset's sizes on a small zoo for a few iterations:
# CL Conv4-64 clients (60 epochs), scratch / free / oracle for IT iterations (warm-up 1, so the
# iterations timed are real ones), OB oracle meta-batches, EP meta-test episodes (1-shot).
#
#   bash experiments/gpu/gpu_full_timing.sh OUTDIR       # env: IPC (100) CL (4) IT (5) OB (100) EP (100) LIM (230)
set -u
OUT=$(realpath -m "${1:?usage: gpu_full_timing.sh OUTDIR}")   # absolute: gpu_env.sh moves into the repository
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_env.sh"
t0=$SECONDS
$py -c "
from free_dfml.common.datasets import open_dataset
ds = open_dataset('glyphs', image_size=32, seed=0, images_per_class=${IPC:-100})
for s in ('train', 'val', 'test'): ds.split(s)
" 2>&1 | grep -v Warn
echo "[timing] render train/val/test at ${IPC:-100} a class: $((SECONDS - t0)) s, $(nproc) cores"
timeout ${LIM:-230} $py -m benchmarks.run --preset full --device $dev --only accuracy --set images_per_class=${IPC:-100} \
  --set clients=${CL:-4} --set heldout_clients=1 --set iterations=${IT:-5} --set oracle_batches=${OB:-100} \
  --set 'methods=["scratch","free","oracle"]' --set eval_episodes=${EP:-100} --set 'eval_shots=[1]' --set track_every=0 \
  --set 'free={"warmup": 1}' ${EXTRA:-} --out $OUT/full-timing > $OUT/full-timing.log 2>&1
echo "[timing] harness rc $? after $((SECONDS - t0)) s"
grep -E "done in|FAILED" $OUT/full-timing.log
