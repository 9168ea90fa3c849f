"""Accuracy table: every method on the same zoo, the same seeds and the same meta-test episodes.

Methods:

* ``random``: a fresh meta-learner (FREE's own initialisation), adapted at meta-test;
* ``average``: feature-layer average of the zoo's Conv4 models (``server.baselines.average_learner``);
* ``scratch``: a fresh generator per model, ``scratch_steps`` steps, then the same meta-learner
  training as FREE (``generator.inversion = "scratch"``: PURER / BiDf-MKD family);
* ``free-noalign``: FIVE + memory-bank replay, BELL's alignment step off (``bell.enabled = False``);
* ``free``: the full method;
* ``oracle``: MAML on the real images of the zoo's classes (NOT data-free: an upper bound), the
  ``server.baselines.train_oracle`` loop started from FREE's initialisation, with as many MAML
  meta-batches as FREE may replay (``iterations * replay.max_batches``).

Every method is scored with :func:`free_dfml.common.evaluation.evaluate` on the meta-test split:
``evaluation.episodes`` (600) episodes per shot setting, 15 queries, ``learner.adapt_steps`` (10)
SGD steps at ``learner.inner_lr``, episode seed ``evaluation.seed``: identical episodes for every method. Training time
excludes the meta-val tracking evaluations (the accuracy-vs-iterations curve).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import evaluate_learner, open_data, sync
from benchmarks.jobs import Ctx, Job
from benchmarks.presets import METHODS
from benchmarks.zoos import main_zoo_jobs
from free_dfml.common.datasets import to_float
from free_dfml.common.episodes import EpisodeSampler
from free_dfml.common.evaluation import evaluate
from free_dfml.server.baselines import average_learner, random_learner
from free_dfml.server.meta_learner import MetaLearner, zoo_normalisation
from free_dfml.server.trainer import FreeTrainer
from free_dfml.server.zoo import Zoo

LABELS = {
    "random": "random init",
    "average": "average of zoo models",
    "scratch": "scratch inversion + replay (PURER/BiDf-MKD family)",
    "free-noalign": "FREE without BELL alignment",
    "free": "FREE (FIVE + BELL + replay)",
    "oracle": "MAML on real data (not data-free)",
}


def free_config(p, **over):
    """The study's FreeConfig (every FREE-family method starts from it), with ``over`` applied."""
    return p.study.free.replace(**over)


def method_config(p, method: str, **over):
    if method == "scratch":
        return free_config(p, generator={"inversion": "scratch"}, **over)
    if method == "free-noalign":
        return free_config(p, bell={"enabled": False}, **over)
    return free_config(p, **over)


def track_eval(learner, val, cfg, episodes: int, device, seed: int | None = None) -> tuple[float, float]:
    """Meta-val 5-way 1-shot accuracy for the curve: same episodes (seed, default the training seed
    + 1000) at every point, every method."""
    lrn = cfg.learner
    r = evaluate(learner, val, way=lrn.way, shot=1, episodes=episodes, steps=lrn.adapt_steps,
                 lr=lrn.inner_lr, seed=cfg.schedule.seed + 1000 if seed is None else seed, device=device)
    return r.mean, r.ci95


def track_points(iterations: int, every: int) -> list[int]:
    if not every:
        return [iterations]
    pts = list(range(0, iterations, every)) + [iterations]
    return sorted(set(pts))


def zoo_norm(zoo, channels: int):
    return zoo_normalisation([zoo.meta(m) for m in sorted(zoo.ids())], channels) or \
        ((0.5,) * channels, (0.25,) * channels)


def method_setup(ctx: Ctx, zoo_result: dict, method: str, **over):
    """What a method's run starts from: the zoo (a zoo job's result), the data set, the method's
    FreeConfig with ``over`` applied, and the zoo's input normalisation."""
    s = ctx.preset.study
    zoo = Zoo(zoo_result["root"], cache_size=max(4, s.clients.count + 1))
    ds = open_data(s.data.dataset, image_size=s.data.image_size, seed=s.seed, images_per_class=s.data.images_per_class)
    cfg = method_config(ctx.preset, method, **over)
    return zoo, ds, cfg, zoo_norm(zoo, cfg.learner.channels)


def run_method(ctx: Ctx, deps: dict, *, method: str, zoo_job: str = "zoo:main",
               iterations: int | None = None, shots: tuple[int, ...] | None = None,
               save_generator: bool = False, tracking: bool = True) -> dict:
    p = ctx.preset
    device = torch.device(ctx.device)
    z = deps[zoo_job]
    ev = p.study.evaluation
    iterations = p.study.free.schedule.iterations if iterations is None else iterations
    zoo, ds, cfg, norm = method_setup(ctx, z, method, iterations=iterations)
    val, test = ds.split("val"), ds.split("test")
    curve: list[dict] = []
    extra: dict = {}
    train_s = 0.0
    track_s = 0.0

    def track(x: float, learner) -> None:
        nonlocal track_s
        if not (tracking and ev.track_every):
            return
        t0 = time.perf_counter()
        acc, ci = track_eval(learner, val, cfg, ev.track_episodes, device)
        track_s += time.perf_counter() - t0
        curve.append({"iteration": x, "acc": acc, "ci95": ci})
        # one line per point in the run's log, so that a run stopped early still shows its curve
        print(f"[track] {method} iteration {x}: meta-val 1-shot {100 * acc:.2f} +- {100 * ci:.2f}", flush=True)

    if method == "random":
        learner = random_learner(cfg, norm=norm).to(device)
        track(0, learner)
    elif method == "average":
        learner = average_learner([zoo.package(m) for m in zoo.ids()], cfg).to(device)
        track(0, learner)
    elif method in ("free", "free-noalign", "scratch"):
        trainer = FreeTrainer(zoo, cfg, device=device)
        for target in track_points(iterations, ev.track_every if tracking else 0):
            t0 = time.perf_counter()
            trainer.run(target, progress=False)
            sync(device)
            train_s += time.perf_counter() - t0
            track(target, trainer.learner)
        learner = trainer.learner
        h = trainer.history
        extra = {
            "inversion_s": round(sum(m["inversion_s"] for m in h), 2),
            "inversion_s_per_iteration": round(sum(m["inversion_s"] for m in h) / max(1, len(h)), 4),
            "replay_batches": int(sum(m.get("replay_batches", 0) for m in h)),
            "final_inversion_ce": h[-1]["inversion_ce"] if h else None,
            "iterations": trainer.iteration,
        }
        if save_generator:
            path = Path(ctx.work) / f"generator-{method}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in trainer.metagen.generator.state_dict().items()},
                      str(path))
            extra["generator_path"] = str(path)
            extra["config"] = cfg.to_dict()
    elif method == "oracle":
        learner, train_s, batches = _oracle(p, cfg, ds, z["classes"], norm, device, iterations, track)
        extra = {"meta_batches": batches, "classes": len(z["classes"])}
    else:
        raise ValueError(f"unknown method {method!r}")

    results = evaluate_learner(learner, test, way=cfg.learner.way, shots=shots or ev.shots,
                               episodes=ev.episodes, steps=cfg.learner.adapt_steps, lr=cfg.learner.inner_lr,
                               seed=ev.seed, device=device)
    return {"method": method, "results": results, "train_s": round(train_s, 2),
            "eval_s": round(sum(r["eval_s"] for r in results.values()), 2),
            "track_s": round(track_s, 2), "curve": curve, **extra}


def _oracle(p, cfg, ds, classes, norm, device, iterations, track):
    """``baselines.train_oracle``'s loop (same MetaLearner, same episode sampler) from FREE's
    initialisation, tracked at iteration-equivalent points (meta-batches / replay.max_batches)."""
    learner, step = oracle_stepper(cfg, ds, classes, norm, device)
    total = p.oracle_meta_batches(cfg.replay.max_batches)
    per_it = total / max(1, iterations)
    marks = {max(0, round(pt * per_it)): pt for pt in track_points(iterations, p.study.evaluation.track_every)}
    train_s = 0.0
    if 0 in marks:
        track(0, learner)
    for b in range(1, total + 1):
        t0 = time.perf_counter()
        step()
        sync(device)
        train_s += time.perf_counter() - t0
        if b in marks:
            track(marks[b], learner)
    return learner, train_s, total


def oracle_stepper(cfg, ds, classes, norm, device):
    """The oracle's learner (FREE's initialisation) and a function that runs one MAML meta-batch of
    real meta-train episodes of ``classes`` on it (``baselines.train_oracle``'s loop)."""
    rep, way = cfg.replay, cfg.learner.way
    learner = random_learner(cfg, norm=norm).to(device)
    meta = MetaLearner(learner, rep, way=way, inner_lr=cfg.learner.inner_lr, device=device)
    sampler = EpisodeSampler(ds.subset("train", classes), way=way, shot=rep.shot, query=rep.query,
                             seed=cfg.schedule.seed)

    def step() -> None:
        meta.maml_step([(to_float(e.support_x), e.support_y, to_float(e.query_x), e.query_y)
                        for e in sampler.take(rep.meta_batch)])
    return learner, step


def jobs(p) -> list[Job]:
    weights = {"scratch": 50.0, "free": 10.0, "free-noalign": 9.0, "oracle": 4.0, "random": 2.0,
               "average": 2.0}
    out = main_zoo_jobs(p)
    for m in p.methods:
        out.append(Job(f"acc:{m}", run_method,
                       {"method": m, "save_generator": m == "free"}, deps=("zoo:main",),
                       weight=weights[m]))
    return out


def collect(sec: dict, method: str, outcome, **extra) -> None:
    """One method's outcome into ``sec["methods"]`` (without what only the run's work folder
    needed: its config, the generator path) or its error into ``sec["errors"]``."""
    if outcome is None:
        return
    if not outcome.ok:
        sec["errors"][method] = outcome.error
        return
    r = {k: v for k, v in outcome.result.items() if k not in ("config", "generator_path")}
    sec["methods"][method] = {**r, **extra}


def summarize(outcomes: dict, p) -> dict:
    zoo = outcomes.get("zoo:main")
    sec: dict = {"methods": {}, "errors": {}}
    if zoo is not None and zoo.ok:
        z = zoo.result
        sec["zoo"] = {"models": len(z["reports"]), "heldout": len(z["heldout"]),
                      "mean_client_holdout_accuracy": round(z["mean_holdout_accuracy"], 4),
                      "client_train_s": z["train_s"], "classes": len(z["classes"])}
    for m in METHODS:
        collect(sec, m, outcomes.get(f"acc:{m}"), label=LABELS[m])
    ev = p.study.evaluation
    sec["protocol"] = {"episodes": ev.episodes, "query": 15, "adapt_steps": 10,
                       "eval_seed": ev.seed, "shots": list(ev.shots), "way": 5}
    return sec
