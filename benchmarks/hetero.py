"""Heterogeneous zoos: FREE against random / average where the models differ.

* ``arch``: clients cycle through ``hetero_archs`` (Conv4 / ResNet-10 / ResNet-18, small widths on
  CPU), all on 32 px images. ``average`` can only average the Conv4 ones.
* ``domain``: Conv4 clients alternating between rendering domains: the glyphs rendered at 32 px
  and at 64 px (a different rendering of the same classes: other pixel grid, stroke and noise
  scale). The 64 px models see FREE's 32 px images bilinearly resized (``to_teacher_input``);
  ``average`` averages the 32 px Conv4 ones.

Each zoo's classes are drawn from the meta-train split with another seed than the main zoo. The
meta-learner is scored on the 32 px meta-test split with the same protocol and episodes as the
accuracy table (``hetero_eval_shots``).
"""

from __future__ import annotations

from benchmarks.accuracy import collect, run_method
from benchmarks.jobs import Job
from benchmarks.zoos import zoo_jobs

PLANS = ("arch", "domain")      # the client plans of benchmarks.zoos.hetero_plan


def jobs(p) -> list[Job]:
    out: list[Job] = []
    for plan in PLANS:
        out += zoo_jobs(p, plan, p.hetero_clients)
        for m in p.hetero_methods:
            out.append(Job(f"hetero:{plan}:{m}", run_method,
                           {"method": m, "zoo_job": f"zoo:{plan}", "iterations": p.hetero_iterations,
                            "shots": tuple(p.hetero_eval_shots), "tracking": False},
                           deps=(f"zoo:{plan}",), weight=8.0 if m.startswith("free") else 2.0))
    return out


def summarize(outcomes: dict, p) -> dict:
    sec: dict = {}
    for plan in PLANS:
        zo = outcomes.get(f"zoo:{plan}")
        if zo is None:
            continue
        entry: dict = {"methods": {}, "errors": {}}
        if zo.ok:
            reps = zo.result["reports"]
            mix: dict[str, int] = {}
            for r in reps:
                key = f"{r['arch']}-w{r['width']}@{r['image_size']}px"
                mix[key] = mix.get(key, 0) + 1
            entry["zoo"] = {"models": len(reps), "mix": mix,
                            "mean_client_holdout_accuracy": round(zo.result["mean_holdout_accuracy"], 4)}
        else:
            entry["errors"]["zoo"] = zo.error
        for m in p.hetero_methods:
            collect(entry, m, outcomes.get(f"hetero:{plan}:{m}"))
        sec[plan] = entry
    return sec
