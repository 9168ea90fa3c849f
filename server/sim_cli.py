"""``free-sim``: the whole federation in one process with Flower's simulation engine (Ray backend).

    free-sim run --clients N --dataset glyphs --classes-per-client 5 --arch conv4|mix
                 [--iterations N] [--out runs/NAME] [--preset demo|quick|tiny] [--episodes N] [--seed S]

The SAME ServerApp and ClientApp as a deployment (server/server_app.py, client/client_app.py)
run under ``flwr.simulation.run_simulation``: each virtual client (``partition-id``) trains its
own model on its own classes and publishes only weights + metadata; the ServerApp validates them
into the zoo of ``OUT/state`` and trains FREE for ``iterations`` iterations. Then FREE, a random
initialisation and the zoo average are scored on the meta-test split (5-way 1-shot and 5-shot,
95% intervals), and ``OUT`` receives ``metrics.jsonl``, ``results.json``, ``results.md``,
``accuracy.png`` (meta-val accuracy over iterations) and ``recovered.png`` (images recovered from
each client model); the table and figures come from server/report.py.

Python API: :func:`run_sim` (used by examples/simulate.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from free_dfml.server.cli import CliError, run_cli

ARCH_MIX = ["conv4", "resnet10"]


@dataclass
class SimConfig:
    clients: int = 4
    dataset: str = "glyphs"
    image_size: int = 32
    images_per_class: int | None = None
    classes_per_client: int = 5
    arch: str = "conv4"                 # an architecture name, or "mix" (conv4 / resnet10 alternating)
    out: str = "runs/sim"
    preset: str = "quick"
    iterations: int | None = None       # None: the preset's
    client_epochs: int = 10
    client_width: int = 16
    free_preset: str = "quick"
    free: dict[str, Any] = field(default_factory=dict)
    track_every: int = 10
    track_episodes: int = 50
    eval_episodes: int = 200
    eval_shots: tuple[int, ...] = (1, 5)
    dp_epsilon: float | None = None
    device: str = "cpu"
    seed: int = 0
    cpus_per_client: float = 1.0
    threads: int = 0                    # torch threads of the server's trainer and evaluation (0: torch's
                                        # default, one per core: fastest on an idle machine; on a machine
                                        # busy with other jobs 1 avoids oversubscription, measured 10x)
    collect_timeout: float = 1800.0

    PRESETS = {
        # like server/experiment.py's demo, federated
        # `make demo`: 20 clients, all three methods scored on 300 meta-test episodes so that the whole
        # run (glyph rendering and Ray start included) stays within about 10 minutes on 2 CPU cores
        "demo": dict(clients=20, images_per_class=100, client_epochs=20, client_width=32, free_preset="quick",
                     iterations=80, track_every=20, track_episodes=100, eval_episodes=300),
        "quick": dict(client_epochs=10, client_width=16, free_preset="quick", iterations=30, track_every=10,
                      track_episodes=50, eval_episodes=200),
        "tiny": dict(client_epochs=2, client_width=8, free_preset="tiny", iterations=4, track_every=2,
                     track_episodes=5, eval_episodes=10),
    }

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> "SimConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(cls.PRESETS)})")
        over = {k: v for k, v in overrides.items() if v is not None}
        return cls(preset=name, **{**cls.PRESETS[name], **over})

    def archs(self) -> list[str]:
        return list(ARCH_MIX) if self.arch == "mix" else [self.arch]


def run_sim(cfg: SimConfig, *, progress: bool = True) -> dict:
    """Run the simulated federation, evaluate, write the artefacts; returns the results document."""
    from flwr.simulation import run_simulation

    from free_dfml.client.client_app import SimClientSettings, make_client_app
    from free_dfml.common.datasets import open_dataset
    from free_dfml.common.models import ARCHITECTURES
    from free_dfml.server import report
    from free_dfml.server.baselines import average_learner, random_learner
    from free_dfml.server.server_app import ServerSettings, make_server_app
    from free_dfml.server.state import StateDir
    from free_dfml.server.zoo import Zoo

    if cfg.clients < 1:
        raise ValueError("clients must be >= 1")
    for a in cfg.archs():
        if a not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {a!r} (known: {', '.join(ARCHITECTURES)}, or mix)")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "state"
    if state_dir.exists():
        shutil.rmtree(state_dir)          # a simulation is a fresh run
    for name in ("metrics.jsonl", "results.json", "results.md", "accuracy.png", "recovered.png"):
        (out / name).unlink(missing_ok=True)
    ds = open_dataset(cfg.dataset, image_size=cfg.image_size, seed=cfg.seed, images_per_class=cfg.images_per_class)
    n_train = len(ds.classes("train"))
    if cfg.classes_per_client > n_train:
        raise ValueError(f"{cfg.classes_per_client} classes per client but the train split has {n_train}")
    c, h, _ = ds.image_shape
    iterations = cfg.iterations if cfg.iterations is not None else 30
    free_over = {"image_size": h, "channels": c, "learner_width": cfg.client_width, "iterations": iterations,
                 "seed": cfg.seed, "eval_every": cfg.track_every, **cfg.free}
    settings = ServerSettings(
        state_dir=str(state_dir), poll_interval=0.2, checkpoint_every=max(1, iterations // 4),
        min_models=cfg.clients, device=cfg.device, threads=cfg.threads, preset=cfg.free_preset, free_config=free_over,
        max_iterations=iterations, expected_models=cfg.clients, finish_when_done=True,
        collect_timeout=cfg.collect_timeout, eval_data=cfg.dataset if cfg.track_every else "",
        eval_split="val", eval_episodes=cfg.track_episodes)
    client = SimClientSettings(
        dataset=cfg.dataset, image_size=cfg.image_size, images_per_class=cfg.images_per_class,
        classes_per_client=cfg.classes_per_client, archs=cfg.archs(), arch_kwargs={"width": cfg.client_width},
        epochs=cfg.client_epochs, seed=cfg.seed, dp_epsilon=cfg.dp_epsilon, out_dir=str(out / "clients"))
    t0 = time.perf_counter()
    run_simulation(server_app=make_server_app(settings), client_app=make_client_app(client),
                   num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0}})
    t_fed = time.perf_counter() - t0

    state = StateDir(state_dir)
    zoo = Zoo(state.zoo_dir)
    subs = list(state.submissions())
    if len(zoo) == 0:
        reasons = [s.get("reason") for s in subs if s.get("event") == "rejected"]
        raise RuntimeError("no client model reached the zoo" + (f": {reasons[0]}" if reasons else ""))
    from free_dfml.server.cli import load_trainer
    trainer = load_trainer(state, cfg.device)
    fcfg = trainer.cfg
    test = ds.split("test")
    learners = {"free": trainer.learner, "random": random_learner(fcfg, norm=trainer.norm)}
    try:
        learners["average"] = average_learner([zoo.package(m) for m in zoo.ids()], fcfg)
    except ValueError:
        pass     # no Conv4 group to average (e.g. an all-ResNet zoo)
    eval_log: list[dict] = []
    results = report.evaluate_methods(
        learners, test, way=fcfg.way, shots=tuple(cfg.eval_shots), episodes=cfg.eval_episodes,
        steps=fcfg.eval_steps, lr=fcfg.inner_lr, seed=cfg.seed, device=trainer.device,
        progress=progress, log=eval_log.append)
    t_eval = sum(v["eval_s"] for res in results.values() for v in res.values())

    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        for s in subs:
            f.write(json.dumps({"event": "submission", "outcome": s.get("event"),
                                **{k: v for k, v in s.items() if k != "event"}}) + "\n")
        for m in trainer.history:
            f.write(json.dumps({"event": "iteration", **m}) + "\n")
        for e in eval_log:
            f.write(json.dumps(e) + "\n")
    plot_ok = report.save_accuracy_plot(trainer.history, out / "accuracy.png")
    grid_ok = report.save_recovered_grid(trainer, sorted(zoo.ids()), out / "recovered.png")
    import torch
    accepted = [s for s in subs if s.get("event") == "accepted"]
    t_free = float(sum(m.get("step_s", 0.0) for m in trainer.history))
    doc = {
        "config": {**asdict(cfg), "eval_episodes": cfg.eval_episodes, "free_config": fcfg.to_dict()},
        "mode": "flower-simulation", "device": str(trainer.device), "torch_threads": torch.get_num_threads(),
        "results": results,
        "times_s": {"data": 0.0, "clients": round(max(0.0, t_fed - t_free), 2), "free": round(t_free, 2),
                    "federation": round(t_fed, 2), "cpu": round(time.process_time(), 2),
                    "eval": round(t_eval, 2), "total": round(time.perf_counter() - t_start, 2)},
        "clients": {"count": cfg.clients, "accepted": len(accepted),
                    "rejected": [s.get("reason") for s in subs if s.get("event") == "rejected"]},
        "zoo_size": len(zoo), "free_iterations": trainer.iteration,
        "artefacts": {"plot": plot_ok and "accuracy.png", "grid": grid_ok and "recovered.png",
                      "metrics": "metrics.jsonl", "state": "state"},
    }
    above = report.free_above_random(results)
    if above is not None:
        doc["free_above_random"] = above
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    md = report.markdown(doc, title=f"FREE federated simulation ({cfg.clients} Flower clients)")
    md += (f"\nFederation (client training + FREE through Flower's simulation engine): {t_fed:.0f} s; "
           f"{len(accepted)} of {cfg.clients} client models accepted.\n")
    (out / "results.md").write_text(md)
    report.print_table(report.console(), doc)
    return doc


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Simulate a FREE federation with Flower's simulation engine (Ray).")


@app.callback()
def _root() -> None:
    """Simulate a FREE federation with Flower's simulation engine (Ray)."""


@app.command()
def run(
    clients: Optional[int] = typer.Option(None, "--clients", min=1,
                                          help="number of virtual clients (SuperNodes; default: preset's, demo 20, else 4)"),
    dataset: str = typer.Option("glyphs", "--dataset", help="glyphs | DIR | cifar-fs:PATH"),
    classes_per_client: int = typer.Option(5, "--classes-per-client", min=2),
    arch: str = typer.Option("conv4", "--arch", help="conv4 | resnet10 | resnet18 | mix"),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="FREE iterations (default: preset)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/sim-<preset>)"),
    preset: str = typer.Option("quick", "--preset", help="demo | quick | tiny"),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="evaluation episodes"),
    client_epochs: Optional[int] = typer.Option(None, "--client-epochs", min=1),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="clients train with DP-SGD to this epsilon"),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda (the server's trainer)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the simulated federation and print the evaluation table."""
    if preset not in SimConfig.PRESETS:
        raise CliError(f"--preset must be one of {', '.join(SimConfig.PRESETS)}, got {preset!r}")
    from free_dfml.common.models import ARCHITECTURES
    if arch != "mix" and arch not in ARCHITECTURES:
        raise CliError(f"--arch must be one of {', '.join(ARCHITECTURES)} or mix, got {arch!r}")
    if dp_epsilon is not None and dp_epsilon <= 0:
        raise CliError("--dp-epsilon must be > 0")
    cfg = SimConfig.preset_config(preset, clients=clients, dataset=dataset, classes_per_client=classes_per_client,
                                  arch=arch, iterations=iterations, out=str(out or f"runs/sim-{preset}"),
                                  eval_episodes=episodes, client_epochs=client_epochs, dp_epsilon=dp_epsilon,
                                  device=device, seed=seed)
    from free_dfml.common.datasets import DataError
    try:
        doc = run_sim(cfg)
    except DataError as e:
        raise CliError(str(e)) from None
    except (ValueError, RuntimeError) as e:
        raise CliError(str(e).splitlines()[0] if str(e) else type(e).__name__, 1) from None
    print(f"wrote {cfg.out}/results.md, results.json, metrics.jsonl"
          + (", accuracy.png" if doc["artefacts"]["plot"] else "")
          + (", recovered.png" if doc["artefacts"]["grid"] else ""))


def main() -> None:
    sys.exit(run_cli(app, "free-sim"))


if __name__ == "__main__":
    main()
