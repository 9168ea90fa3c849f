#!/usr/bin/env bash
# Generation cost and time to accuracy (issue 23, measures 1 and 2) on a borrowed GPU machine, in one
# device call of at most 10 minutes: `benchmarks.run --only cost,time_to_accuracy` on a zoo trained
# beforehand on CPU and carried (gpu_env.sh puts the project, not installed there, on the path).
#
# Beforehand, on CPU (trains the preset's main zoo and keeps it; FREE_DFML_CACHE inside the carried
# folder so that the GPU machine does not render the glyphs again):
#
#   FREE_DFML_CACHE=runs/gpu-zoo/cache .venv/bin/python -m benchmarks.run --preset quick --workers 2 \
#       --only accuracy --set 'methods=["random"]' --set evaluation.episodes=1 --keep-work --out runs/gpu-zoo
#
# then, carrying runs/gpu-zoo:
#
#   FREE_DFML_CACHE=runs/gpu-zoo/cache bash experiments/gpu/gpu_cost_tta.sh runs/gpu-zoo/work OUTDIR
#
# One process: the accuracy section's `free` job (the meta-generator the cost section starts FIVE
# from), the cost section (5 timed iterations of FIVE, scratch-25 and scratch-200), then free /
# scratch-25 / scratch-200 each for BUDGET seconds of training (time_to_accuracy). The meta-test
# episodes are cut to EPISODES (measure 2 reads meta-val only; the chosen checkpoints' meta-test
# scores are a by-product here).
#
# Environment: BUDGET (75 s per method), EPISODES (100), LIMIT (560 s for the whole run), PRESET
# (quick), DEVICE (cuda; cpu with PRESET=tiny and a tiny zoo for a dry run of the plumbing), SETS
# (extra --set arguments, e.g. "--set cost_iterations=3").
set -u
zoo=$(realpath "${1:?usage: gpu_cost_tta.sh ZOO_WORK_DIR OUTDIR}")
out=$(realpath -m "${2:?usage: gpu_cost_tta.sh ZOO_WORK_DIR OUTDIR}")   # absolute: gpu_env.sh moves into the repository
mkdir -p "$out"
[ -n "${FREE_DFML_CACHE:-}" ] && export FREE_DFML_CACHE=$(realpath -m "$FREE_DFML_CACHE")
source "$(dirname "$0")/gpu_env.sh"
budget=${BUDGET:-75}; episodes=${EPISODES:-100}; lim=${LIMIT:-560}; preset=${PRESET:-quick}
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$lim" $py -m benchmarks.run --preset "$preset" --device "$dev" --workers 0 \
    --only cost,time_to_accuracy --set main_zoo="$zoo" --set budget_s="$budget" \
    --set evaluation.episodes="$episodes" ${SETS:-} --out "$out" >"$out/run.log" 2>&1
rc=$?
echo "[gpu_cost_tta] exit $rc after $((SECONDS - t0)) s"
grep -E "^\[budget\]|\[bench\] (cost|acc:free|budget).*(done|FAILED)|Error" "$out/run.log" | tail -n 40
[ -f "$out/cost.md" ] && cat "$out/cost.md"
[ -f "$out/time_to_accuracy.md" ] && cat "$out/time_to_accuracy.md"
exit $rc
