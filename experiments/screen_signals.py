"""Which data-free signals separate harmful models from honest ones? (the screen's signal search)

    .venv/bin/python -m experiments.screen_signals [--out experiments/results/screen-signals]
                                                    [--cache runs/screen-search] [--honest 8]

Trains (or reuses from ``--cache``) glyph clients at the demo's client settings (Conv4 width 32,
5 classes, 100 images a class, 20 epochs): honest ones, weak honest ones and every harmful type of
:mod:`benchmarks.harmful`; computes every candidate signal of :func:`candidate_signals`
on each; writes the scores and, per signal and harmful type, the AUC of separating that type
from the honest models (honest and weak together), as ``signals.json`` and ``signals.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------ the candidate signals measured

def _probe(kind: str, n: int, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    if kind == "uniform":
        return torch.rand((n, c, h, w), generator=g)
    return F.interpolate(torch.rand((n, c, 4, 4), generator=g), size=(h, w), mode="bilinear", align_corners=False)


def _entropy(p: torch.Tensor) -> float:
    p = p.clamp_min(1e-12)
    return float(-(p * p.log()).sum())


def _bn_loss(model: nn.Module, x: torch.Tensor, first_only: bool = False) -> float:
    """Mean over BatchNorm layers (or the first) of |batch mean - running mean| / |running std| +
    mean |log variance ratio| for the images ``x``."""
    losses: list[float] = []

    def hook(m, inp, _out):
        a = inp[0]
        mean = a.mean(dim=(0, 2, 3))
        var = a.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
        rel_m = (mean - m.running_mean).norm() / (m.running_var.sqrt().norm() + 1e-6)
        rel_v = (var.clamp_min(1e-8).log() - m.running_var.clamp_min(1e-8).log()).abs().mean()
        losses.append(float(rel_m + rel_v))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if first_only:
        bns = bns[:1]
    if not bns:
        return float("nan")
    hs = [m.register_forward_hook(hook) for m in bns]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return sum(losses) / len(losses)


def candidate_signals(teacher, *, image_size: int = 32, channels: int = 3, steps: int = 20,
                      per_class: int = 8, seed: int = 0, ngf: int = 16, nz: int = 64, lr: float = 1e-2
                      ) -> dict[str, float]:
    """Every candidate signal for one model: outputs and first-layer / all-layer BatchNorm distances
    on uniform and smooth probe images; a fresh generator's inversion (CE, confidence, stability of
    the recovered images' predictions under a 2-px shift, noise and blur, BN distance, class
    separation in pixel space); head and BatchNorm weight statistics."""
    from free_dfml.server.generator import to_teacher_input
    from free_dfml.server.meta_generator import class_targets, invert, new_generator
    t0 = time.perf_counter()
    model, n = teacher.model, teacher.num_classes
    shape = (channels, image_size, image_size)
    out: dict[str, float] = {}
    with torch.no_grad():
        for kind in ("uniform", "smooth"):
            x = _probe(kind, 64, shape, seed)
            logits = teacher.logits(x)
            p = logits.softmax(1)
            hist = torch.bincount(p.argmax(1), minlength=n).float() / len(p)
            out[f"{kind}_conf"] = float(p.max(1).values.mean())
            out[f"{kind}_coverage"] = _entropy(hist) / math.log(n)
            out[f"{kind}_logit_std"] = float(logits.std(1).mean())
            out[f"{kind}_bn"] = _bn_loss(model, to_teacher_input(x, teacher.input_shape))
            out[f"{kind}_bn1"] = _bn_loss(model, to_teacher_input(x, teacher.input_shape), True)
    rng = torch.Generator().manual_seed(seed)
    gen = new_generator(nz, ngf, image_size, channels, rng)
    y = class_targets(n, per_class)
    z = torch.randn(len(y), nz, generator=rng)
    res = invert(teacher, gen, dict(gen.named_parameters()), z, y, steps=steps, lr=lr, z_lr=lr)
    x = res.images
    out["inv_ce"] = res.final_ce
    out["inv_ce_mid"] = res.losses[len(res.losses) // 2]["ce"]
    out["inv_ce_first"] = res.losses[0]["ce"]
    with torch.no_grad():
        p = teacher.logits(x).softmax(1)
        out["inv_conf"] = float(p.gather(1, y[:, None]).mean())
        out["inv_acc"] = float((p.argmax(1) == y).float().mean())
        pred = p.argmax(1)
        out["inv_stab_shift"] = float((teacher.logits(torch.roll(x, (2, 2), dims=(2, 3))).argmax(1) == pred).float().mean())
        g2 = torch.Generator().manual_seed(seed + 1)
        noisy = (x + 0.05 * torch.randn(x.shape, generator=g2)).clamp(0, 1)
        out["inv_stab_noise"] = float((teacher.logits(noisy).argmax(1) == pred).float().mean())
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        out["inv_stab_blur"] = float((teacher.logits(blur).argmax(1) == pred).float().mean())
        out["inv_bn"] = _bn_loss(model, to_teacher_input(x, teacher.input_shape))
        out["inv_bn1"] = _bn_loss(model, to_teacher_input(x, teacher.input_shape), True)
        means = torch.stack([x[y == c].mean(0) for c in range(n)]).flatten(1)
        within = torch.stack([x[y == c].std(0).mean() for c in range(n)]).mean()
        between = torch.cdist(means, means).sum() / max(1, n * (n - 1))
        out["inv_between"] = float(between)
        out["inv_within"] = float(within)
        out["inv_sep"] = float(between / (within * math.sqrt(means.shape[1]) + 1e-6))
        out["inv_pixel_std"] = float(x.std())
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        rows = head.weight.norm(dim=1)
        out["head_row_norm"] = float(rows.mean())
        out["head_bias_spread"] = float(head.bias.std() / (rows.mean() + 1e-6))
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bns:
            out["bn_default"] = float(sum(bool((m.running_mean == 0).all() and (m.running_var == 1).all())
                                          for m in bns) / len(bns))
    out["seconds"] = time.perf_counter() - t0
    return out


def auc(neg: list[float], pos: list[float]) -> float:
    """P(pos > neg) + 0.5 P(tie): the probability a harmful score is above an honest one."""
    if not neg or not pos:
        return float("nan")
    s = 0.0
    for p in pos:
        for q in neg:
            s += 1.0 if p > q else 0.5 if p == q else 0.0
    return s / (len(pos) * len(neg))


def build_models(ds, cache: Path, n_honest: int, n_each: int) -> list[tuple[str, str, object]]:
    from benchmarks import harmful
    from free_dfml.common.package import load_package, save_package
    cache.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, str, dict]] = []
    block = lambda i: list(range(5 * i, 5 * i + 5))   # noqa: E731
    for i in range(n_honest):
        plan.append(("honest", f"honest-{i}", {"classes": block(i), "seed": i}))
    for i in range(4):
        plan.append(("weak", f"weak-{i}", {"classes": block(20 + i), "seed": i}))
    for kind in ("random", "shuffled", "noise", "other_data"):
        for i in range(n_each):
            plan.append((kind, f"{kind}-{i}", {"classes": block(30 + i), "seed": i}))
    out = []
    for kind, name, kw in plan:
        path = cache / f"{name}.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            pkg = harmful.make(kind, ds, kw["classes"], seed=kw["seed"])
            save_package(pkg, path)
            print(f"{name}: trained in {time.perf_counter() - t0:.1f} s", flush=True)
        out.append((kind, name, load_package(path)))
    bases = [p for k, n, p in out if k == "honest"][-n_each:]     # edited types start from honest models
    for kind in ("constant", "lying_norm", "head_permuted"):
        for i, base in enumerate(bases):
            out.append((kind, f"{kind}-{i}", harmful.make(kind, ds, [0] * 5, seed=i, base=base)))
    return out


def probe_separability(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Leave-one-out nearest-centroid accuracy of trusted probe images ``x`` (labels ``y``, classes
    no client has) in the model's penultimate features (the input of its last linear layer): how
    well its features transfer (the ``--probe-data`` idea, in FLTrust's spirit)."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    got: dict[str, torch.Tensor] = {}
    h = head.register_forward_hook(lambda m, i, o: got.__setitem__("f", i[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    f = F.normalize(got["f"], dim=1)
    k = int(y.max()) + 1
    sums = torch.stack([f[y == c].sum(0) for c in range(k)])
    counts = torch.bincount(y, minlength=k).float()
    correct = 0
    for i in range(len(y)):
        c = int(y[i])
        cent = sums.clone()
        cent[c] -= f[i]
        n = counts.clone()
        n[c] -= 1
        correct += int(torch.cdist(f[i:i + 1], cent / n[:, None]).argmin() == c)
    return correct / len(y)


def probe_set(ds, classes: int = 10, per_class: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes`` meta-val classes x ``per_class`` images: a trusted probe no client trained on."""
    from free_dfml.common.datasets import to_float
    val = ds.split("val")
    pick = torch.randperm(val.num_classes, generator=torch.Generator().manual_seed(seed))[:classes].tolist()
    xs, ys = [], []
    for j, c in enumerate(pick):
        idx = val.class_indices()[c][:per_class]
        xs.append(to_float(val.images[idx]))
        ys += [j] * len(idx)
    return torch.cat(xs), torch.tensor(ys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/screen-signals")
    ap.add_argument("--cache", default="runs/screen-search")
    ap.add_argument("--honest", type=int, default=8)
    ap.add_argument("--each", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--probe", action="store_true",
                    help="only the trusted-probe signal (10 meta-val classes x 10 images; writes probe.json / probe.md)")
    ap.add_argument("--adaptive", action="store_true",
                    help="with --chosen: also 3 random_calibrated models (benchmarks.harmful.ADAPTIVE)")
    ap.add_argument("--chosen", action="store_true",
                    help="the screen's own signals and verdicts (server/screen.py) instead of the candidates "
                         "(writes chosen.json / chosen.md)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from free_dfml.common.datasets import open_dataset
    from free_dfml.server.meta_generator import Teacher
    ds = open_dataset("glyphs", image_size=32, seed=0, images_per_class=100)
    models = build_models(ds, Path(a.cache), a.honest, a.each)
    if a.adaptive:
        from benchmarks import harmful
        models += [("random_calibrated", f"random_calibrated-{i}",
                    harmful.make("random_calibrated", ds, list(range(5 * (40 + i), 5 * (41 + i))), seed=i))
                   for i in range(a.each)]
    rows = []
    probe = probe_set(ds) if a.probe else None
    for kind, name, pkg in models:
        t = Teacher(pkg.build(), tuple(pkg.meta.input_shape), pkg.meta.num_classes, pkg.model_id)
        if a.probe:
            s = {"probe_separability": probe_separability(pkg.build(), *probe)}
        elif a.chosen:
            from free_dfml.server.screen import ScreenConfig, failures, signals
            s = signals(t, ScreenConfig())
            s["failed"] = float(bool(failures(s, ScreenConfig())))
        else:
            s = candidate_signals(t, steps=a.steps)
        rows.append({"kind": kind, "name": name, "holdout": pkg.meta.training.get("holdout_accuracy"),
                     "signals": {k: round(v, 5) for k, v in s.items()}})
        print(name, {k: round(v, 3) for k, v in s.items()}, flush=True)
    keys = [k for k in rows[0]["signals"] if k != "seconds"]
    honest = [r for r in rows if r["kind"] in ("honest", "weak")]
    kinds = sorted({r["kind"] for r in rows} - {"honest", "weak"})
    table = {}
    for k in keys:
        neg = [r["signals"][k] for r in honest if k in r["signals"]]
        table[k] = {kind: round(auc(neg, [r["signals"][k] for r in rows if r["kind"] == kind and k in r["signals"]]), 3)
                    for kind in kinds}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "probe" if a.probe else ("adaptive" if a.adaptive else "chosen") if a.chosen else "signals"
    cmd = "python -m experiments.screen_signals" + (" --probe" if a.probe else " --chosen" if a.chosen else "") \
        + (" --adaptive" if a.adaptive else "")
    (out / f"{stem}.json").write_text(json.dumps({"command": cmd, "rows": rows, "auc": table}, indent=1))
    lines = ["| signal | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{table[k][kind]:.2f}" for kind in kinds) + " |")
    if a.chosen or a.probe:
        lines += ["", "| model | kind | held-out | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['name']} | {r['kind']} | {r['holdout'] if r['holdout'] is not None else '-'} | "
                         + " | ".join(f"{r['signals'][k]:.3f}" for k in keys) + " |")
    (out / f"{stem}.md").write_text(f"`{cmd}`\n\nAUC (harmful score above honest+weak; 0 = below)\n\n"
                                    + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
