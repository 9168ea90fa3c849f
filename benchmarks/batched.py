"""The batched inversion engines (``server/inversion_engine.py``) against the sequential loop.

For T same-architecture teachers (random-init Conv4 of ``batched_width``; timing does not depend on
what the weights are), three meta-generators start from the same seed; one runs
``MetaGenerator.step`` (a Python loop over teachers), one the ``grouped`` engine's ``five_step``
(grouped convolutions for these Conv4s), one the ``vmap`` engine's,
on the same teachers, with the adversarial term against a meta-learner as in training. The first step, from
identical states, is compared (largest absolute difference of the recovered images, of the
last-step gradients and of the meta-updated generator); the next ``batched_repeats`` steps are
timed (median), the three interleaved. The same comparison is repeated in float64 for 4 teachers,
with each engine. The speed-up is sequential time / batched time, measured in the same process,
same run.

In float64 the two agree to rounding (tests/test_benchmarks.py asserts 1e-9). In float32 the
batched kernels round differently (~1e-7 on the images), and that is enough to flip the teacher's
piecewise-linear decisions (which element wins a max-pool window, which side of a ReLU kink,
whether teacher and student argmaxes agree in L_adv) wherever two candidates are within rounding
of each other; the input gradient then changes discontinuously, and Adam's normalisation carries
the difference on (a direction with a ~0 gradient, such as the l1 bias shift that BatchNorm
removes, gets a +-lr step from noise alone). Both results are valid float32 evaluations of the
same function; the table reports the float32 differences as measured.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.accuracy import free_config
from benchmarks.common import peak_rss_mb, reset_peak_rss, sync
from benchmarks.jobs import Ctx, Job
from free_dfml.common.models import Normalized, build_model
from free_dfml.server.inversion_engine import get_engine
from free_dfml.server.meta_generator import MetaGenerator, Teacher
from free_dfml.server.meta_learner import MetaLearner, build_learner
from free_dfml.server.stacked_nets import nets_for


def _teachers(T: int, width: int, cfg, device, seed: int):
    out = []
    for i in range(T):
        torch.manual_seed(seed * 10007 + i)
        way, c, size = cfg.learner.way, cfg.learner.channels, cfg.learner.image_size
        net = build_model("conv4", num_classes=way, in_channels=c, image_size=size, width=width)
        model = Normalized(net, (0.5,) * c, (0.3,) * c).to(device).eval()
        for q in model.parameters():
            q.requires_grad_(False)
        out.append(Teacher(model, (c, size, size), way, f"t{i}"))
    return out


def _diff(a, b, gen_a, gen_b) -> dict:
    """Largest absolute differences between two FIVE steps' results (``a``, ``b``) and between the
    meta-updated generators they left behind."""
    img = max(float((x.images - y.images).abs().max()) for x, y in zip(a, b))
    grad = max(float((x.last_grads[k] - y.last_grads[k]).abs().max()) for x, y in zip(a, b)
               for k in x.last_grads)
    scale = max(float(x.last_grads[k].abs().max()) for x in a for k in x.last_grads)
    gen = max(float((x.detach() - y.detach()).abs().max()) for x, y in
              zip(gen_a.parameters(), gen_b.parameters()))
    return {"images": img, "last_grads": grad, "last_grads_scale": scale, "generator": gen}


def metagenerator(cfg, seed: int, device):
    """``MetaGenerator.from_config(cfg)`` with its random numbers seeded with ``seed``."""
    return MetaGenerator.from_config(cfg, rng=torch.Generator().manual_seed(seed), device=device)


def batched_config(p):
    """The FreeConfig this section times: the preset's, with ``batched_samples_per_class`` images a
    class when the preset sets it."""
    return free_config(p, generator={"samples_per_class": p.batched_samples_per_class}) \
        if p.batched_samples_per_class else free_config(p)


def run(ctx: Ctx, deps: dict) -> dict:
    p = ctx.preset
    device = torch.device(ctx.device)
    cfg, seed = batched_config(p), p.study.seed
    g, lrn = cfg.generator, cfg.learner
    learner = build_learner(lrn.way, width=lrn.width, image_size=lrn.image_size,
                            channels=lrn.channels, rng=torch.Generator().manual_seed(seed)).to(device)
    student = MetaLearner(learner, device=device).student

    def make_mg():
        return metagenerator(cfg, seed + 1, device)

    rows, engine = [], None
    for T in p.batched_T:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()     # the peak below is this T's alone
        teachers = _teachers(T, p.batched_width, cfg, device, seed)
        seq_mg, bat_mg, vmap_mg = make_mg(), make_mg(), make_mg()
        steps = _steps(seq_mg, bat_mg, vmap_mg, teachers, student, learner)
        # step 0, from identical states: the comparison (and the warm-up for this T's shapes)
        a, b = steps["seq"](), steps["bat"]()
        diff = _diff(a, b, seq_mg.generator, bat_mg.generator)
        engine = nets_for(teachers, bat_mg.generator, learner, prefer_grouped=True).name
        del a, b
        steps["vmap"]()
        times: dict[str, list[float]] = {k: [] for k in steps}
        rss: dict[str, float | None] = {k: None for k in steps}
        for _ in range(max(1, p.batched_repeats)):
            for k, fn in steps.items():          # interleaved, so a slow spell of the machine hits all three
                reset_peak_rss()
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
                rss[k] = peak_rss_mb()
        ms, mb, mv = (statistics.median(times[k]) for k in ("seq", "bat", "vmap"))
        row = {"T": T, "sequential_s": round(ms, 4), "batched_s": round(mb, 4),
               "speedup": round(ms / mb, 3), "vmap_s": round(mv, 4), "vmap_speedup": round(ms / mv, 3),
               "max_abs_diff": diff,
               "sequential_peak_rss_mb": round(rss["seq"], 1) if rss["seq"] else None,
               "batched_peak_rss_mb": round(rss["bat"], 1) if rss["bat"] else None}
        if device.type == "cuda":
            row["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        rows.append(row)
        del teachers, seq_mg, bat_mg, vmap_mg, steps
    f64 = {e: _float64_check(p, cfg, device, e) for e in ("grouped", "vmap")}
    return {"rows": rows, "float64_max_abs_diff": f64["grouped"], "float64_max_abs_diff_vmap": f64["vmap"],
            "engine": engine,
            "device": str(device), "teacher": f"conv4 width {p.batched_width}",
            "images_per_teacher": lrn.way * g.samples_per_class, "inner_steps": g.inner_steps,
            "generator": {"nz": g.nz, "ngf": g.ngf}, "threads": torch.get_num_threads()}


def _steps(seq_mg, bat_mg, vmap_mg, teachers, student, learner) -> dict:
    """One FIVE step each: the loop, the ``grouped`` engine and the ``vmap`` engine."""
    grouped, vmap = get_engine("grouped"), get_engine("vmap")
    return {"seq": lambda: seq_mg.step(teachers, lambda_adv=1.0, student=student()),
            "bat": lambda: grouped.five_step(bat_mg, teachers, lambda_adv=1.0, student_model=learner),
            "vmap": lambda: vmap.five_step(vmap_mg, teachers, lambda_adv=1.0, student_model=learner)}


def _float64_check(p, cfg, device, engine: str = "grouped") -> dict:
    """The same comparison in float64 (4 teachers, one FIVE step with L_adv, through ``engine``):
    rounding-level agreement."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        seed, g, lrn = p.study.seed, cfg.generator, cfg.learner
        teachers = _teachers(4, p.batched_width, cfg, device, seed + 7)
        learner = build_learner(lrn.way, width=lrn.width, image_size=lrn.image_size,
                                channels=lrn.channels, rng=torch.Generator().manual_seed(seed)).to(device)
        mgs = [MetaGenerator(nz=g.nz, ngf=g.ngf, image_size=lrn.image_size, channels=lrn.channels,
                             inner_steps=g.inner_steps, samples_per_class=min(4, g.samples_per_class),
                             inner_lr=g.lr, z_lr=g.z_lr, meta_lr=g.meta_lr, betas=tuple(g.betas),
                             rng=torch.Generator().manual_seed(seed + 1), device=device) for _ in range(2)]
        a = mgs[0].step(teachers, lambda_adv=1.0, student=MetaLearner(learner, device=device).student())
        b = get_engine(engine).five_step(mgs[1], teachers, lambda_adv=1.0, student_model=learner)
        return _diff(a, b, mgs[0].generator, mgs[1].generator)
    finally:
        torch.set_default_dtype(old)


def jobs(p) -> list[Job]:
    return [Job("batched", run, weight=3.0)]


def summarize(outcomes: dict, p) -> dict:
    o = outcomes.get("batched")
    if o is None:
        return {}
    return o.result if o.ok else {"error": o.error}
