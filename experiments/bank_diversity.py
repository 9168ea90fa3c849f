"""How diverse is the memory bank an inversion method fills? FIVE against scratch, on one zoo.

    python -m experiments.bank_diversity --zoo DIR --out DIR [--preset quick] [--iterations 160]
        [--seed 1] [--workers 2|0] --variant NAME=JSON [--variant NAME=JSON ...]

For every variant (FreeConfig overrides on the preset's ``free`` config, as in
``experiments.meta_val_sweep``: ``base={}``, ``scratch25={"inversion": "scratch", "scratch_steps": 25}``)
a ``FreeTrainer`` trains ``--iterations`` iterations on the zoo folder ``--zoo`` (e.g. a sweep's
``work/zoo-main``). Then, for every bank key (one class of one teacher) holding at least two teacher
visits of ``samples_per_class`` images, with the teacher that made them:

- ``agree``: share of the images the teacher gives their class with confidence >= the preset's
  ``recovery_confidence`` (0.9; ``benchmarks.recovery.agreement``);
- ``feat_within`` / ``feat_across``: mean cosine distance between the teacher's penultimate features
  of two images written in the same visit / in different visits (iterations);
- ``pix_within`` / ``pix_across``: the same with RMS pixel distance.

and over the whole bank, from the newest visit of every such key:

- ``pix_between``: mean RMS pixel distance between two images of different teachers;
- ``colour_spread``: standard deviation across teachers of a teacher's mean colour (per channel,
  averaged over channels): how far the teachers' images differ in palette.

Means over keys go to ``DIR/diversity.jsonl`` (one line per variant) and ``DIR/diversity.md``;
``DIR/grid_<variant>.png`` shows the newest images of the first teachers' classes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import append_jsonl, command_line, map_jobs

METRICS = ("agree", "feat_within", "feat_across", "pix_within", "pix_across")
BANK_METRICS = ("pix_between", "colour_spread")


def key_stats(x, teacher, input_shape, cls: int, m: int, confidence: float = 0.9) -> dict:
    """Agreement and within- / across-visit distances of one key's images ``x`` (oldest first)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.recovery import agreement
    from free_dfml.server.generator import to_teacher_input

    feats: list = []
    head = [mod for name, mod in teacher.named_modules() if name.endswith("head")][-1]
    hook = head.register_forward_pre_hook(lambda _mod, inp: feats.append(inp[0].detach()))
    try:
        with torch.no_grad():
            logits = teacher(to_teacher_input(x, tuple(input_shape)))
    finally:
        hook.remove()
    agree = agreement(logits, torch.full((len(x),), cls), confidence)
    n = len(x) // m * m                                 # whole visits only (the newest n images)
    f = F.normalize(feats[0].flatten(1), dim=1)[-n:]
    px = x[-n:].flatten(1)
    visit = torch.arange(n) // m
    same = (visit[:, None] == visit[None, :]) & ~torch.eye(n, dtype=torch.bool)
    other = visit[:, None] != visit[None, :]
    cos = 1 - f @ f.T
    pix = torch.cdist(px, px) / px.shape[1] ** 0.5
    return {"agree": agree, "visits": n // m,
            "feat_within": cos[same].mean().item(), "feat_across": cos[other].mean().item(),
            "pix_within": pix[same].mean().item(), "pix_across": pix[other].mean().item()}


def bank_stats(newest: list, models: list[str]) -> dict:
    """``pix_between`` and ``colour_spread`` of the newest visit of every key (``newest[i]``: [m, C, H, W]
    images of a key of teacher ``models[i]``)."""
    import torch

    x = torch.cat(newest).flatten(1)
    owner = torch.tensor([models.index(mid) for mid, b in zip(models, newest) for _ in range(len(b))])
    other = owner[:, None] != owner[None, :]
    pix = torch.cdist(x, x) / x.shape[1] ** 0.5
    colour: dict[str, list] = {}
    for mid, b in zip(models, newest):
        colour.setdefault(mid, []).append(b.mean(dim=(0, 2, 3)))
    per_teacher = torch.stack([torch.stack(v).mean(0) for v in colour.values()])     # [teachers, C]
    spread = per_teacher.std(0).mean().item() if len(per_teacher) > 1 else 0.0
    return {"pix_between": pix[other].mean().item() if other.any() else 0.0, "colour_spread": spread}


def run_variant(args: tuple) -> dict:
    name, overrides, zoo_dir, preset, iterations, seed, out = args
    import torch
    torch.set_num_threads(1)

    from benchmarks.accuracy import method_config
    from benchmarks.presets import get_preset
    from free_dfml.server.report import save_recovered_grid
    from free_dfml.server.trainer import FreeTrainer
    from free_dfml.server.zoo import Zoo

    zoo = Zoo(zoo_dir, cache_size=32)
    p = get_preset(preset)
    cfg = method_config(p, "free", iterations=iterations, seed=seed, **overrides)
    trainer = FreeTrainer(zoo, cfg, device=torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.run(iterations, progress=False)
    train_s = time.perf_counter() - t0
    bank, m, rows = trainer.bank, cfg.generator.samples_per_class, []
    newest, owners = [], []
    for key in bank.keys():
        x = bank.images(key)
        if len(x) < 2 * m:
            continue
        model_id = bank.model_of(key)
        meta = zoo.meta(model_id)
        label = key.rsplit(":", 1)[1]
        cls = meta.class_labels.index(label) if key.startswith("label:") else int(label)
        rows.append(key_stats(x, zoo.teacher(model_id), meta.input_shape, cls, m, p.recovery_confidence))
        newest.append(x[-m:])
        owners.append(model_id)
    save_recovered_grid(trainer, sorted(bank.models())[:8], Path(out) / f"grid_{name}.png", per_class=6)
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in (*METRICS, "visits")} if rows else {}
    if rows:
        mean.update({k: round(v, 4) for k, v in bank_stats(newest, owners).items()})
    return {"variant": name, "overrides": overrides, "seed": seed, "iterations": iterations,
            "train_s": round(train_s, 1), "keys": len(rows), **mean}


def table(rows: list[dict]) -> str:
    head = ["variant", "keys", "visits a key", *METRICS, *BANK_METRICS, "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["variant"], r["keys"], r.get("visits", "-"), *(r.get(k, "-") for k in (*METRICS, *BANK_METRICS)),
                r["train_s"]]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="a zoo folder (e.g. a sweep's work/zoo-main)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--iterations", type=int, default=160)
    ap.add_argument("--seed", type=int, default=1, help="training seed")
    ap.add_argument("--workers", type=int, default=2, help="processes, one variant each (0: in this one)")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=JSON")
    a = ap.parse_args(argv)
    from experiments.meta_val_sweep import check_variants, parse_variant
    from benchmarks.presets import get_preset
    try:
        if not (Path(a.zoo) / "models").is_dir():
            raise ValueError(f"no zoo at {a.zoo} (expected a models/ folder)")
        if a.iterations < 1:
            raise ValueError("--iterations must be >= 1")
        p = get_preset(a.preset)
        variants = dict(parse_variant(v) for v in a.variant)
        check_variants(p, variants)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, o, a.zoo, a.preset, a.iterations, a.seed, str(out)) for n, o in variants.items()]
    rows = map_jobs(run_variant, jobs, a.workers)
    append_jsonl(out / "diversity.jsonl", rows)
    cmd = command_line("experiments.bank_diversity", argv)
    (out / "diversity.md").write_text(f"# memory-bank diversity, preset `{a.preset}`\n\n- command: `{cmd}`\n\n"
                                      + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
