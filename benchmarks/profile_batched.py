"""Profile one FIVE step, the sequential loop against the batched step (its two engines,
grouped-conv and vmap), with torch.profiler; then time them with cuDNN's TF32 off and on, with TF32
matmuls too, the grouped-conv engine with channels-last activations on the GPU, and all three under
bf16 autocast. Not part of the harness: it explains the batched section's GPU figures
(benchmarks/results/gpu-h200/).

    python -m benchmarks.profile_batched [DEVICE [PRESET [T]]]     (defaults: cuda full 16)
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.batched import _teachers, batched_config, metagenerator
from benchmarks.common import sync
from benchmarks.presets import get_preset


def _seconds(fn, device, repeats: int = 1) -> float:
    """Wall seconds per call of ``fn``, averaged over ``repeats`` calls after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main(device: str = "cuda", preset: str = "full", T: int = 16) -> None:
    from free_dfml.server.batched_inversion import five_step
    from free_dfml.server.meta_learner import MetaLearner, build_learner

    dev = torch.device(device)
    p = get_preset(preset)
    cfg = batched_config(p)
    learner = build_learner(cfg.way, width=cfg.learner_width, image_size=cfg.image_size,
                            channels=cfg.channels, rng=torch.Generator().manual_seed(0)).to(dev)
    student = MetaLearner(learner, device=dev).student
    teachers = _teachers(T, p.batched_width, cfg, dev, 0)
    seq_mg, bat_mg = metagenerator(cfg, 1, dev), metagenerator(cfg, 1, dev)
    vmap_mg = metagenerator(cfg, 1, dev)
    steps = {"sequential": lambda: seq_mg.step(teachers, lambda_adv=1.0, student=student()),
             "batched grouped-conv": lambda: five_step(bat_mg, teachers, lambda_adv=1.0, student_model=learner,
                                                       engine="grouped-conv"),
             "batched vmap": lambda: five_step(vmap_mg, teachers, lambda_adv=1.0, student_model=learner,
                                               engine="vmap")}
    cuda = dev.type == "cuda"
    for name, fn in steps.items():
        fn()                                      # a second warm-up (the first is in _seconds)
        dt = _seconds(fn, dev)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            sync(dev)
        print(f"=== {name}: {dt:.3f} s (T={T}, {preset})")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=22, max_name_column_width=70))
    if not cuda:
        return
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        for name, fn in steps.items():
            print(f"cudnn.allow_tf32={tf32} {name}: {_seconds(fn, dev, repeats=2):.3f} s")
    torch.backends.cuda.matmul.allow_tf32 = True
    for name, fn in steps.items():
        print(f"matmul tf32 too, {name}: {_seconds(fn, dev, repeats=2):.3f} s")
    torch.backends.cuda.matmul.allow_tf32 = False
    from free_dfml.server import grouped_nets
    plain = grouped_nets.cpu_layout
    grouped_nets.cpu_layout = lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    try:
        for name in ("sequential", "batched grouped-conv"):
            print(f"channels-last grouped layout, {name}: {_seconds(steps[name], dev, repeats=3):.3f} s")
    finally:
        grouped_nets.cpu_layout = plain
    # bf16 autocast (convolutions and matmuls in bfloat16, parameters, Adam and losses in float32):
    # other numerics than the float32 results the tests pin, so timing only, loop and batched alike
    for name, fn in steps.items():
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                print(f"bf16 autocast, {name}: {_seconds(fn, dev, repeats=3):.3f} s")
        except RuntimeError as e:                       # report and go on: this is a probe
            print(f"bf16 autocast, {name}: failed: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:2]), *[int(a) for a in args[2:3]])
