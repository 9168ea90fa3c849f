"""Recovery speed: how fast FIVE's meta-initialised generator and a from-scratch generator recover
images that a held-out model recognises.

Teacher agreement = the fraction of generated images that the teacher classifies as their target
class with confidence >= ``recovery_confidence`` (0.9). For each held-out zoo model (never used in
FREE's training), starting from the same latents and targets, both generators run the inversion
loop of :func:`free_dfml.server.meta_generator.invert` (Adam, lr / z_lr / betas of the FreeConfig,
CE loss; no adversarial term: there is no meta-learner in this probe), and the agreement is
recorded after every step. Reported:

* for each target agreement (0.5 / 0.8 / 0.9): the steps and seconds each needs, and the ratio;
* the FIVE operating point: the agreement FIVE reaches in its ``k`` inner steps, and the steps /
  seconds a scratch generator needs to reach that same agreement on the same model.

Steps are generator updates; a FIVE that is already there at step 0 counts as 1 step in ratios.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.func import functional_call

from benchmarks import accuracy
from benchmarks.common import sync
from benchmarks.jobs import Ctx, Job
from free_dfml.server.generator import Generator
from free_dfml.server.meta_generator import (AdamState, Teacher, adam_update, class_targets, new_generator,
                                             sample_latents)
from free_dfml.server.trainer import FreeConfig
from free_dfml.server.zoo import Zoo


def agreement(logits: torch.Tensor, y: torch.Tensor, confidence: float) -> float:
    p = F.softmax(logits.detach(), 1).gather(1, y.view(-1, 1)).squeeze(1)
    return float((p >= confidence).float().mean())


def trace(teacher, generator, params, z, y, *, steps: int, cfg, confidence: float, device) -> dict:
    """``invert``'s loop (same Adam arithmetic), recording agreement and time after every update."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    z = z.detach().clone().requires_grad_(True)
    state = AdamState()
    lrs = {**{k: cfg.generator.lr for k in params}, "__z__": cfg.generator.z_lr}
    agree, ce, secs = [], [], [0.0]
    sync(device)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for s in range(steps + 1):
            x = functional_call(generator, params, (z,))
            logits = teacher.logits(x)
            loss = F.cross_entropy(logits, y)
            agree.append(agreement(logits, y, confidence))
            ce.append(float(loss.detach()))
            if s == steps:
                break
            grads = torch.autograd.grad(loss, [*params.values(), z])
            both = adam_update({**params, "__z__": z},
                               {**{k: g.detach() for k, g in zip(params, grads[:-1])},
                                "__z__": grads[-1].detach()}, state, lr=lrs,
                               betas=tuple(cfg.generator.betas))
            z = both.pop("__z__")
            params = both
            sync(device)
            secs.append(time.perf_counter() - t0)
    return {"agreement": agree, "ce": ce, "seconds": secs}


def first_reach(curve: list[float], target: float) -> int | None:
    for s, a in enumerate(curve):
        if a >= target - 1e-12:
            return s
    return None


def held_out_probe(zoo, model_id: str, index: int, cfg, seed: int, device):
    """What the probe uses for the ``index``-th held-out model: (teacher, targets, latents, a fresh
    generator), the latents and generator drawn from a generator seeded by ``seed`` and ``index``."""
    meta = zoo.meta(model_id)
    teacher = Teacher(zoo.teacher(model_id, device), tuple(meta.input_shape), meta.num_classes, model_id)
    rng = torch.Generator().manual_seed(seed * 1000 + 17 + index)
    g, lrn = cfg.generator, cfg.learner
    y = class_targets(meta.num_classes, g.samples_per_class, device)
    z = sample_latents(len(y), g.nz, rng, device)
    fresh = new_generator(g.nz, g.ngf, lrn.image_size, lrn.channels, rng, device)
    return teacher, y, z, fresh


def run(ctx: Ctx, deps: dict) -> dict:
    p = ctx.preset
    device = torch.device(ctx.device)
    free = deps["acc:free"]
    cfg = FreeConfig.from_dict(free["config"])
    g, lrn = cfg.generator, cfg.learner
    meta_gen = Generator(nz=g.nz, ngf=g.ngf, image_size=lrn.image_size, channels=lrn.channels).to(device)
    meta_gen.load_state_dict(load_file(free["generator_path"]))
    phi = {k: v.detach() for k, v in meta_gen.named_parameters()}
    held = Zoo(deps["zoo:main"]["heldout_root"])
    ids = held.ids()[: p.recovery_models]
    if not ids:
        raise RuntimeError("no held-out models for the recovery benchmark")
    k = g.inner_steps
    models = []
    for i, mid in enumerate(ids):
        teacher, y, z, fresh = held_out_probe(held, mid, i, cfg, p.study.seed, device)
        five = trace(teacher, meta_gen, phi, z, y, steps=p.recovery_five_steps, cfg=cfg,
                     confidence=p.recovery_confidence, device=device)
        scratch = trace(teacher, fresh, dict(fresh.named_parameters()), z, y,
                        steps=p.recovery_scratch_steps, cfg=cfg, confidence=p.recovery_confidence,
                        device=device)
        entry = {"model_id": mid, "five": five, "scratch": scratch, "targets": {}}
        for tgt in p.recovery_targets:
            fs, ss = first_reach(five["agreement"], tgt), first_reach(scratch["agreement"], tgt)
            entry["targets"][str(tgt)] = {
                "five_steps": fs, "scratch_steps": ss,
                "five_s": None if fs is None else five["seconds"][fs],
                "scratch_s": None if ss is None else scratch["seconds"][ss]}
        a_k = five["agreement"][min(k, len(five["agreement"]) - 1)]
        ss = first_reach(scratch["agreement"], a_k)
        entry["operating_point"] = {
            "k": k, "five_agreement": a_k, "five_s": five["seconds"][min(k, len(five["seconds"]) - 1)],
            "scratch_steps": ss, "scratch_s": None if ss is None else scratch["seconds"][ss],
            "scratch_final_agreement": scratch["agreement"][-1]}
        models.append(entry)
    return {"models": models, "k": k, "confidence": p.recovery_confidence,
            "five_steps_max": p.recovery_five_steps, "scratch_steps_max": p.recovery_scratch_steps,
            "samples_per_class": g.samples_per_class}


def _ratio(num: list, den: list) -> float | None:
    if not num or not den:
        return None
    return (sum(num) / len(num)) / max(1e-12, sum(den) / len(den))


def summarize(outcomes: dict, p) -> dict:
    o = outcomes.get("recovery")
    if o is None:
        return {}
    if not o.ok:
        return {"error": o.error}
    r = o.result
    models = r["models"]
    out: dict = {"models": len(models), "k": r["k"], "confidence": r["confidence"],
                 "five_steps_max": r["five_steps_max"], "scratch_steps_max": r["scratch_steps_max"],
                 "targets": {}}
    for tgt in p.recovery_targets:
        rows = [m["targets"][str(tgt)] for m in models]
        both = [x for x in rows if x["five_steps"] is not None and x["scratch_steps"] is not None]
        out["targets"][str(tgt)] = {
            "models_reached_five": sum(x["five_steps"] is not None for x in rows),
            "models_reached_scratch": sum(x["scratch_steps"] is not None for x in rows),
            "five_steps_mean": _mean([x["five_steps"] for x in both]),
            "scratch_steps_mean": _mean([x["scratch_steps"] for x in both]),
            "five_s_mean": _mean([x["five_s"] for x in both]),
            "scratch_s_mean": _mean([x["scratch_s"] for x in both]),
            "steps_ratio": _ratio([x["scratch_steps"] for x in both], [max(1, x["five_steps"]) for x in both]),
            "seconds_ratio": _ratio([x["scratch_s"] for x in both],
                                    [max(x["five_s"], _step_s(m["five"])) for x, m in
                                     zip(rows, models) if x["five_steps"] is not None
                                     and x["scratch_steps"] is not None]),
        }
    ops = [m["operating_point"] for m in models]
    reached = [o_ for o_ in ops if o_["scratch_steps"] is not None]
    out["operating_point"] = {
        "k": r["k"], "five_agreement_mean": _mean([o_["five_agreement"] for o_ in ops]),
        "models_scratch_reached": len(reached),
        "scratch_steps_mean": _mean([o_["scratch_steps"] for o_ in reached]),
        "five_s_mean": _mean([o_["five_s"] for o_ in reached]),
        "scratch_s_mean": _mean([o_["scratch_s"] for o_ in reached]),
        "steps_ratio": _ratio([o_["scratch_steps"] for o_ in reached], [r["k"]] * len(reached)),
        "seconds_ratio": _ratio([o_["scratch_s"] for o_ in reached], [o_["five_s"] for o_ in reached]),
        "scratch_final_agreement_mean": _mean([o_["scratch_final_agreement"] for o_ in ops]),
    }
    n5 = min(len(m["five"]["agreement"]) for m in models)
    ns = min(len(m["scratch"]["agreement"]) for m in models)
    out["curves"] = {
        "five": [_mean([m["five"]["agreement"][s] for m in models]) for s in range(n5)],
        "scratch": [_mean([m["scratch"]["agreement"][s] for m in models]) for s in range(ns)],
        "five_step_s": _mean([_step_s(m["five"]) for m in models]),
        "scratch_step_s": _mean([_step_s(m["scratch"]) for m in models]),
    }
    return out


def _step_s(tr: dict) -> float:
    s = tr["seconds"]
    return s[-1] / max(1, len(s) - 1)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def jobs(p) -> list[Job]:
    out = [j for j in accuracy.jobs(p) if j.name.startswith(("clients:main", "zoo:main")) or j.name == "acc:free"]
    out.append(Job("recovery", run, deps=("zoo:main", "acc:free"), weight=3.0))
    return out
