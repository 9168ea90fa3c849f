#!/usr/bin/env bash
# The measured table of docs/privacy.md: the demo's client 0 (glyphs, 100 images a class, its 5
# classes, 20% held out, seed 0, Conv4 width 32, 20 epochs, lr 0.003) trained without DP and with
# DP at epsilon 1, 4 and 8 (free-client's DP defaults otherwise), each audited with the defaults;
# plus the same client with --augment crop, and DP at epsilon 8 with the study's best recipe (RECIPE).
# One thread. Usage: experiments/privacy_table.sh [OUT]   (default runs/privacy)
set -euo pipefail
OUT=${1:-runs/privacy}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
C=1100,2316,71,1494,2127          # the demo's client 0 (common.partition.client_classes, seed 0)
DATA=(--data glyphs --images-per-class 100 --classes "$C")
DEMO=(--width 32 --epochs 20 --lr 0.003)
RECIPE=(--width 16 --batch-size 128 --optimizer sgd --lr 0.5 --epochs 40)
for run in nodp dp8 dp4 dp1 nodp-crop dp8r; do
  case $run in
    nodp) args=("${DEMO[@]}") ;;
    nodp-crop) args=("${DEMO[@]}" --augment crop) ;;
    dp8r) args=("${RECIPE[@]}" --dp-epsilon 8) ;;
    dp*) args=("${DEMO[@]}" --dp-epsilon "${run#dp}") ;;
  esac
  [ -f "$OUT/$run.safetensors" ] || .venv/bin/free-client train "${DATA[@]}" "${args[@]}" --seed 0 \
      --out "$OUT/$run.safetensors"
  [ -f "$OUT/audit-$run/report.json" ] || .venv/bin/free-client audit --model "$OUT/$run.safetensors" \
      "${DATA[@]}" --out "$OUT/audit-$run"
done
