"""Trust: FREE on zoos with harmful models, the data-free screen off and on.

Not in the default sections (``--only trust``). Zoos: ``trust_honest`` honest glyph clients plus, at
each level of ``trust_levels`` (percent of the zoo), harmful models cycling through
:data:`MIX_ORDER` (benchmarks/harmful.py; a lower level's harmful models are a prefix of a higher
one's). For each level, FREE (the study's FreeConfig at learner width ``trust_learner_width``,
``trust_iterations`` iterations) with the screen off and on (server/screen.py, through
``FreeTrainer(screen=)``), scored on the meta-test split (5-way 1- and 5-shot,
``trust_episodes`` episodes, the same episodes for every run), and a random initialisation.
A screened zoo whose usable models are those of a zoo already trained on is not trained again
(training is a function of the usable set). Also: the screen's verdict on every model (harmful
ones per type, honest and ``trust_weak`` weak honest ones: false positives), its scores and its
cost in seconds.

The job writes ``trust.json`` and ``trust.md`` into the run's output folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks import harmful
from benchmarks.common import evaluate_learner, open_data
from benchmarks.jobs import Ctx, Job

MIX_ORDER = ("random", "shuffled", "noise", "constant", "lying_norm", "other_data")


def n_harmful(level: int, honest: int) -> int:
    """Harmful models that make ``level`` percent of a zoo with ``honest`` honest ones (rounded)."""
    return int(round(level / (100 - level) * honest)) if 0 < level < 100 else 0


def jobs(p) -> list[Job]:
    return [Job("trust:models", build_models, {}, weight=10.0),
            Job("trust:free", run_free, {}, deps=("trust:models",), weight=10.0)]


def _classes(ds, seed: int) -> list[int]:
    n = len(ds.classes("train"))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 303)).tolist()


def build_models(ctx: Ctx, deps: dict) -> dict:
    from free_dfml.common.package import save_package
    from free_dfml.server.screen import Screen, screen_config
    from free_dfml.server.zoo import Zoo
    p, s = ctx.preset, ctx.preset.study
    ds = open_data(s.data.dataset, image_size=s.data.image_size, seed=s.seed, images_per_class=s.data.images_per_class)
    order = _classes(ds, s.seed)
    k = s.clients.classes_per_client
    block = iter(range(len(order) // k))
    kw = {"width": s.clients.width, "epochs": p.trust_client_epochs}
    top = max(p.trust_levels)
    plan = [("honest", i) for i in range(p.trust_honest)] + [("weak", i) for i in range(p.trust_weak)]
    plan += [(MIX_ORDER[j % len(MIX_ORDER)], j) for j in range(n_harmful(top, p.trust_honest))]
    root = Path(ctx.work) / "trust"
    if root.exists():
        shutil.rmtree(root)
    (root / "models").mkdir(parents=True)
    base = None
    rows = []
    for kind, i in plan:
        b = next(block)
        classes = order[b * k:(b + 1) * k]
        t0 = time.perf_counter()
        extra = {}
        if kind in ("constant", "lying_norm", "head_permuted"):
            if base is None:
                base = harmful.make("honest", ds, order[-k:], seed=999, **kw)
            extra = {"base": base}
        pkg = harmful.make(kind, ds, classes, seed=i, **kw, **extra)
        path = root / "models" / f"{kind}-{i}.safetensors"
        save_package(pkg, path)
        rows.append({"name": f"{kind}-{i}", "kind": kind, "id": pkg.model_id, "path": str(path),
                     "holdout_accuracy": pkg.meta.training.get("holdout_accuracy"),
                     "train_s": round(time.perf_counter() - t0, 2)})
    zoo = Zoo(root / "all")
    for r in rows:
        from free_dfml.common.package import load_package
        zoo.add(load_package(r["path"]))
    screen = Screen(zoo, screen_config(None, s.free.replace(learner={"width": p.trust_learner_width}).learner))
    for r in rows:
        screen.check(r["id"])
        v = screen.verdicts()[r["id"]]
        r.update(passed=v["passed"], reasons=v["reasons"], scores=v["scores"])
    return {"root": str(root), "models": rows}


def _cfg(p):
    s = p.study
    return s.free.replace(learner={"width": p.trust_learner_width, "image_size": s.data.image_size},
                          schedule={"iterations": p.trust_iterations, "eval_every": 0})


def run_free(ctx: Ctx, deps: dict) -> dict:
    from free_dfml.common.package import load_package
    from free_dfml.server.baselines import random_learner
    from free_dfml.server.screen import Screen, screen_config
    from free_dfml.server.trainer import FreeTrainer
    from free_dfml.server.zoo import Zoo
    p, s = ctx.preset, ctx.preset.study
    models = deps["trust:models"]["models"]
    root = Path(deps["trust:models"]["root"])
    ds = open_data(s.data.dataset, image_size=s.data.image_size, seed=s.seed, images_per_class=s.data.images_per_class)
    test = ds.split("test")
    cfg = _cfg(p)
    ev = s.evaluation
    lrn = cfg.learner
    scored = {}

    def score(learner) -> dict:
        return evaluate_learner(learner, test, way=lrn.way, shots=tuple(ev.shots), episodes=p.trust_episodes,
                                steps=lrn.adapt_steps, lr=lrn.inner_lr, seed=ev.seed, device=ctx.device)

    honest = [m for m in models if m["kind"] == "honest"]
    harm = [m for m in models if m["kind"] not in ("honest", "weak")]
    runs, done = [], {}
    for level in sorted(p.trust_levels):
        members = honest + harm[:n_harmful(level, p.trust_honest)]
        for on in (False, True):
            name = f"{level}-{'on' if on else 'off'}"
            d = root / f"zoo-{name}"
            zoo = Zoo(d)
            for m in members:
                zoo.add(load_package(m["path"]))
            screen = None
            if on:      # the verdicts of trust:models (the same screen, already run on every model)
                for f in ("screen.json", "quarantine.json"):
                    if (root / "all" / f).exists():
                        shutil.copy(root / "all" / f, d / f)
                screen = Screen(zoo, screen_config(None, cfg.learner))
            usable = tuple(sorted(zoo.usable_ids() if screen is None else screen.usable(zoo.usable_ids())))
            row = {"level": level, "screen": on, "models": len(members), "harmful": len(members) - len(honest),
                   "usable": len(usable), "usable_harmful": sum(m["id"] in usable for m in members if m in harm)}
            if not usable:
                row.update(results={}, note="every model was screened out")
            elif usable in done:
                row.update(done[usable][1], same_zoo_as=done[usable][0])
            else:
                t0 = time.perf_counter()
                trainer = FreeTrainer(zoo, cfg, device=ctx.device, screen=screen)
                trainer.run(cfg.schedule.iterations, progress=False)
                train_s = time.perf_counter() - t0
                res = {"results": score(trainer.learner), "train_s": round(train_s, 1)}
                done[usable] = (name, res)
                row.update(res)
            runs.append(row)
            print(f"[trust] {name}: {json.dumps({k: v for k, v in row.items() if k != 'results'})} "
                  + " ".join(f"{k} {100 * v['mean']:.2f}" for k, v in row["results"].items()), flush=True)
    zoo0 = Zoo(root / "zoo-honest")         # the random start takes the honest models' normalisation
    for m in honest:
        zoo0.add(load_package(m["path"]))
    norm = FreeTrainer(zoo0, cfg, device="cpu").norm
    scored["random"] = score(random_learner(cfg, norm=norm))
    out = {"runs": runs, "random": scored["random"]}
    return out


def _rates(models: list[dict]) -> dict:
    by: dict[str, dict] = {}
    for m in models:
        e = by.setdefault(m["kind"], {"models": 0, "quarantined": 0, "seconds": []})
        e["models"] += 1
        e["quarantined"] += int(not m.get("passed", True))
        e["seconds"].append(m.get("scores", {}).get("seconds", 0.0))
    for e in by.values():
        e["rate"] = e["quarantined"] / e["models"]
        e["mean_seconds"] = round(sum(e.pop("seconds")) / e["models"], 2)
    return by


def summarize(outcomes: dict, p) -> dict:
    sec: dict = {"settings": {"honest": p.trust_honest, "weak": p.trust_weak, "levels": list(p.trust_levels),
                              "iterations": p.trust_iterations, "episodes": p.trust_episodes,
                              "learner_width": p.trust_learner_width, "client_epochs": p.trust_client_epochs,
                              "mix_order": list(MIX_ORDER)}, "errors": {}}
    mo, fo = outcomes.get("trust:models"), outcomes.get("trust:free")
    if mo is not None and mo.ok:
        sec["models"] = [{k: v for k, v in m.items() if k != "path"} for m in mo.result["models"]]
        sec["screen"] = _rates(mo.result["models"])
    elif mo is not None:
        sec["errors"]["models"] = mo.error
    if fo is not None and fo.ok:
        sec.update(fo.result)
    elif fo is not None:
        sec["errors"]["free"] = fo.error
    return sec


def markdown(sec: dict) -> str:
    L = ["## Trust: harmful models, the data-free screen off and on", ""]
    st = sec.get("settings", {})
    L.append(f"{st.get('honest')} honest clients (+{st.get('weak')} weak ones, screened only), FREE "
             f"{st.get('iterations')} iterations at learner width {st.get('learner_width')}, "
             f"{st.get('episodes')} meta-test episodes a shot (the same for every row).")
    L += ["", "| harmful | screen | models (harmful) | used (harmful) | 1-shot | 5-shot |", "|---|---|---|---|---|---|"]
    for r in sec.get("runs", []):
        res = r.get("results", {})
        cell = lambda k: (f"{100 * res[k]['mean']:.2f} ± {100 * res[k]['ci95']:.2f}" if k in res else "-")  # noqa: E731
        same = f" (= {r['same_zoo_as']})" if r.get("same_zoo_as") else ""
        L.append(f"| {r['level']}% | {'on' if r['screen'] else 'off'} | {r['models']} ({r['harmful']}) | "
                 f"{r['usable']} ({r['usable_harmful']}){same} | {cell('1shot')} | {cell('5shot')} |")
    if sec.get("random"):
        rr = sec["random"]
        L.append(f"| random init | - | - | - | {100 * rr['1shot']['mean']:.2f} | {100 * rr['5shot']['mean']:.2f} |"
                 if "5shot" in rr else f"| random init | - | - | - | {100 * rr['1shot']['mean']:.2f} | - |")
    L += ["", "| model type | models | quarantined | rate | s / model |", "|---|---|---|---|---|"]
    for kind, e in sorted(sec.get("screen", {}).items()):
        L.append(f"| {kind} | {e['models']} | {e['quarantined']} | {e['rate']:.2f} | {e['mean_seconds']:.2f} |")
    return "\n".join(L) + "\n"
