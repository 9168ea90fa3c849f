"""Choose FREE settings on meta-VAL, never on the meta-test split that the accuracy table reports.

    python -m experiments.meta_val_sweep --out DIR [--preset quick] [--iterations 240] [--every 80]
        [--episodes 400] [--seeds 0,1,2,3] --variant NAME=JSON [--variant NAME=JSON ...]

For every variant and seed, ``free`` (the accuracy section's method, with the preset's FreeConfig and
the variant's FreeConfig overrides, e.g. ``jitter2={"inversion_jitter": 2}``; ``base={}`` is the
preset as is) trains on one zoo: every client of the preset's main plan (for ``quick``: 24 Conv4s
over 120 meta-train classes; a sweep needs no held-out models). After every ``--every`` iterations
the meta-learner is scored on ``--episodes`` 5-way 1-shot meta-val episodes (seed 7, the same
episodes for every run; 15 queries, ``eval_steps`` at ``inner_lr``). Runs are spread over the
preset's worker processes, one torch thread each. Writes ``DIR/sweep.jsonl`` (one line per run) and
``DIR/sweep.md`` (a table: variants x seeds at every scored iteration, and the per-seed differences
to the first variant).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import append_jsonl, command_line

VAL_SEED = 7


def run_variant(ctx, deps: dict, *, variant: str, overrides: dict, seed: int, iterations: int,
                every: int, episodes: int) -> dict:
    import torch

    from benchmarks.accuracy import method_config
    from benchmarks.common import open_data
    from free_dfml.common.evaluation import evaluate
    from free_dfml.server.trainer import FreeTrainer
    from free_dfml.server.zoo import Zoo

    p = ctx.preset
    zoo = Zoo(deps["zoo:main"]["root"], cache_size=32)
    cfg = method_config(p, "free", iterations=iterations, seed=seed, **overrides)
    d = p.study.data
    val = open_data(d.dataset, image_size=d.image_size, seed=p.study.seed,
                    images_per_class=d.images_per_class).split("val")
    trainer = FreeTrainer(zoo, cfg, device=torch.device(ctx.device))
    curve = []
    t0 = time.perf_counter()
    for stop in sorted(set(range(every, iterations + 1, every)) | {iterations}):
        trainer.run(stop, progress=False)
        r = evaluate(trainer.learner, val, way=cfg.learner.way, shot=1, episodes=episodes, steps=cfg.learner.adapt_steps,
                     lr=cfg.learner.inner_lr, seed=VAL_SEED, device=ctx.device)
        curve.append({"iteration": stop, "acc": round(r.mean * 100, 2), "ci95": round(r.ci95 * 100, 2)})
    return {"variant": variant, "overrides": overrides, "seed": seed, "curve": curve,
            "wall_s": round(time.perf_counter() - t0, 1)}


def table(runs: list[dict], variants: list[str]) -> str:
    """Markdown: one row per (scored iteration, seed), one column per variant, then the difference
    of each other variant to the first; mean rows at the end of each iteration block."""
    by = {(r["variant"], r["seed"]): {c["iteration"]: c for c in r["curve"]} for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    its = sorted({c["iteration"] for r in runs for c in r["curve"]})
    head = ["iteration", "seed", *variants, *(f"{v} - {variants[0]}" for v in variants[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for it in its:
        sums: dict[str, list[float]] = {v: [] for v in head[2:]}
        for s in seeds:
            cells = [str(it), str(s)]
            accs = {v: by.get((v, s), {}).get(it) for v in variants}
            for v in variants:
                c = accs[v]
                cells.append("-" if c is None else f"{c['acc']:.2f} ± {c['ci95']:.2f}")
                if c is not None:
                    sums[v].append(c["acc"])
            for v in variants[1:]:
                a, b = accs[v], accs[variants[0]]
                d = None if a is None or b is None else a["acc"] - b["acc"]
                cells.append("-" if d is None else f"{d:+.2f}")
                if d is not None:
                    sums[f"{v} - {variants[0]}"].append(d)
            lines.append("| " + " | ".join(cells) + " |")
        mean = [f"**{it}**", "**mean**"]
        for k in head[2:]:
            if not sums[k]:                  # no run of that variant reached this iteration
                mean.append("-")
                continue
            fmt = "+.2f" if " - " in k else ".2f"     # differences carry their sign
            mean.append(f"**{sum(sums[k]) / len(sums[k]):{fmt}}**")
        lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines) + "\n"


def check_variants(p, variants: dict[str, dict]) -> None:
    """Refuse a bad FreeConfig key or value of any variant (ValueError) before any work starts."""
    for name, o in variants.items():
        try:
            p.study.free.replace(**o)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--variant {name}: {e}") from None


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--variant takes NAME=JSON, got {text!r}")
    try:
        over = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--variant {name}: not JSON ({e.msg})") from None
    if not isinstance(over, dict):
        raise ValueError(f"--variant {name}: FreeConfig overrides must be a JSON object")
    return name.strip(), over


def main(argv: list[str] | None = None) -> int:
    from benchmarks.jobs import Ctx, Job, run_jobs
    from benchmarks.presets import get_preset
    from benchmarks.zoos import zoo_jobs

    ap = argparse.ArgumentParser(prog="python -m experiments.meta_val_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (sweep.jsonl, sweep.md, the zoo under work/)")
    ap.add_argument("--preset", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dataset", default=None, help="data set spec (default: the preset's)")
    ap.add_argument("--iterations", type=int, default=240)
    ap.add_argument("--every", type=int, default=80, help="score every N iterations (and at the end)")
    ap.add_argument("--episodes", type=int, default=400, help="meta-val episodes per score")
    ap.add_argument("--seeds", default="0", help="comma-separated FREE seeds (the zoo stays the same)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="FreeConfig overrides of one variant, e.g. 'jitter2={\"inversion_jitter\": 2}'")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: the preset's)")
    a = ap.parse_args(argv)
    try:
        variants = dict(parse_variant(v) for v in a.variant) or {"base": {}}
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        if a.iterations < 1 or a.every < 1 or a.episodes < 1 or not seeds:
            raise ValueError("--iterations, --every and --episodes must be >= 1, and --seeds non-empty")
        over = {"workers": a.workers} if a.workers is not None else {}
        if a.dataset:
            over["dataset"] = a.dataset
        p = get_preset(a.preset, **over)
        check_variants(p, variants)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    ctx = Ctx(preset=p, out=str(out), work=str(out / "work"), device=a.device)
    jobs = zoo_jobs(p, "main", p.study.clients.count + p.heldout_clients)
    for name, o in variants.items():
        for s in seeds:
            jobs.append(Job(f"sweep:{name}:{s}", run_variant,
                            {"variant": name, "overrides": o, "seed": s, "iterations": a.iterations,
                             "every": a.every, "episodes": a.episodes}, deps=("zoo:main",)))
    outcomes = run_jobs(jobs, ctx, workers=p.workers, threads=p.threads_per_worker)
    runs = [o.result for k, o in outcomes.items() if k.startswith("sweep:") and o.ok]
    append_jsonl(out / "sweep.jsonl", runs)
    zoo = outcomes["zoo:main"].result if outcomes["zoo:main"].ok else {}
    command = command_line("experiments.meta_val_sweep", argv)
    md = (f"# meta-val sweep, preset `{a.preset}`\n\n- command: `{command}`\n- zoo: {len(zoo.get('reports', []))} models, mean "
          f"client held-out accuracy {zoo.get('mean_holdout_accuracy', float('nan')):.3f}\n"
          f"- 5-way 1-shot meta-val accuracy (%), {a.episodes} episodes (seed {VAL_SEED}), mean ± 95% interval\n\n"
          + table(runs, list(variants)))
    (out / "sweep.md").write_text(md)
    print(md)
    failed = {k: o.error for k, o in outcomes.items() if not o.ok}
    for k, err in failed.items():
        print(f"[sweep] {k} failed:\n{err}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
