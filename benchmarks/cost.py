"""Generation cost (``--only cost``): inversion seconds per iteration, FIVE against fresh generators.

The paper's own measure (its reference code sums the wall-clock time of synthesis). Three
:class:`~free_dfml.server.trainer.FreeTrainer`s on the main zoo run ``cost_iterations`` iterations
each (after one untimed iteration that loads the teachers), inversion only (the whole run is
warm-up: no L_adv, BELL or replay, since the probe is the inversion):

* ``five``: FIVE, k = ``generator.inner_steps`` steps a teacher from the meta-generator that the
  accuracy section's ``free`` job trained, with its meta-update;
* ``scratch-N`` for N in ``cost_scratch_steps``: a fresh generator a teacher, N steps.

Same zoo, same training seed, hence the same T teachers each iteration, the same m images per
class and the same loss code. Seconds are the trainer's own ``inversion_s`` (teacher access,
inversion, meta-update, memory bank). Beside the cost, the quality each reaches on the images it
recovers: the teacher's cross-entropy, its mean confidence in the target class and the share of
images it gives the target with confidence >= ``recovery_confidence``. The ratio: mean seconds of
the scratch run with the most steps over FIVE's (goal >= 20x).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from benchmarks import accuracy
from benchmarks.jobs import Ctx, Job
from benchmarks.recovery import agreement
from benchmarks.report import _plt, _save, run_lines
from free_dfml.server.inversion_engine import inversion_engine
from free_dfml.server.meta_generator import class_targets
from free_dfml.server.trainer import FreeConfig, FreeTrainer
from free_dfml.server.zoo import Zoo

PLOT = "generation_cost.png"


def quality(trainer: FreeTrainer, confidence: float) -> dict:
    """Teacher CE, mean target confidence and agreement on the last iteration's images."""
    ce, conf, agree = [], [], []
    with torch.no_grad():
        for mid, _, images in trainer.last_inversions:
            t = trainer._teacher(mid)
            y = class_targets(t.num_classes, len(images) // t.num_classes, images.device)
            logits = t.logits(images)
            ce.append(float(F.cross_entropy(logits, y)))
            conf.append(float(F.softmax(logits, 1).gather(1, y.view(-1, 1)).mean()))
            agree.append(agreement(logits, y, confidence))
    n = max(1, len(ce))
    return {"ce": sum(ce) / n, "confidence": sum(conf) / n, "agreement": sum(agree) / n}


def run(ctx: Ctx, deps: dict) -> dict:
    p = ctx.preset
    free = deps["acc:free"]
    n = p.cost_iterations
    base = FreeConfig.from_dict(free["config"]).replace(
        schedule={"warmup": n + 1, "iterations": n + 1, "seed": p.study.seed, "eval_every": 0})
    zoo = Zoo(deps["zoo:main"]["root"], cache_size=max(4, p.study.clients.count + 1))
    runs = {"five": base}
    if inversion_engine(base.generator.engine, ctx.device).name != "loop":   # a batched FIVE (GPU): the loop too
        runs["five-loop"] = base.replace(generator={"engine": "loop"})
    for steps in p.cost_scratch_steps:
        runs[f"scratch-{steps}"] = base.replace(generator={"inversion": "scratch", "scratch_steps": steps})
    out: dict = {"runs": {}, "k": base.generator.inner_steps, "T": base.schedule.teachers_per_iter,
                 "m": base.generator.samples_per_class, "iterations": n, "device": ctx.device}
    for name, cfg in runs.items():
        trainer = FreeTrainer(zoo, cfg, device=ctx.device)
        if name.startswith("five"):
            trainer.metagen.generator.load_state_dict(load_file(free["generator_path"], device=ctx.device))
        secs, q = [], []
        for i in range(n + 1):
            m = trainer.step()
            if i:                                        # the first loads the teachers
                secs.append(m["inversion_s"])
                q.append(quality(trainer, p.recovery_confidence))
        teachers = [mid for mid, _, _ in trainer.last_inversions]
        out["runs"][name] = {
            "steps": cfg.generator.inner_steps if name.startswith("five") else cfg.generator.scratch_steps,
            "engine": trainer.engine.name if name.startswith("five") else "loop (one generator a teacher)",
            "seconds": secs, "s_per_iteration": statistics.fmean(secs), "median_s": statistics.median(secs),
            **{k: statistics.fmean(x[k] for x in q) for k in ("ce", "confidence", "agreement")},
            "last_teachers": teachers, "images_per_teacher": len(trainer.last_inversions[0][2])}
    return out


def jobs(p) -> list[Job]:
    out = [j for j in accuracy.jobs(p) if j.name.startswith(("clients:main", "zoo:main")) or j.name == "acc:free"]
    out.append(Job("cost", run, deps=("zoo:main", "acc:free"), weight=30.0))
    return out


def summarize(outcomes: dict, p) -> dict:
    o = outcomes.get("cost")
    if o is None or not o.ok:
        return {"error": o.error} if o is not None else {}
    r = dict(o.result)
    five = r["runs"]["five"]["s_per_iteration"]
    r["ratios"] = {n: x["s_per_iteration"] / five for n, x in r["runs"].items() if n != "five"}
    if "five-loop" in r["runs"]:         # the same ratio against FIVE run by the loop engine
        r["ratios_loop"] = {n: x["s_per_iteration"] / r["runs"]["five-loop"]["s_per_iteration"]
                            for n, x in r["runs"].items() if n.startswith("scratch")}
    r["against"] = f"scratch-{max(p.cost_scratch_steps)}"
    return r


def targets(sec: dict) -> list[dict]:
    if not sec.get("ratios"):
        return []
    a = sec["against"]
    return [{"target": f"generation cost, {a} / FIVE seconds per iteration ({sec['device']})",
             "goal": ">= 20x", "measured": sec["ratios"][a], "met": sec["ratios"][a] >= 20}]


def markdown(sec: dict) -> str:
    L = ["## Generation cost", "", *run_lines(sec)]
    if "error" in sec:
        return "\n".join(L + ["failed:", "```", sec["error"][-2000:], "```", ""])
    loop = sec.get("ratios_loop") or {}
    L += [f"Inversion seconds per iteration on `{sec['device']}`, mean of {sec['iterations']} iterations: T = "
          f"{sec['T']} teachers, m = {sec['m']} images a class; FIVE's k = {sec['k']} steps from the trained "
          "meta-generator (with its meta-update) against a fresh generator a teacher. Quality on the images "
          "each recovers: the teacher's cross-entropy, its mean confidence in the target class, and the share "
          "it gives the target with confidence >= the recovery threshold.", "",
          "| method | steps a teacher | engine | s / iteration | median s | ratio to FIVE | teacher CE | "
          "confidence | agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for n, x in sec["runs"].items():
        ratio = sec["ratios"].get(n)
        vs_loop = f" ({loop[n]:.1f}x FIVE-loop)" if n in loop else ""
        L.append(f"| {n} | {x['steps']} | {x['engine']} | {x['s_per_iteration']:.3f} | {x['median_s']:.3f} | "
                 f"{'1' if ratio is None else f'{ratio:.1f}'}x{vs_loop} | {x['ce']:.3f} | {x['confidence']:.3f} | "
                 f"{x['agreement']:.3f} |")
    return "\n".join(L) + "\n"


def plots(sec: dict, out) -> list[str]:
    names = list(sec.get("runs") or ())
    if not names:
        return []
    fig, ax = _plt().subplots(figsize=(6.4, 3.6))
    ax.bar(names, [sec["runs"][n]["s_per_iteration"] for n in names], label="s / iteration")
    for i, n in enumerate(names):
        x = sec["runs"][n]
        ax.text(i, x["s_per_iteration"], f"CE {x['ce']:.2f}\nconf {x['confidence']:.2f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=4 * max(sec["runs"][n]["s_per_iteration"] for n in names))   # room for the labels
    _save(fig, ax, out / PLOT, title=f"Generation cost ({sec['device']}, T = {sec['T']}, m = {sec['m']})",
          xlabel=None, ylabel="inversion seconds per iteration (log)", grid=False)
    return [PLOT]
