"""Batched multi-teacher inversion (``server/batched_inversion.py``) against the sequential loop.

For T same-architecture teachers (random-init Conv4 of ``batched_width``; timing does not depend on
what the weights are), two meta-generators start from the same seed; one runs
``MetaGenerator.step`` (a Python loop over teachers), the other
``batched_inversion.five_step`` (vmap over stacked teachers and generator copies), on the same
teachers, with the adversarial term against a meta-learner as in training. Both are timed
(median of ``batched_repeats`` after a warm-up) and their outputs compared: the largest absolute
difference of the recovered images, of the last-step gradients and of the meta-updated generator.
The speed-up is sequential time / batched time, measured in the same process, same run.

In float64 the two agree to ~1e-14 (tests/test_benchmarks.py). In float32 they may differ more
than rounding alone would explain: where the generator's sigmoid saturates to exactly 0 or 1,
a teacher sees constant patches, max-pooling windows hold exact ties, and the batched and the
plain max-pool kernels route the (equally valid) subgradient to different elements; Adam's
normalisation then carries the difference on. The table reports the float32 differences as
measured.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import peak_rss_mb, reset_peak_rss, sync
from benchmarks.jobs import Ctx, Job


def _teachers(T: int, width: int, cfg, device, seed: int):
    from free_dfml.common.models import Normalized, build_model
    from free_dfml.server.meta_generator import Teacher
    out = []
    for i in range(T):
        torch.manual_seed(seed * 10007 + i)
        net = build_model("conv4", num_classes=cfg.way, in_channels=cfg.channels,
                          image_size=cfg.image_size, width=width)
        model = Normalized(net, (0.5,) * cfg.channels, (0.3,) * cfg.channels).to(device).eval()
        for q in model.parameters():
            q.requires_grad_(False)
        out.append(Teacher(model, (cfg.channels, cfg.image_size, cfg.image_size), cfg.way, f"t{i}"))
    return out


def _diff(a, b) -> dict:
    img = max(float((x.images - y.images).abs().max()) for x, y in zip(a, b))
    grad = max(float((x.last_grads[k] - y.last_grads[k]).abs().max()) for x, y in zip(a, b)
               for k in x.last_grads)
    return {"images": img, "last_grads": grad}


def run(ctx: Ctx, deps: dict) -> dict:
    from benchmarks.accuracy import free_config
    from free_dfml.server.batched_inversion import five_step
    from free_dfml.server.meta_generator import MetaGenerator
    from free_dfml.server.meta_learner import MetaLearner, build_learner

    p = ctx.preset
    device = torch.device(ctx.device)
    cfg = free_config(p, samples_per_class=p.batched_samples_per_class) \
        if p.batched_samples_per_class else free_config(p)
    learner = build_learner(cfg.way, width=cfg.learner_width, image_size=cfg.image_size,
                            channels=cfg.channels, rng=torch.Generator().manual_seed(p.seed)).to(device)
    student = MetaLearner(learner, device=device).student

    def make_mg():
        return MetaGenerator(nz=cfg.nz, ngf=cfg.ngf, image_size=cfg.image_size, channels=cfg.channels,
                             inner_steps=cfg.inner_steps, inner_lr=cfg.gen_lr, z_lr=cfg.z_lr,
                             meta_lr=cfg.gen_meta_lr, betas=tuple(cfg.gen_betas),
                             samples_per_class=cfg.samples_per_class, lambda_bn=cfg.lambda_bn,
                             rng=torch.Generator().manual_seed(p.seed + 1), device=device)

    rows = []
    warmed = False
    for T in p.batched_T:
        teachers = _teachers(T, p.batched_width, cfg, device, p.seed)
        seq_mg, bat_mg = make_mg(), make_mg()
        if not warmed:   # first-call costs (allocator, kernels) out of the timings
            seq_mg.step(teachers[:2], lambda_adv=1.0, student=student())
            five_step(bat_mg, teachers[:2], lambda_adv=1.0, student_model=learner)
            warmed = True
        t_seq, t_bat, diffs = [], [], []
        rss_seq = rss_bat = None
        for _ in range(max(1, p.batched_repeats)):
            reset_peak_rss()
            sync(device)
            t0 = time.perf_counter()
            a = seq_mg.step(teachers, lambda_adv=1.0, student=student())
            sync(device)
            t_seq.append(time.perf_counter() - t0)
            rss_seq = peak_rss_mb()
            reset_peak_rss()
            t0 = time.perf_counter()
            b = five_step(bat_mg, teachers, lambda_adv=1.0, student_model=learner)
            sync(device)
            t_bat.append(time.perf_counter() - t0)
            rss_bat = peak_rss_mb()
            d = _diff(a, b)
            d["generator"] = max(float((x.detach() - y.detach()).abs().max()) for x, y in
                                 zip(seq_mg.generator.parameters(), bat_mg.generator.parameters()))
            diffs.append(d)
        ms, mb = statistics.median(t_seq), statistics.median(t_bat)
        row = {"T": T, "sequential_s": round(ms, 4), "batched_s": round(mb, 4),
               "speedup": round(ms / mb, 3), "max_abs_diff": {k: max(d[k] for d in diffs) for k in diffs[0]},
               "sequential_peak_rss_mb": round(rss_seq, 1) if rss_seq else None,
               "batched_peak_rss_mb": round(rss_bat, 1) if rss_bat else None}
        if device.type == "cuda":
            row["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        rows.append(row)
        del teachers, seq_mg, bat_mg
    return {"rows": rows, "device": str(device), "teacher": f"conv4 width {p.batched_width}",
            "images_per_teacher": cfg.way * cfg.samples_per_class, "inner_steps": cfg.inner_steps,
            "generator": {"nz": cfg.nz, "ngf": cfg.ngf}, "threads": torch.get_num_threads()}


def jobs(p) -> list[Job]:
    return [Job("batched", "benchmarks.batched:run", weight=3.0)]


def summarize(outcomes: dict, p) -> dict:
    o = outcomes.get("batched")
    if o is None:
        return {}
    return o.result if o.ok else {"error": o.error}
