"""Time to accuracy (``--only time_to_accuracy``): meta-val 1-shot accuracy against cumulative
training wall-clock, each method capped at one budget; and the budget runner that the
``equal_time`` section shares.

A budget run (:func:`run_budget`) trains one method of the accuracy section (its FreeConfig, its
trainer or oracle loop, its zoo; :mod:`benchmarks.accuracy`) one unit at a time (an iteration; the
oracle: a MAML meta-batch) while the training seconds so far plus the mean unit so far stay within
``budget_s`` (so a unit starts only before the budget is spent; the last may overrun it by less
than one unit), and scores the meta-learner on meta-VAL (``evaluation.track_episodes`` 5-way 1-shot
episodes, the same for every method and seed) at 0 s and after the first unit past each mark:
``budget / 2^i`` (i < ``budget_halvings``) and ``budget * i / budget_linear``. The checkpoint kept is
the best meta-val point (the earliest of equals), never a meta-test one; it is then scored on the
meta-test split with the accuracy protocol (``evaluation.episodes``, every shot, episode seed
``evaluation.seed``: the same episodes for every method and seed). Tracking and scoring are not
training time. Names: the accuracy section's methods, and ``scratch-N`` (scratch inversion at N
steps a teacher).

Reported: the curve of every run in ``tta_runs`` (training seed ``study.seed``), the seconds each
first reaches each of ``tta_thresholds``, and for each scratch run the "sooner" factor: the seconds
it needs to first reach the best meta-val accuracy it reaches within the budget, over the seconds
``tta_runs[0]`` (``free``) needs to reach that accuracy (goals ``tta_goals``). A budget depends on
the machine's speed: the iterations each run reached are reported with it.
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.accuracy import method_setup, oracle_stepper, track_eval
from benchmarks.common import evaluate_learner, sync
from benchmarks.jobs import Ctx, Job
from benchmarks.report import _plt, _save, run_lines
from benchmarks.zoos import main_zoo_jobs
from free_dfml.server.baselines import random_learner
from free_dfml.server.trainer import FreeTrainer

TITLE = "Time to accuracy"
PLOT = "time_to_accuracy.png"


def run_spec(name: str) -> tuple[str, dict]:
    """The accuracy section's method and FreeConfig overrides a run name stands for."""
    steps = name.split("-", 1)[1] if name.startswith("scratch-") else ""
    if steps.isdigit() and int(steps) > 0:
        return "scratch", {"generator.scratch_steps": int(steps)}
    if name in ("random", "free", "free-noalign", "oracle"):
        return name, {}
    raise ValueError(f"unknown budget run {name!r} (random, free, free-noalign, oracle or scratch-N)")


def budget_marks(budget_s: float, halvings: int, linear: int) -> list[float]:
    """The training seconds after which meta-val is scored (ascending, the budget last)."""
    geo = [budget_s / 2 ** i for i in range(max(1, halvings))]
    lin = [budget_s * i / max(1, linear) for i in range(1, max(1, linear) + 1)]
    return sorted({round(x, 9) for x in geo + lin})


def run_budget(ctx: Ctx, deps: dict, *, name: str, seed: int, budget_s: float) -> dict:
    """One method trained within ``budget_s`` training seconds at training seed ``seed``; its
    meta-val curve, the checkpoint chosen on meta-val and that checkpoint's meta-test scores."""
    p = ctx.preset
    method, over = run_spec(name)
    device = torch.device(ctx.device)
    z = deps["zoo:main"]
    zoo, ds, cfg, norm = method_setup(ctx, z, method, **over, **{"schedule.seed": seed})
    val, test = ds.split("val"), ds.split("test")
    ev = p.study.evaluation
    curve: list[dict] = []
    best: dict = {"acc": -1.0}

    def track(learner, train_s: float, units: int) -> None:
        acc, ci = track_eval(learner, val, cfg, ev.track_episodes, device, seed=p.study.seed + 1000)
        curve.append({"train_s": round(train_s, 3), "units": units, "acc": acc, "ci95": ci})
        print(f"[budget] {name} seed {seed} {train_s:.1f} s ({units} units): meta-val 1-shot {100 * acc:.2f}",
              flush=True)
        if acc > best["acc"]:
            best.update(acc=acc, index=len(curve) - 1, state=copy.deepcopy(learner.state_dict()))

    step = None
    if method == "random":
        learner = random_learner(cfg, norm=norm).to(device)
    elif method == "oracle":
        learner, step = oracle_stepper(cfg, ds, z["classes"], norm, device)
    else:
        trainer = FreeTrainer(zoo, cfg, device=device)
        learner, step = trainer.learner, trainer.step
    track(learner, 0.0, 0)
    train_s, units, last_s = 0.0, 0, 0.0
    marks = budget_marks(budget_s, p.budget_halvings, p.budget_linear)
    while step is not None and units < p.budget_max_units and (units == 0 or train_s + train_s / units <= budget_s):
        t0 = time.perf_counter()
        step()
        sync(device)
        last_s = time.perf_counter() - t0
        train_s += last_s
        units += 1
        if marks and train_s >= marks[0]:
            marks = [m for m in marks if m > train_s]
            track(learner, train_s, units)
    if step is not None and curve[-1]["units"] != units:
        track(learner, train_s, units)
    learner.load_state_dict(best["state"])
    results = evaluate_learner(learner, test, way=cfg.learner.way, shots=ev.shots, episodes=ev.episodes,
                               steps=cfg.learner.adapt_steps, lr=cfg.learner.inner_lr, seed=ev.seed,
                               device=device, with_episodes=True)
    return {"name": name, "method": method, "seed": seed, "budget_s": budget_s, "train_s": round(train_s, 3),
            "units": units, "last_unit_s": round(last_s, 3), "curve": curve, "chosen": best["index"],
            "results": results}


def budget_job(p, name: str, seed: int) -> Job:
    return Job(f"budget:{name}:{seed}", run_budget, {"name": name, "seed": seed, "budget_s": p.budget_s},
               deps=("zoo:main",), weight=20.0 if name != "random" else 1.0)


def check(p) -> None:
    """A ValueError for settings this section cannot run with (before any work starts)."""
    for n in p.tta_runs:
        run_spec(n)
    if len(p.tta_goals) != len(p.tta_runs) - 1 or p.budget_s <= 0:
        raise ValueError(f"tta_goals needs one goal for each of tta_runs after the first ({list(p.tta_runs[1:])}), "
                         "and budget_s must be > 0")


def jobs(p) -> list[Job]:
    check(p)
    return main_zoo_jobs(p) + [budget_job(p, n, p.study.seed) for n in p.tta_runs]


def first_reach_s(curve: list[dict], acc: float) -> float | None:
    """The training seconds of the first curve point at or above ``acc``."""
    for c in curve:
        if c["acc"] >= acc - 1e-12:
            return c["train_s"]
    return None


def run_row(r: dict) -> dict:
    """A budget run without its per-episode accuracies (kept out of the JSON), with its chosen point."""
    res = {k: {x: y for x, y in v.items() if x != "accuracies"} for k, v in r["results"].items()}
    return {**{k: v for k, v in r.items() if k != "results"}, "results": res,
            "chosen_point": r["curve"][r["chosen"]]}


def outcome_rows(outcomes: dict, names, seed: int, errors: dict) -> dict[str, dict]:
    rows = {}
    for n in names:
        o = outcomes.get(f"budget:{n}:{seed}")
        if o is None:
            continue
        if o.ok:
            rows[n] = o.result
        else:
            errors[f"{n}:{seed}"] = o.error
    return rows


def summarize(outcomes: dict, p) -> dict:
    sec: dict = {"budget_s": p.budget_s, "seed": p.study.seed, "runs": {}, "errors": {},
                 "thresholds": list(p.tta_thresholds), "reach_s": {}, "sooner": []}
    rows = outcome_rows(outcomes, p.tta_runs, p.study.seed, sec["errors"])
    sec["runs"] = {n: run_row(r) for n, r in rows.items()}
    for n, r in rows.items():
        sec["reach_s"][n] = {str(t): first_reach_s(r["curve"], t) for t in p.tta_thresholds}
    lead = p.tta_runs[0]
    for ref, goal in zip(p.tta_runs[1:], p.tta_goals):
        if lead not in rows or ref not in rows:
            continue
        best = max(c["acc"] for c in rows[ref]["curve"])
        ref_s, lead_s = first_reach_s(rows[ref]["curve"], best), first_reach_s(rows[lead]["curve"], best)
        ratio = ref_s / lead_s if ref_s and lead_s else None
        sec["sooner"].append({"run": lead, "against": ref, "accuracy": best, "against_s": ref_s, "run_s": lead_s,
                              "ratio": ratio, "goal": goal, "met": None if ratio is None else ratio >= goal,
                              "note": None if ratio is not None else
                              ("never reached by " + lead if lead_s is None else "best at the start (0 s)")})
    return sec


def targets(sec: dict) -> list[dict]:
    return [{"target": f"time to {s['against']}'s best meta-val accuracy ({100 * s['accuracy']:.2f}%), "
                       f"{s['against']} / {s['run']}", "goal": f">= {s['goal']:g}x",
             "measured": s["ratio"], "met": s["met"]} for s in sec.get("sooner", [])]


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(sec: dict) -> str:
    L = [f"## {TITLE}", "", *run_lines(sec),
         f"Budget {sec['budget_s']:g} s of training wall-clock per method (training seed {sec['seed']}); "
         "meta-val 5-way 1-shot, the same episodes at every point and for every method.", "",
         "| method | iterations reached | training s | best meta-val 1-shot (%) | at s | "
         + " | ".join(f"s to {100 * t:.0f}%" for t in sec["thresholds"]) + " |",
         "|---|---|---|---|---|" + "---|" * len(sec["thresholds"])]
    for n, r in sec["runs"].items():
        c = r["chosen_point"]
        L.append(f"| {n} | {r['units']} | {r['train_s']:.1f} | {100 * c['acc']:.2f} | {c['train_s']:.1f} | "
                 + " | ".join(_acc(sec["reach_s"][n][str(t)]) for t in sec["thresholds"]) + " |")
    L += ["", "| run | against | accuracy (%) | against s | run s | sooner | goal |", "|---|---|---|---|---|---|---|"]
    for s in sec["sooner"]:
        ratio = f"{s['ratio']:.1f}x" if s["ratio"] is not None else f"n/a ({s['note']})"
        L.append(f"| {s['run']} | {s['against']} | {100 * s['accuracy']:.2f} | {_acc(s['against_s'])} | "
                 f"{_acc(s['run_s'])} | {ratio} | >= {s['goal']:g}x |")
    for k, e in sec["errors"].items():
        L.append(f"\n{k} failed: `{e.strip().splitlines()[-1] if e else '?'}`")
    return "\n".join(L) + "\n"


def plots(sec: dict, out) -> list[str]:
    if not sec.get("runs"):
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for n, r in sec["runs"].items():
        xs = [max(c["train_s"], 1e-2) for c in r["curve"]]
        ax.plot(xs, [100 * c["acc"] for c in r["curve"]], marker="o", ms=3, label=n)
    ax.set_xscale("log")
    _save(fig, ax, out / PLOT, title=f"Meta-val accuracy vs training time (budget {sec['budget_s']:g} s)",
          xlabel="training wall-clock s (log; 0 s drawn at 0.01)", ylabel="5-way 1-shot meta-val accuracy (%)")
    return [PLOT]
