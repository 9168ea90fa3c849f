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

from benchmarks.common import client_plan, open_data
from benchmarks.jobs import Job

PLANS = ("arch", "domain")


def hetero_plan(p, plan: str):
    ds = open_data(p.dataset, image_size=p.image_size, seed=p.seed, images_per_class=p.images_per_class)
    n_cls = len(ds.classes("train"))
    if plan == "arch":
        return client_plan(n_cls, p.hetero_clients, p.classes_per_client, p.seed + 101,
                           archs=p.hetero_archs, widths=p.hetero_widths, image_sizes=(p.image_size,),
                           epochs=p.client_epochs)
    if plan == "domain":
        return client_plan(n_cls, p.hetero_clients, p.classes_per_client, p.seed + 202,
                           archs=("conv4",), widths=(p.client_width,), image_sizes=p.hetero_image_sizes,
                           epochs=p.client_epochs)
    raise ValueError(f"unknown hetero plan {plan!r}")


def jobs(p) -> list[Job]:
    from benchmarks.zoos import zoo_jobs
    out: list[Job] = []
    for plan in PLANS:
        out += zoo_jobs(p, plan, p.hetero_clients)
        for m in p.hetero_methods:
            out.append(Job(f"hetero:{plan}:{m}", "benchmarks.accuracy:run_method",
                           {"method": m, "zoo_job": f"zoo:{plan}", "iterations": p.hetero_iterations,
                            "shots": tuple(p.hetero_eval_shots), "tracking": False},
                           deps=(f"zoo:{plan}",), weight=8.0 if m.startswith("free") else 2.0))
    return out


def summarize(outcomes: dict, p) -> dict:
    from benchmarks.accuracy import collect
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
