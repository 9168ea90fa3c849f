"""Recovery along training: how FIVE's head start on held-out models changes as FREE trains.

    python -m experiments.recovery_curve --out DIR [--zoo DIR] [--preset quick] [--set FIELD=VALUE ...]
        [--heldout N] [--iterations 80] [--every 10] [--seeds 0,1,2] [--workers 2|0]
        [--device cpu|cuda] [--variant NAME=JSON ...]

The recovery section (``benchmarks.recovery``) probes one meta-generator: the one FREE holds at
the end of training. This module asks whether that single point is representative. The last
``--heldout`` models of the zoo folder ``--zoo`` (arrival order; for a zoo of the preset's main
plan, e.g. a sweep's ``work/zoo-main``, these are the accuracy section's held-out models) are kept
out. Without ``--zoo``, the preset's main plan (``clients`` + ``heldout_clients`` models, the
preset's client recipe; ``--set`` changes either) is trained into ``DIR/work/zoo-main`` first, or
reused from there when a previous run left it, and ``--heldout`` defaults to ``heldout_clients``.
A ``FreeTrainer`` with the preset's ``free`` config (plus the variant's FreeConfig
overrides, as in ``experiments.meta_val_sweep``) trains on the rest. At iteration 0 and every
``--every`` iterations the current meta-generator runs the recovery probe
(:func:`benchmarks.recovery.trace`: CE only, the config's Adam, ``recovery_five_steps`` steps) on
every held-out model, with the same latents and targets at every checkpoint. The scratch
generator's trace does not depend on training and is run once per model. Reported per checkpoint
(mean over models): FIVE's agreement after its ``k`` inner steps, scratch's agreement after the same
``k`` steps, the steps FIVE and scratch need to reach ``recovery_confidence``-agreement 0.9, and
their ratio (models that reach it within the recorded steps; a FIVE already there at step 0
counts as 1 step, as in the recovery section); and, before any adaptation, the teacher's
cross-entropy on the meta-generator's images and the share of their pixels that are saturated
(below 0.02 or above 0.98, where the sigmoid output passes little gradient).

The scratch traces also give, per held-out model, the steps a fresh generator needs to reach
agreement 0.5 / 0.8 / 0.9 on its own (``scratch_reach``): FIVE needs at least one step on a model
it is not already at, so these bound the steps ratio that any meta-generator could show.

Writes ``DIR/curve.jsonl`` (one line per run: variant, seed, every checkpoint), ``DIR/curve.md``
and ``DIR/curve.png`` (FIVE's k-step agreement against the iteration, one line per run, scratch's
as a reference).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import append_jsonl, command_line, map_jobs

TARGET = 0.9
REACH = (0.5, 0.8, 0.9)


def probe(trainer, teachers: list, draws: list, cfg, p, device) -> tuple[list[list[float]], dict]:
    """FIVE's agreement curve on every held-out teacher from the trainer's current meta-generator,
    and what its images look like before adapting: the share of saturated pixels (outside
    [0.02, 0.98]) and the teacher's cross-entropy at step 0."""
    import torch
    from torch.func import functional_call

    from benchmarks.recovery import trace
    gen = trainer.metagen.generator
    phi = trainer.metagen.params()
    curves, ce0, sat = [], [], []
    for t, (y, z) in zip(teachers, draws):
        tr = trace(t, gen, phi, z, y, steps=p.recovery_five_steps, cfg=cfg,
                   confidence=p.recovery_confidence, device=device)
        curves.append(tr["agreement"])
        ce0.append(tr["ce"][0])
        with torch.no_grad():
            x = functional_call(gen, phi, (z,))
        sat.append(float(((x < 0.02) | (x > 0.98)).float().mean()))
    return curves, {"five_ce0": sum(ce0) / len(ce0), "saturated": sum(sat) / len(sat)}


def summarize(five: list[list[float]], scratch: list[list[float]], k: int) -> dict:
    from benchmarks.recovery import _mean, _ratio, first_reach     # the recovery section's arithmetic
    f_steps = [first_reach(c, TARGET) for c in five]
    s_steps = [first_reach(c, TARGET) for c in scratch]
    both = [(f, s) for f, s in zip(f_steps, s_steps) if f is not None and s is not None]
    return {
        "five_agree_k": _mean([c[min(k, len(c) - 1)] for c in five]),
        "scratch_agree_k": _mean([c[min(k, len(c) - 1)] for c in scratch]),
        "five_reached": sum(f is not None for f in f_steps),
        "five_steps": _mean([f for f, _ in both]),
        "scratch_steps": _mean([s for _, s in both]),
        "steps_ratio": _ratio([s for _, s in both], [max(1, f) for f, _ in both]),
    }


def run(args: tuple) -> dict:
    name, overrides, zoo_dir, heldout, preset, settings, iterations, every, seed, work, dev = args
    import torch
    if dev == "cpu":
        torch.set_num_threads(1)
    device = torch.device(dev)

    from benchmarks.accuracy import method_config
    from benchmarks.presets import get_preset
    from benchmarks.recovery import first_reach, held_out_probe, trace
    from free_dfml.server.trainer import FreeTrainer
    from free_dfml.server.zoo import Zoo

    p = get_preset(preset, **settings)
    src = Zoo(zoo_dir)
    ids = src.ids()
    train_ids, held_ids = ids[: len(ids) - heldout], ids[len(ids) - heldout:]
    zoo = Zoo(Path(work) / f"zoo-{name}-{seed}", cache_size=32)
    for m in train_ids:
        zoo.add(src.package(m))
    cfg = method_config(p, "free", iterations=iterations, seed=seed, **overrides)
    trainer = FreeTrainer(zoo, cfg, device=device)
    teachers, draws, scratch = [], [], []
    for i, mid in enumerate(held_ids):        # latents, targets and scratch generator as in recovery.run
        t, y, z, fresh = held_out_probe(src, mid, i, cfg, p.study.seed, device)
        teachers.append(t)
        draws.append((y, z))
        scratch.append(trace(t, fresh, dict(fresh.named_parameters()), z, y,
                             steps=p.recovery_scratch_steps, cfg=cfg,
                             confidence=p.recovery_confidence, device=device)["agreement"])
    reach = {str(tg): [first_reach(c, tg) for c in scratch] for tg in REACH}
    print(f"[recovery-curve] {name} seed {seed}: a fresh generator's steps to agreement 0.5 / 0.8 / 0.9 "
          f"per held-out model: {[[reach[str(t)][i] for t in REACH] for i in range(len(held_ids))]}", flush=True)
    points = []
    t0 = time.perf_counter()
    for stop in sorted({0, iterations, *range(every, iterations, every)}):
        trainer.run(stop, progress=False)
        five, looks = probe(trainer, teachers, draws, cfg, p, device)
        points.append({"iteration": stop, **summarize(five, scratch, cfg.generator.inner_steps), **looks})
        pt = points[-1]
        r2 = {k: None if pt[k] is None else round(pt[k], 2) for k in ("five_steps", "scratch_steps", "steps_ratio")}
        print(f"[recovery-curve] {name} seed {seed} iteration {stop}: FIVE agreement after "
              f"{cfg.generator.inner_steps} steps {pt['five_agree_k']:.3f} (scratch {pt['scratch_agree_k']:.3f}); "
              f"steps to 0.9 FIVE {r2['five_steps']} scratch {r2['scratch_steps']} ratio {r2['steps_ratio']} "
              f"on {pt['five_reached']}/{len(held_ids)} models; saturated pixels at step 0 "
              f"{looks['saturated']:.3f}; {time.perf_counter() - t0:.0f} s", flush=True)
    return {"variant": name, "overrides": overrides, "seed": seed, "k": cfg.generator.inner_steps,
            "heldout": held_ids, "points": points, "scratch_reach": reach,
            "scratch_final": [c[-1] for c in scratch], "scratch_steps_max": p.recovery_scratch_steps,
            "sizes": {"nz": cfg.generator.nz, "ngf": cfg.generator.ngf, "samples_per_class": cfg.generator.samples_per_class,
                      "gen_lr": cfg.generator.lr, "z_lr": cfg.generator.z_lr}, "device": dev,
            "wall_s": round(time.perf_counter() - t0, 1)}


def table(runs: list[dict]) -> str:
    head = ["variant", "seed", "iteration", "FIVE agreement after k", "scratch agreement after k",
            "FIVE steps to 0.9", "scratch steps to 0.9", "steps ratio", "models FIVE reached 0.9",
            "FIVE CE at step 0", "saturated pixels at step 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = (lambda v, d=3: "-" if v is None else f"{v:.{d}f}")
    for r in runs:
        for pt in r["points"]:
            lines.append("| " + " | ".join([
                r["variant"], str(r["seed"]), str(pt["iteration"]), fmt(pt["five_agree_k"]),
                fmt(pt["scratch_agree_k"]), fmt(pt["five_steps"], 1), fmt(pt["scratch_steps"], 1),
                fmt(pt["steps_ratio"], 2), f"{pt['five_reached']}/{len(r['heldout'])}",
                fmt(pt["five_ce0"], 2), fmt(pt["saturated"])]) + " |")
    return "\n".join(lines)


def scratch_table(runs: list[dict]) -> str:
    """Markdown: per held-out model, the steps a fresh generator needs to reach each agreement on its
    own ("-": not within the recorded steps). The scratch trace depends on the variant's FreeConfig
    (its Adam steps), not on FREE's training seed, so one row per variant and model."""
    head = ["variant", "model", *(f"scratch steps to {t}" for t in REACH), "scratch agreement at the last step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done = set()
    for r in runs:
        for i, mid in enumerate(r["heldout"]):
            if (r["variant"], mid) in done:
                continue
            done.add((r["variant"], mid))
            steps = ["-" if r["scratch_reach"][str(t)][i] is None else str(r["scratch_reach"][str(t)][i])
                     for t in REACH]
            lines.append(f"| {r['variant']} | {mid[:12]} | " + " | ".join(steps)
                         + f" | {r['scratch_final'][i]:.3f} (step {r['scratch_steps_max']}) |")
    return "\n".join(lines)


def build_zoo(p, out: Path, device: str) -> str:
    """The preset's main plan (``clients`` + ``heldout_clients``, plan order) trained into
    ``out/work/zoo-main``, as the accuracy section trains it; an existing one there is reused."""
    from benchmarks.jobs import Ctx, run_jobs
    from benchmarks.zoos import zoo_jobs
    from free_dfml.server.zoo import Zoo
    root = out / "work" / "zoo-main"
    n = p.study.clients.count + p.heldout_clients
    if (root / "models").is_dir() and len(Zoo(root).ids()) == n:
        print(f"[recovery-curve] reusing the {n}-model zoo in {root}", flush=True)
        return str(root)
    ctx = Ctx(preset=p, out=str(out), work=str(out / "work"), device=device)
    res = run_jobs(zoo_jobs(p, "main", n), ctx, workers=p.workers, threads=p.threads_per_worker)
    bad = {k: o.error for k, o in res.items() if not o.ok}
    if bad:
        raise RuntimeError(f"training the zoo failed: {bad}")
    z = res["zoo:main"].result
    print(f"[recovery-curve] trained {n} clients into {root} (mean client held-out accuracy "
          f"{z['mean_holdout_accuracy']:.3f}, {z['train_s']:.0f} s of training)", flush=True)
    return z["root"]


def plot(runs: list[dict], path: Path) -> bool:
    if not runs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        xs = [pt["iteration"] for pt in r["points"]]
        ax.plot(xs, [pt["five_agree_k"] for pt in r["points"]], marker="o",
                label=f"FIVE, {r['variant']}, seed {r['seed']}")
    ref = runs[0]["points"][0]["scratch_agree_k"]
    ax.axhline(ref, color="grey", ls="--", label=f"scratch after {runs[0]['k']} steps")
    ax.set_xlabel("FREE iteration")
    ax.set_ylabel(f"agreement after k = {runs[0]['k']} steps")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("held-out models: agreement (confidence >= 0.9) after k steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.recovery_curve",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="a zoo folder; its last --heldout models are held out "
                    "(default: the preset's main plan, trained into OUT/work/zoo-main)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--preset", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a preset field (benchmarks/presets.py), as benchmarks.run --set")
    ap.add_argument("--heldout", type=int, default=None,
                    help="models held out (the zoo's last, arrival order; default: with --zoo 4, "
                         "else the preset's heldout_clients)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--every", type=int, default=10, help="probe every N iterations (and at 0 and the end)")
    ap.add_argument("--seeds", default="0", help="comma-separated FREE training seeds")
    ap.add_argument("--workers", type=int, default=2, help="processes, one run each (0: in this one)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="FreeConfig overrides (default: base={})")
    a = ap.parse_args(argv)
    from experiments.meta_val_sweep import check_variants, parse_variant
    from benchmarks.presets import get_preset, parse_setting
    from free_dfml.server.device import resolve_device
    try:
        settings = dict(parse_setting(s) for s in a.set)
        p = get_preset(a.preset, **settings)
        heldout = a.heldout if a.heldout is not None else (4 if a.zoo else p.heldout_clients)
        if a.zoo is not None:
            if not (Path(a.zoo) / "models").is_dir():
                raise ValueError(f"no zoo at {a.zoo} (expected a models/ folder)")
            from free_dfml.server.zoo import Zoo
            n = len(Zoo(a.zoo).ids())
        else:
            n = p.study.clients.count + p.heldout_clients
        if a.iterations < 1 or a.every < 1:
            raise ValueError("--iterations and --every must be >= 1")
        if not 1 <= heldout < n:
            raise ValueError(f"--heldout must be between 1 and {n - 1} for a zoo of {n} models")
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        if not seeds:
            raise ValueError("--seeds is empty")
        variants = dict(parse_variant(v) for v in a.variant) or {"base": {}}
        check_variants(p, variants)
        dev = str(resolve_device(a.device))
    except (ValueError, RuntimeError) as e:
        ap.error(str(e))
    out = Path(a.out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    zoo_dir = a.zoo or build_zoo(p, out, dev)
    jobs = [(n, o, zoo_dir, heldout, a.preset, settings, a.iterations, a.every, s, str(out / "work"), dev)
            for n, o in variants.items() for s in seeds]
    runs = map_jobs(run, jobs, a.workers)
    append_jsonl(out / "curve.jsonl", runs)
    cmd = command_line("experiments.recovery_curve", argv)
    sz = runs[0]["sizes"]
    md = (f"# recovery along training, preset `{a.preset}`\n\n- command: `{cmd}`\n- held-out models: "
          f"{heldout}; agreement = share of images the teacher gives their target with confidence "
          f">= {p.recovery_confidence}\n- generator nz {sz['nz']}, ngf {sz['ngf']}, "
          f"{sz['samples_per_class']} images a class; gen_lr {sz['gen_lr']}, z_lr {sz['z_lr']}; "
          f"device {dev}\n- the probe's latents, targets and fresh generators are drawn from the preset's seed "
          f"{p.study.seed}; the `seed` column is FREE's training seed\n\n" + table(runs) + "\n\n## A fresh generator alone\n\n" + scratch_table(runs) + "\n")
    (out / "curve.md").write_text(md)
    plot(runs, out / "curve.png")
    print(md)


if __name__ == "__main__":
    main()
