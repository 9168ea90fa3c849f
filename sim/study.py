"""The one study driver: clients train, the server learns FREE from their models, every method is scored.

    run_study(study("demo"), "runs/demo")                          # through Flower's simulation engine
    run_study(study("demo"), "runs/demo-ip", transport="inprocess")  # the same study in this process

1. **Clients.** ``study.clients.count`` virtual clients (:mod:`free_dfml.client.virtual_client`), each
   training its own model on its own block of meta-train classes.
2. **Server.** Transport ``flower``: the deployment's ServerApp and ClientApp run under ``flwr run`` on
   a local simulation federation (:mod:`free_dfml.sim.federation`); the packages cross the wire, are
   validated into the zoo of ``OUT/state`` and FREE trains there. Transport ``inprocess``: the same
   client function and the same FREE trainer in this process, no Flower (fast, and the only way to
   use a data set object that is not a spec, as the tests do). Both give the same zoo, and with the
   same torch thread count the same FREE training, to the last digit.
3. **Evaluation.** FREE, a random initialisation and the zoo average on the meta-TEST split, on the
   same episodes (``study.evaluation``); meta-val accuracy was tracked during training.
4. **Artefacts** in ``OUT``: ``metrics.jsonl``, ``results.json``, ``results.md``, ``accuracy.png``,
   ``recovered.png``, ``clients/`` (each client's package) and ``state/`` (a server state folder:
   ``free-server evaluate --state OUT/state`` and ``export`` work on it).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from free_dfml.client.virtual_client import RUN_CONFIG_KEY, VirtualClients, train_partition
from free_dfml.common.presets import Study

TRANSPORTS = ("flower", "inprocess")
ARTEFACTS = ("metrics.jsonl", "results.json", "results.md", "accuracy.png", "recovered.png")


def server_settings(study: Study, state_dir: Path, *, device: str, threads: int, image_shape: tuple[int, ...],
                    collect_timeout: float = 1800.0):
    """The ServerApp's settings for a study: FREE from ``study.free`` on the data's image shape."""
    from free_dfml.server.settings import ServerSettings
    c, h, _ = image_shape
    iterations = study.free.schedule.iterations
    ev = study.evaluation
    free = study.free.replace(learner={"image_size": h, "channels": c},
                              schedule={"eval_every": ev.track_every})
    return ServerSettings(
        state_dir=str(state_dir), poll_interval=0.2, checkpoint_every=max(1, iterations // 4),
        min_models=study.clients.count, device=device, threads=threads,
        preset="paper",                   # the defaults: free_config below sets every field anyway
        free_config=free.to_dict(), max_iterations=iterations, expected_models=study.clients.count,
        finish_when_done=True, collect_timeout=collect_timeout,
        eval_data=study.data.dataset if ev.track_every else "", eval_split="val",
        eval_episodes=ev.track_episodes)


def _check(study: Study, dataset) -> None:
    from free_dfml.common.models import ARCHITECTURES
    if study.clients.count < 1:
        raise ValueError("clients must be >= 1")
    for a in VirtualClients(arch=study.clients.arch).archs():
        if a not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {a!r} (known: {', '.join(ARCHITECTURES)}, or mix)")
    n_train = dataset.split("train").num_classes
    if study.clients.classes_per_client > n_train:
        raise ValueError(f"{study.clients.classes_per_client} classes per client but the train split has {n_train}")


def _fresh_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "clients", "flower"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)          # a study is a fresh run
    for name in ARTEFACTS:
        (out / name).unlink(missing_ok=True)


def _federate_flower(study: Study, settings, clients: VirtualClients, out: Path, *, verbose: bool) -> None:
    from free_dfml.sim.federation import LocalSimulation, write_app
    app_dir = out / "flower" / "app"
    write_app(app_dir, {**settings.to_run_config(), RUN_CONFIG_KEY: clients.to_json()})
    with LocalSimulation(out / "flower", verbose=verbose) as fed:
        fed.run(app_dir, num_supernodes=study.clients.count)


def _federate_inprocess(study: Study, settings, clients: VirtualClients, dataset, log, *, from_spec: bool,
                        progress: bool) -> None:
    """The same clients and the same training runner as the ServerApp, without Flower."""
    from free_dfml.server.state import StateDir
    from free_dfml.server.training_runner import TrainerRunner
    from free_dfml.server.zoo import Zoo
    state = StateDir(settings.state_dir).create()
    zoo = Zoo(state.zoo_dir)
    n = study.clients.count
    for i in range(n):
        pkg, rep = train_partition(clients, i, n, dataset)
        mid, new = zoo.add(pkg)
        state.log_submission({"event": "accepted", "node": i, "model_id": mid, "new": new,
                              "arch": pkg.meta.arch, "num_classes": pkg.meta.num_classes})
        log({"event": "client", "model_id": mid, **rep})
        if progress:
            print(f"client {i:2d}: classes {rep['classes']} holdout acc {rep['holdout_accuracy']:.2f}", flush=True)
    # the ServerApp opens its tracking data from the spec; a data set object (tests) has no spec
    runner = TrainerRunner(zoo, settings, state,
                           eval_data=dataset.split("val") if settings.eval_data and not from_spec else None)
    runner.maybe_start(force=True)
    if runner.error:
        raise RuntimeError(f"FREE could not start: {runner.error}")
    _follow(runner, settings.max_iterations, progress)
    if runner.error:
        raise RuntimeError(f"FREE stopped on an error: {runner.error}")


def _follow(runner, iterations: int, progress: bool) -> None:
    """Wait for the training thread, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("FREE"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("FREE", total=iterations)
        while runner.thread is not None and runner.thread.is_alive():
            runner.thread.join(0.5)
            bar.update(task, completed=runner.iteration)
        bar.update(task, completed=runner.iteration)


def run_study(study: Study, out: str | Path, *, transport: str = "flower", device: str = "cpu", threads: int = 0,
              dp_epsilon: float | None = None, dataset=None, progress: bool = True) -> dict[str, Any]:
    """Run ``study`` (see the module docstring); returns the results document (also ``OUT/results.json``)."""
    import torch

    from free_dfml.common.datasets import open_dataset
    from free_dfml.server import report
    from free_dfml.server.baselines import average_learner, random_learner
    from free_dfml.server.state import StateDir
    from free_dfml.server.zoo import Zoo

    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if transport == "flower" and dataset is not None:
        raise ValueError("the flower transport opens its data set from the study's spec; pass dataset= "
                         "only with transport='inprocess'")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if threads:
        torch.set_num_threads(int(threads))    # this process's evaluation too: its last digits depend on it
    out = Path(out)
    d = study.data
    from_spec = dataset is None
    if from_spec:
        dataset = open_dataset(d.dataset, image_size=d.image_size, seed=study.seed,
                               images_per_class=d.images_per_class)
    _check(study, dataset)
    _fresh_out(out)
    state_dir = out / "state"
    settings = server_settings(study, state_dir, device=device, threads=threads, image_shape=dataset.image_shape)
    clients = VirtualClients.from_study(study, dp_epsilon=dp_epsilon, out_dir=str(out / "clients"))
    records: list[dict] = []
    t0 = time.perf_counter()
    if transport == "flower":
        _federate_flower(study, settings, clients, out, verbose=progress)
    else:
        _federate_inprocess(study, settings, clients, dataset, records.append, from_spec=from_spec,
                            progress=progress)
    t_fed = time.perf_counter() - t0

    state = StateDir(state_dir)
    zoo = Zoo(state.zoo_dir)
    subs = list(state.submissions())
    if len(zoo) == 0:
        reasons = [s.get("reason") for s in subs if s.get("event") == "rejected"]
        raise RuntimeError("no client model reached the zoo" + (f": {reasons[0]}" if reasons else ""))
    from free_dfml.server.trainer import FreeTrainer
    trainer = FreeTrainer.from_state(state, device)
    fcfg = trainer.cfg
    learners = {"free": trainer.learner, "random": random_learner(fcfg, norm=trainer.norm)}
    try:
        learners["average"] = average_learner([zoo.package(m) for m in zoo.ids()], fcfg)
    except ValueError:
        pass     # no Conv4 group to average (e.g. an all-ResNet zoo)
    ev = study.evaluation
    results = report.evaluate_methods(
        learners, dataset.split("test"), way=fcfg.learner.way, shots=tuple(ev.shots), episodes=ev.episodes,
        steps=fcfg.learner.adapt_steps, lr=fcfg.learner.inner_lr, seed=ev.seed, device=trainer.device,
        progress=progress, log=records.append)
    t_eval = sum(v["eval_s"] for res in results.values() for v in res.values())

    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        for s in subs:
            f.write(json.dumps({"event": "submission", "outcome": s.get("event"),
                                **{k: v for k, v in s.items() if k != "event"}}) + "\n")
        for m in trainer.history:
            f.write(json.dumps({"event": "iteration", **m}) + "\n")
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
    plot_ok = report.save_accuracy_plot(trainer.history, out / "accuracy.png")
    grid_ok = report.save_recovered_grid(trainer, sorted(zoo.ids()), out / "recovered.png")
    accepted = [s for s in subs if s.get("event") == "accepted"]
    holdout = [zoo.meta(m).training.get("holdout_accuracy") for m in zoo.ids()]
    holdout = [h for h in holdout if isinstance(h, (int, float))]
    t_free = float(sum(m.get("step_s", 0.0) for m in trainer.history))
    doc: dict[str, Any] = {
        "config": {"study": study.to_dict(), "transport": transport, "dp_epsilon": dp_epsilon,
                   "eval_episodes": ev.episodes, "free_config": fcfg.to_dict()},
        "mode": "flower-simulation" if transport == "flower" else "in-process",
        "device": str(trainer.device), "torch_threads": torch.get_num_threads(),
        "results": results,
        "times_s": {"data": 0.0, "clients": round(max(0.0, t_fed - t_free), 2), "free": round(t_free, 2),
                    "federation": round(t_fed, 2), "cpu": round(time.process_time() - cpu_start, 2),
                    "eval": round(t_eval, 2), "total": round(time.perf_counter() - t_start, 2)},
        "clients": {"count": study.clients.count, "accepted": len(accepted),
                    "rejected": [s.get("reason") for s in subs if s.get("event") == "rejected"],
                    "mean_holdout_accuracy": sum(holdout) / len(holdout) if holdout else None},
        "zoo_size": len(zoo), "free_iterations": trainer.iteration,
        "artefacts": {"plot": plot_ok and "accuracy.png", "grid": grid_ok and "recovered.png",
                      "metrics": "metrics.jsonl", "state": "state"},
    }
    above = report.free_above_random(results)
    if above is not None:
        doc["free_above_random"] = above
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    how = "Flower clients" if transport == "flower" else "clients, in-process"
    md = report.markdown(doc, title=f"FREE study '{study.name}' ({study.clients.count} {how})")
    md += (f"\nClients + FREE ({doc['mode']}): {t_fed:.0f} s; {len(accepted)} of {study.clients.count} "
           "client models accepted.\n")
    (out / "results.md").write_text(md)
    report.print_table(report.console(), doc)
    return doc
