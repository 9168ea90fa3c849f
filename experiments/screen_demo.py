"""The data-free screen on the demo's own zoo: are all 20 demo clients passed, and are random-weight
models of the same shape caught?

    .venv/bin/python -m experiments.screen_demo [--out experiments/results/trust] [--random 13]

Trains the 20 clients of ``study("demo")`` exactly as the demo does (``train_partition``: same
classes, seeds and settings) and ``--random`` random-weight Conv4-32 models
(benchmarks/harmful.py), and screens each with the default ScreenConfig at the demo's learner size.
When every demo client passes and every random-weight model is caught, a screened zoo of the 20
clients plus those models uses exactly the clean zoo's models, so FREE trains exactly as on the
clean zoo (training is a function of the usable set). Writes ``demo-screen.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/trust")
    ap.add_argument("--random", type=int, default=13)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks import harmful
    from free_dfml.client.virtual_client import VirtualClients, train_partition
    from free_dfml.common.datasets import open_dataset
    from free_dfml.common.presets import study
    from free_dfml.server.meta_generator import Teacher
    from free_dfml.server.screen import ScreenConfig, failures, signals
    s = study("demo")
    d = s.data
    ds = open_dataset(d.dataset, image_size=d.image_size, seed=s.seed, images_per_class=d.images_per_class)
    clients = VirtualClients.from_study(s)
    cfg = ScreenConfig(image_size=d.image_size, channels=ds.image_shape[0])
    rows = []

    def screen(kind, name, pkg, holdout):
        t = Teacher(pkg.build(), tuple(pkg.meta.input_shape), pkg.meta.num_classes, pkg.model_id)
        sc = signals(t, cfg)
        why = failures(sc, cfg)
        rows.append({"kind": kind, "name": name, "id": pkg.model_id, "holdout": holdout, "passed": not why,
                     "reasons": why, "scores": {k: round(v, 4) for k, v in sc.items()}})
        print(name, "PASS" if not why else "FAIL", {k: round(v, 3) for k, v in sc.items()}, flush=True)

    n = s.clients.count
    for i in range(n):
        t0 = time.perf_counter()
        pkg, rep = train_partition(clients, i, n, ds)
        print(f"client {i} trained in {time.perf_counter() - t0:.1f} s", flush=True)
        screen("demo-client", f"client-{i}", pkg, rep.get("holdout_accuracy"))
    classes = list(range(s.clients.classes_per_client))
    for j in range(a.random):
        screen("random", f"random-{j}", harmful.make("random", ds, classes, width=s.clients.width, seed=j), None)
    demo = [r for r in rows if r["kind"] == "demo-client"]
    rnd = [r for r in rows if r["kind"] == "random"]
    summary = {"demo_clients": len(demo), "demo_passed": sum(r["passed"] for r in demo),
               "random": len(rnd), "random_caught": sum(not r["passed"] for r in rnd),
               "max_seconds": max(r["scores"]["seconds"] for r in rows),
               "mean_seconds": round(sum(r["scores"]["seconds"] for r in rows) / len(rows), 3)}
    for k in ("inversion_ce", "bn_mismatch", "noise_match"):
        summary[f"demo_{k}_range"] = [min(r["scores"][k] for r in demo), max(r["scores"][k] for r in demo)]
        summary[f"random_{k}_range"] = [min(r["scores"][k] for r in rnd), max(r["scores"][k] for r in rnd)] if rnd else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m experiments.screen_demo" + (f" --random {a.random}" if a.random != 13 else "")
    (out / "demo-screen.json").write_text(json.dumps({"command": cmd, "summary": summary, "rows": rows}, indent=1))
    lines = [f"`{cmd}`", "", json.dumps(summary), "", "| model | held-out | passed | inversion_ce | bn_mismatch | "
             "noise_match | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sc = r["scores"]
        ho = f"{r['holdout']:.2f}" if isinstance(r["holdout"], float) else "-"
        lines.append(f"| {r['name']} | {ho} | {r['passed']} | {sc['inversion_ce']:.3f} | {sc['bn_mismatch']:.3f} | "
                     f"{sc['noise_match']:.3f} | {sc['seconds']:.2f} |")
    (out / "demo-screen.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
