"""Profile one FIVE step, the sequential loop against the batched step, with torch.profiler; then
time both with cuDNN's TF32 off and on, and with TF32 matmuls too. Not part of the harness: it
explains the batched section's GPU figures (benchmarks/results/gpu-h200/profile-full-T16.txt).

    python -m benchmarks.profile_batched [DEVICE [PRESET [T]]]     (defaults: cuda full 16)
"""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from benchmarks.presets import get_preset
from benchmarks.accuracy import free_config
from benchmarks.batched import _teachers, metagenerator
from free_dfml.server.batched_inversion import five_step
from free_dfml.server.meta_learner import MetaLearner, build_learner

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
preset = sys.argv[2] if len(sys.argv) > 2 else "full"
T = int(sys.argv[3]) if len(sys.argv) > 3 else 16
p = get_preset(preset)
cfg = free_config(p) if not p.batched_samples_per_class else free_config(p, samples_per_class=p.batched_samples_per_class)
learner = build_learner(cfg.way, width=cfg.learner_width, image_size=cfg.image_size, channels=cfg.channels,
                        rng=torch.Generator().manual_seed(0)).to(dev)
student = MetaLearner(learner, device=dev).student
teachers = _teachers(T, p.batched_width, cfg, dev, 0)
a, b = metagenerator(cfg, 1, dev), metagenerator(cfg, 1, dev)
seq = lambda: a.step(teachers, lambda_adv=1.0, student=student())
bat = lambda: five_step(b, teachers, lambda_adv=1.0, student_model=learner)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
for name, fn in (("sequential", seq), ("batched", bat)):
    fn(); fn(); sync()
    t0 = time.perf_counter(); fn(); sync(); dt = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn(); sync()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"=== {name}: {dt:.3f} s (T={T}, {preset})")
    print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70))
if dev.type == "cuda":
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        for name, fn in (("sequential", seq), ("batched", bat)):
            fn(); sync(); t0 = time.perf_counter(); fn(); fn(); sync()
            print(f"cudnn.allow_tf32={tf32} {name}: {(time.perf_counter() - t0) / 2:.3f} s")
    torch.backends.cuda.matmul.allow_tf32 = True
    for name, fn in (("sequential", seq), ("batched", bat)):
        fn(); sync(); t0 = time.perf_counter(); fn(); fn(); sync()
        print(f"matmul tf32 too, {name}: {(time.perf_counter() - t0) / 2:.3f} s")
