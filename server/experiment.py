"""The in-process main job (``make demo``): clients train, FREE learns from their models, all methods are scored.

1. ``clients`` client models (Conv4, ``classes_per_client`` meta-train classes each, disjoint by
   default) trained with :func:`free_dfml.client.train.train_client`; their packages form a zoo.
2. :class:`~free_dfml.server.trainer.FreeTrainer` runs on that zoo (meta-val accuracy tracked
   every ``track_every`` iterations for the plot).
3. FREE, ``random`` and ``average`` are scored on the meta-TEST split, 5-way 1-shot and 5-shot,
   ``eval_episodes`` episodes, 15 queries, 10 adaptation steps, the same inner lr and the same
   episodes (same seed) for every method.
4. Artefacts in ``out``: metrics.jsonl, results.json, results.md, accuracy.png, recovered.png.

``python -m free_dfml.server.experiment --preset demo --out runs/demo``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from free_dfml.common.partition import client_classes
from free_dfml.server import report
from free_dfml.server.trainer import FreeConfig, FreeTrainer

METHODS = ("free", "random", "average")


@dataclass
class ExperimentConfig:
    out: str = "runs/demo"
    dataset: str = "glyphs"
    image_size: int = 32
    data_seed: int = 0
    images_per_class: int | None = None
    cache_dir: str | None = None
    # clients
    clients: int = 20
    classes_per_client: int = 5
    disjoint: bool = True
    client_epochs: int = 20
    client_lr: float = 0.003
    client_width: int = 32
    # FREE
    free_preset: str = "quick"
    free: dict[str, Any] = field(default_factory=dict)    # FreeConfig overrides
    iterations: int = 40
    track_every: int = 20           # meta-val accuracy for the plot (0: off)
    track_episodes: int = 100
    # evaluation (the field's protocol; identical for every method)
    eval_episodes: int = 600
    eval_shots: tuple[int, ...] = (1, 5)
    eval_seed: int = 0
    methods: tuple[str, ...] = METHODS
    device: str = "auto"
    threads: int | None = 1         # torch intra-op threads (None: torch's default). Small convs on a
                                    # shared 2-core box run faster on 1 thread (measured, docs)
    progress: bool = True
    seed: int = 0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ExperimentConfig":
        presets: dict[str, dict[str, Any]] = {
            # measured on 2 CPU cores: see docs/algorithm.md ("Demo preset")
            "demo": dict(images_per_class=100, iterations=80, track_every=20, track_episodes=100),
            # a few seconds: used by the tests (tiny models, few episodes)
            "smoke": dict(clients=4, client_epochs=3, client_width=8, free_preset="tiny",
                          iterations=4, track_every=2, track_episodes=10, eval_episodes=20),
        }
        if name not in presets:
            raise ValueError(f"unknown experiment preset {name!r} (known: {', '.join(presets)})")
        return cls(**{**presets[name], **overrides})

    def free_config(self) -> FreeConfig:
        over = {"image_size": self.image_size, "learner_width": self.client_width,
                "iterations": self.iterations, "seed": self.seed, **self.free}
        return FreeConfig.preset(self.free_preset, **over)


def run_experiment(cfg: ExperimentConfig, dataset=None) -> dict:
    """Run the whole job; returns the results document (also written to ``out/results.json``)."""
    from free_dfml.client.train import TrainConfig, train_client
    from free_dfml.server.baselines import average_learner, random_learner
    from free_dfml.server.device import resolve_device
    from free_dfml.server.zoo import Zoo

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    console = report.console()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    metrics_path = out / "metrics.jsonl"
    metrics_f = open(metrics_path, "w", encoding="utf-8")

    def log(rec: dict) -> None:
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()

    if dataset is None:
        from free_dfml.common.datasets import open_dataset
        dataset = open_dataset(cfg.dataset, image_size=cfg.image_size, seed=cfg.data_seed,
                               images_per_class=cfg.images_per_class, cache_dir=cfg.cache_dir)
    train_split = dataset.split("train")
    t_data = time.perf_counter() - t_start

    # 1. clients --------------------------------------------------------------------------
    t0 = time.perf_counter()
    zoo = Zoo(out / "zoo")
    plan = client_classes(train_split.num_classes, cfg.clients, cfg.classes_per_client,
                          cfg.disjoint, cfg.seed)
    reports = []
    for i, classes in enumerate(plan):
        tc = TrainConfig(arch="conv4", arch_kwargs={"width": cfg.client_width}, epochs=cfg.client_epochs,
                         lr=cfg.client_lr, seed=cfg.seed * 1000 + i, device=str(device))
        pkg, rep = train_client(dataset, classes, tc)
        mid, _ = zoo.add(pkg)
        rep = {"event": "client", "client": i, "model_id": mid, "classes": classes, **rep}
        reports.append(rep)
        log(rep)
        if cfg.progress:
            console.print(f"client {i:2d}: classes {classes} holdout acc "
                          f"{rep['holdout_accuracy']:.2f}")
    t_clients = time.perf_counter() - t0

    # 2. FREE -----------------------------------------------------------------------------
    fcfg = cfg.free_config()
    if cfg.track_every:
        fcfg.eval_every = cfg.track_every
    val = dataset.split("val")
    trainer = FreeTrainer(zoo, fcfg, state_dir=out / "state", device=device, eval_data=val,
                          eval_episodes=cfg.track_episodes)
    t0 = time.perf_counter()
    trainer.run(cfg.iterations, progress=cfg.progress,
                on_metrics=lambda m: log({"event": "iteration", **m}))
    t_free = time.perf_counter() - t0

    # 3. evaluation -----------------------------------------------------------------------
    test = dataset.split("test")
    learners = {}
    if "free" in cfg.methods:
        learners["free"] = trainer.learner
    if "random" in cfg.methods:
        learners["random"] = random_learner(fcfg, norm=trainer.norm).to(device)
    if "average" in cfg.methods:
        learners["average"] = average_learner([zoo.package(m) for m in zoo.ids()], fcfg).to(device)
    results = report.evaluate_methods(
        learners, test, way=fcfg.way, shots=tuple(cfg.eval_shots), episodes=cfg.eval_episodes,
        steps=fcfg.eval_steps, lr=fcfg.inner_lr, seed=cfg.eval_seed, device=device,
        progress=cfg.progress, log=log)
    t_eval = sum(v["eval_s"] for res in results.values() for v in res.values())

    # 4. artefacts --------------------------------------------------------------------------
    plot_ok = report.save_accuracy_plot(trainer.history, out / "accuracy.png")
    grid_ok = report.save_recovered_grid(trainer, sorted(zoo.ids()), out / "recovered.png")
    wall = time.perf_counter() - t_start
    doc = {
        "config": {**asdict(cfg), "free_config": fcfg.to_dict()},
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "results": results,
        "times_s": {"data": round(t_data, 2), "clients": round(t_clients, 2), "free": round(t_free, 2),
                    "eval": round(t_eval, 2), "total": round(wall, 2),
                    # CPU seconds of this process (all threads): with 1 torch thread, what the wall
                    # time would be on an otherwise idle machine
                    "cpu": round(time.process_time() - cpu_start, 2)},
        "clients": {"count": len(reports),
                    "mean_holdout_accuracy": sum(r["holdout_accuracy"] for r in reports) / len(reports)},
        "free_iterations": trainer.iteration,
        "artefacts": {"plot": plot_ok and "accuracy.png", "grid": grid_ok and "recovered.png"},
    }
    above = report.free_above_random(results)
    if above is not None:
        doc["free_above_random"] = above
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "results.md").write_text(report.markdown(doc))
    metrics_f.close()
    report.print_table(console, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m free_dfml.server.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="demo | smoke")
    ap.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None, help="evaluation episodes (default 600)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    over: dict[str, Any] = {"out": a.out or f"runs/{a.preset}", "device": a.device,
                            "progress": not a.no_progress}
    for key, val in (("iterations", a.iterations), ("clients", a.clients),
                     ("eval_episodes", a.episodes), ("seed", a.seed), ("cache_dir", a.cache_dir)):
        if val is not None:
            over[key] = val
    doc = run_experiment(ExperimentConfig.preset(a.preset, **over))
    return 0 if doc else 1


if __name__ == "__main__":
    raise SystemExit(main())
