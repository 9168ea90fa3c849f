"""Jobs that train the client models and write them into zoos (``Zoo.add``, as the server does).

The plans (which client models a zoo holds):

* ``main``: ``clients`` Conv4 models (FREE's zoo) plus ``heldout_clients`` more over other classes
  (the recovery benchmark's held-out models);
* ``arch`` and ``domain``: the heterogeneous zoos of :mod:`benchmarks.hetero`.

Client training is split over ``workers`` chunk jobs, then one job adds the packages to the zoo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.common import add_packages, client_plan, open_data, plan_hash, train_clients
from benchmarks.jobs import Ctx, Job
from free_dfml.server.zoo import Zoo


def main_plan(p):
    s = p.study
    ds = open_data(s.data.dataset, image_size=s.data.image_size, seed=s.seed, images_per_class=s.data.images_per_class)
    n_cls = len(ds.classes("train"))   # class names only: nothing rendered or loaded
    return client_plan(n_cls, s.clients.count + p.heldout_clients, s.clients.classes_per_client, s.seed,
                       widths=(s.clients.width,), image_sizes=(s.data.image_size,), epochs=s.clients.epochs)


def hetero_plan(p, plan: str):
    """The heterogeneous zoos: ``arch`` cycles ``hetero_archs`` at 32 px, ``domain`` alternates
    Conv4 clients between the ``hetero_image_sizes`` renderings. Their classes are drawn with
    another seed than the main zoo's."""
    s = p.study
    ds = open_data(s.data.dataset, image_size=s.data.image_size, seed=s.seed, images_per_class=s.data.images_per_class)
    n_cls = len(ds.classes("train"))
    if plan == "arch":
        return client_plan(n_cls, p.hetero_clients, s.clients.classes_per_client, s.seed + 101,
                           archs=p.hetero_archs, widths=p.hetero_widths, image_sizes=(s.data.image_size,),
                           epochs=s.clients.epochs)
    if plan == "domain":
        return client_plan(n_cls, p.hetero_clients, s.clients.classes_per_client, s.seed + 202,
                           archs=("conv4",), widths=(s.clients.width,), image_sizes=p.hetero_image_sizes,
                           epochs=s.clients.epochs)
    raise ValueError(f"unknown hetero plan {plan!r}")


def chunks(n: int, k: int) -> list[tuple[int, int]]:
    k = max(1, min(k, n))
    step = -(-n // k)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def train_chunk(ctx: Ctx, deps: dict, *, plan: str, start: int, stop: int) -> dict:
    p = ctx.preset
    specs = plan_specs(p, plan)[start:stop]
    items = train_clients(specs, data_spec=p.study.data.dataset, data_seed=p.study.seed,
                          images_per_class=p.study.data.images_per_class, device=ctx.device)
    return {"items": items}


def plan_specs(p, plan: str):
    return main_plan(p) if plan == "main" else hetero_plan(p, plan)


def build_zoo(ctx: Ctx, deps: dict, *, plan: str, split_at: int | None = None) -> dict:
    """Add every chunk's packages to ``work/zoo-<plan>`` (first ``split_at``) and
    ``work/zoo-<plan>-heldout`` (the rest)."""
    items = [it for name in sorted(deps, key=lambda s: int(s.rsplit(":", 1)[1])) for it in deps[name]["items"]]
    specs = plan_specs(ctx.preset, plan)
    n = len(items) if split_at is None else split_at
    root = Path(ctx.work) / f"zoo-{plan}"
    held = Path(ctx.work) / f"zoo-{plan}-heldout"
    for d in (root, held):
        if d.exists():
            shutil.rmtree(d)
    reports = add_packages(Zoo(root), items[:n])
    held_reports = add_packages(Zoo(held), items[n:]) if n < len(items) else []
    train_s = sum(r["train_s"] for r in reports + held_reports)
    classes = sorted({c for r in reports for c in r["classes"]})
    result = {"root": str(root), "heldout_root": str(held), "reports": reports, "heldout": held_reports,
              "classes": classes, "plan_hash": plan_hash(specs), "train_s": round(train_s, 2),
              "mean_holdout_accuracy": sum(r["holdout_accuracy"] for r in reports) / max(1, len(reports))}
    # beside the zoo, so that a run kept with --keep-work can lend it to another (main_zoo)
    (Path(ctx.work) / f"zoo-{plan}.json").write_text(json.dumps(result))
    return result


def carried_zoo(ctx: Ctx, deps: dict, *, path: str) -> dict:
    """The main zoo of an earlier run's work folder (``--keep-work``), copied into this run's: its
    plan must be this preset's (same clients, classes, seeds, epochs)."""
    src = Path(path)
    info = json.loads((src / "zoo-main.json").read_text())
    want = plan_hash(plan_specs(ctx.preset, "main"))
    if info["plan_hash"] != want:
        raise ValueError(f"the zoo in {src} was trained for another client plan ({info['plan_hash']}, "
                         f"this preset's is {want}): same preset, seed and --set client fields needed")
    for name, key in (("zoo-main", "root"), ("zoo-main-heldout", "heldout_root")):
        dst = Path(ctx.work) / name
        if dst.exists():
            shutil.rmtree(dst)
        if (src / name).exists():
            shutil.copytree(src / name, dst)
        info[key] = str(dst)
    return {**info, "carried_from": str(src)}


def zoo_jobs(p, plan: str, n_models: int, split_at: int | None = None, weight: float = 5.0) -> list[Job]:
    parts = chunks(n_models, max(1, p.workers))
    jobs = [Job(f"clients:{plan}:{i}", train_chunk,
                {"plan": plan, "start": a, "stop": b}, weight=weight) for i, (a, b) in enumerate(parts)]
    jobs.append(Job(f"zoo:{plan}", build_zoo, {"plan": plan, "split_at": split_at},
                    deps=tuple(j.name for j in jobs), weight=100.0))
    return jobs


def main_zoo_jobs(p) -> list[Job]:
    # first: every accuracy job (and the long scratch one) waits for this zoo
    if p.main_zoo:
        return [Job("zoo:main", carried_zoo, {"path": p.main_zoo}, weight=60.0)]
    n = p.study.clients.count
    return zoo_jobs(p, "main", n + p.heldout_clients, split_at=n, weight=60.0)
