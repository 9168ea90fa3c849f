#!/usr/bin/env bash
# Recovery along training at the paper's sizes, on a borrowed GPU machine, as one short script
# (gpu_env.sh puts the project, not installed there, on the path). The zoo is trained beforehand (on
# CPU: `python -m experiments.recovery_curve --preset full --set clients=8 --set heldout_clients=4 ...`
# leaves it in OUT/work/zoo-main) and carried to the machine; its last 4 models are held out.
# Two runs side by side on the one GPU, each `experiments.recovery_curve --preset full` (FreeConfig
# `paper`: nz 256, ngf 64, m 20, Conv4-64 learner; 1000 scratch steps), one process each:
#
#   base:  the paper's FIVE inner step, gen_lr 1e-3
#   lr10:  gen_lr 1e-2 (the quick preset's choice, docs/findings.md)
#
# Both cap the MAML replay at REPLAY meta-batches an iteration (the paper config's cap is 100, about
# 27 used an iteration, 6 s on an H200), so that IT iterations fit the device time; the cap changes
# the meta-learner that L_adv plays against, not FIVE's own step.
#
#   bash experiments/gpu/gpu_paper_recovery.sh ZOO OUTDIR
#
# Environment: IT (160) iterations, EVERY (20) probe interval, REPLAY (5), LIMIT (seconds per run,
# 400), DEVICE (cuda; cpu with PRESET=tiny for a dry run of the plumbing), PRESET (full).
# Each run's log carries every checkpoint's figures, so a run that LIMIT stops still reports.
set -u
zoo=$(realpath "${1:?usage: gpu_paper_recovery.sh ZOO OUTDIR}")
out=$(realpath -m "${2:?usage: gpu_paper_recovery.sh ZOO OUTDIR}")   # absolute: gpu_env.sh moves into the repository
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
it=${IT:-160}; every=${EVERY:-20}; replay=${REPLAY:-5}; lim=${LIMIT:-400}; preset=${PRESET:-full}
t0=$SECONDS
for v in "base={\"max_replay_batches\": $replay}" "lr10={\"max_replay_batches\": $replay, \"gen_lr\": 0.01}"; do
    name=${v%%=*}
    timeout "$lim" $py -m experiments.recovery_curve --zoo "$zoo" --out "$out/$name" --preset "$preset" \
        --heldout 4 --iterations "$it" --every "$every" --device "$dev" --workers 0 --variant "$v" \
        >"$out/$name.log" 2>&1 &
done
wait
echo "[gpu_paper_recovery] both runs ended in $((SECONDS - t0)) s"
for name in base lr10; do
    rm -rf "$out/$name/work"
    grep -E "^\[recovery-curve\]|Error|error" "$out/$name.log" | tail -n 14
done
