#!/usr/bin/env bash
# Does a bigger zoo raise FREE's plateau? On a borrowed GPU machine, as one short script (gpu_env.sh
# puts the project, not installed there, on the path). Two harness runs side by side on one GPU, same
# seed, same quick-preset sizes, same iterations, same evaluation episodes:
#
#   zoo100: clients=100 (500 of the 2364 meta-train classes): random, free-noalign, free, oracle
#   zoo20:  the quick preset's 20 clients (100 classes; the first 20 clients of zoo100): random, free
#
#   bash experiments/gpu/gpu_zoo_size.sh OUTDIR
#
# Environment: SEED (1), ITERATIONS (500), LIMIT (seconds per run, 500), PRESET (quick; tiny for a
# dry run of the plumbing with DEVICE=cpu), CLIENTS (100). Each run's log (with its [track] lines:
# meta-val accuracy every 100 iterations) comes back even when LIMIT stops it.
set -u
out=$(realpath -m "${1:?usage: gpu_zoo_size.sh OUTDIR}")   # absolute: gpu_env.sh moves into the repository
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
work=$(mktemp -d)
seed=${SEED:-1}; it=${ITERATIONS:-500}; lim=${LIMIT:-500}; preset=${PRESET:-quick}; big=${CLIENTS:-100}
common=(--preset "$preset" --seed "$seed" --device "$dev" --only accuracy --set iterations="$it"
        --set track_every=100 --set track_episodes=100 --set threads_per_worker=2)
t0=$SECONDS
timeout "$lim" $py -m benchmarks.run "${common[@]}" --workers 4 --set clients="$big" \
    --set 'methods=["random","free-noalign","free","oracle"]' --out "$work/zoo$big" >"$out/zoo$big.log" 2>&1 &
timeout "$lim" $py -m benchmarks.run "${common[@]}" --workers 2 \
    --set 'methods=["random","free"]' --out "$work/zoo20" >"$out/zoo20.log" 2>&1 &
wait
echo "[gpu_zoo_size] both runs ended in $((SECONDS - t0)) s"
for r in "zoo$big" zoo20; do
    for f in results.json results.md accuracy_vs_iterations.png; do
        cp "$work/$r/$f" "$out/$r-$f" 2>/dev/null
    done
    grep -E "^\| (random|free|oracle)|track\]|done in|FAILED" "$out/$r.log" | tail -n 30
done
