#!/usr/bin/env bash
# The measured table of docs/privacy.md: the demo's clients 0, 1 and 2 (glyphs, 100 images a class,
# their 5 classes, 20% held out, seed 0, Conv4 width 32) trained without DP (20 epochs, Adam lr
# 0.003, and at free-sim's lr 0.01) and with DP at epsilon 1, 4 and 8 with free-client's
# DP recipe (the public stroke prior, DP-SGD on the head); for client 0 also without DP with
# --augment crop, and the plain recipe under DP at epsilon 8 (no prior, every layer, batches of 32).
# Each model is audited with the defaults. One thread.
# Usage: experiments/privacy_table.sh [OUT] [CLIENTS]   (default runs/privacy, "0 1 2")
set -euo pipefail
OUT=${1:-runs/privacy}
CLIENTS=${2:-0 1 2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
CLASSES=(1100,2316,71,1494,2127 742,1741,421,2297,1977 1625,2076,720,1256,142)  # common.partition.client_classes, seed 0
DEMO=(--width 32 --epochs 20 --lr 0.003)
for client in $CLIENTS; do
  DATA=(--data glyphs --images-per-class 100 --classes "${CLASSES[$client]}")
  runs="nodp nodp-lr01 dp8 dp4 dp1"
  [ "$client" = 0 ] && runs="$runs nodp-crop dp8-plain"
  for run in $runs; do
    case $run in
      nodp) args=("${DEMO[@]}") ;;
      nodp-crop) args=("${DEMO[@]}" --augment crop) ;;
      nodp-lr01) args=(--width 32 --epochs 20) ;;
      dp8-plain) args=("${DEMO[@]}" --prior none --train-layers all --batch-size 32 --optimizer adam --augment none
                       --dp-epsilon 8) ;;
      dp*) args=(--width 32 --dp-epsilon "${run#dp}") ;;
    esac
    name=c$client-$run
    [ -f "$OUT/$name.safetensors" ] || .venv/bin/free-client train "${DATA[@]}" "${args[@]}" --seed 0 \
        --out "$OUT/$name.safetensors"
    [ -f "$OUT/audit-$name/report.json" ] || .venv/bin/free-client audit --model "$OUT/$name.safetensors" \
        "${DATA[@]}" --out "$OUT/audit-$name"
  done
done
