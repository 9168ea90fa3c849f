"""FreeTrainer: FREE (FIVE + memory bank + BELL + MAML replay) over a :class:`~free_dfml.server.zoo.Zoo`.

One iteration (:meth:`FreeTrainer.step`):

1. sample ``min(T, len(zoo))`` teachers (``schedule.teachers_per_iter``) from the zoo's ids in
   sorted order (models that arrived since the last iteration take part at once). Sorted, not in
   arrival order: training is a function of which models the zoo holds, so a simulation whose
   clients answer in another order gives the same result;
2. inversion: a FIVE step (``generator.inversion="five"``) or a fresh generator per teacher
   (``"scratch"``); ALL teachers' images go into the memory bank;
3. after ``schedule.warmup`` iterations: L_adv in the inversion loss, BELL (when
   ``bell.enabled``), MAML replay from the bank;
4. every ``schedule.eval_every`` iterations a few-shot evaluation on ``eval_data`` (if given).

The configuration is :class:`~free_dfml.common.config.FreeConfig` (re-exported here); each part
gets its own section.

All randomness comes from torch.Generator objects the trainer owns (teacher sampling, latents,
episodes), saved in the checkpoint: resuming continues the same streams.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from free_dfml.common.config import FreeConfig
from free_dfml.common.models import Normalized
from free_dfml.common.package import ModelPackage, make_package
from free_dfml.server import checkpoint as ckpt
from free_dfml.server.device import resolve_device
from free_dfml.server.inversion_engine import InversionEngine, inversion_engine
from free_dfml.server.memory_bank import MemoryBank
from free_dfml.server.meta_generator import MetaGenerator, Teacher, invert_from_scratch
from free_dfml.server.meta_learner import MetaLearner, learner_from_config, zoo_normalisation
from free_dfml.server.zoo import Zoo

if TYPE_CHECKING:
    from free_dfml.server.screen import Screen
    from free_dfml.server.tensorboard import MetricsSink

CHECKPOINT_NAME = "checkpoint.safetensors"

# config keys that may differ between a checkpoint and the run that resumes it: the schedule and
# the bounds, not what defines the models
RESUMABLE_CHANGES = {"schedule.iterations", "schedule.eval_every", "schedule.checkpoint_every",
                     "schedule.eval_shot", "replay.max_batches", "replay.patience", "bank.max_mb",
                     "generator.engine"}


def _fmt(v: Any) -> Any:
    return round(v, 5) if isinstance(v, float) else v


class FreeTrainer:
    def __init__(self, zoo: Zoo, cfg: FreeConfig, *, state_dir: Path | str | None = None,
                 device: str | torch.device = "auto", eval_data=None, eval_episodes: int = 100,
                 engine: InversionEngine | None = None, sink: MetricsSink | None = None,
                 screen: Screen | None = None):
        cfg.validate()
        self.zoo, self.cfg = zoo, cfg
        # the data-free screen (server/screen.py): every model is screened before it is first used,
        # the normalisation below included; None: no screen
        self.screen = screen
        self.device = resolve_device(device)
        # how FIVE steps run their inner loops (same results): given, or generator.engine on this device
        self.engine = engine if engine is not None else inversion_engine(cfg.generator.engine, self.device)
        self.sink = sink        # told of every iteration's metrics and every checkpoint (e.g. TensorBoard)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.eval_data, self.eval_episodes = eval_data, eval_episodes
        self.iteration = 0
        self.history: list[dict] = []
        self.last_inversions: list[tuple[str, float, torch.Tensor]] = []
        # every random stream is a generator we own (saved in checkpoints)
        self.rng = torch.Generator().manual_seed(cfg.schedule.seed)             # teachers, subsets, episodes
        self.gen_rng = torch.Generator().manual_seed(cfg.schedule.seed + 1)     # generator init + latents
        init_rng = torch.Generator().manual_seed(cfg.schedule.seed + 2)         # learner init
        lrn = cfg.learner
        if lrn.norm_mean is not None and lrn.norm_std is not None:
            self.norm = (tuple(lrn.norm_mean), tuple(lrn.norm_std))
        else:
            self.norm = zoo_normalisation([zoo.meta(m) for m in sorted(self.usable_ids())], lrn.channels) or \
                ((0.5,) * lrn.channels, (0.25,) * lrn.channels)
        self._build(init_rng)

    def _build(self, init_rng: torch.Generator) -> None:
        cfg = self.cfg
        self.learner: Normalized = learner_from_config(cfg.learner, mean=self.norm[0], std=self.norm[1],
                                                       rng=init_rng).to(self.device)
        self.meta = MetaLearner(self.learner, cfg.replay, cfg.bell, way=cfg.learner.way,
                                inner_lr=cfg.learner.inner_lr, device=self.device)
        self.metagen = MetaGenerator.from_config(cfg, rng=self.gen_rng, device=self.device)
        self.bank = self._new_bank()

    # ---------------------------------------------------------------------------------- pieces
    def _new_bank(self) -> MemoryBank:
        lrn = self.cfg.learner
        return MemoryBank.from_config(self.cfg.bank, (lrn.channels, lrn.image_size, lrn.image_size))

    def _teacher(self, model_id: str) -> Teacher:
        meta = self.zoo.meta(model_id)
        return Teacher(self.zoo.teacher(model_id, self.device), tuple(meta.input_shape),
                       meta.num_classes, model_id, meta.is_dp)

    def _subset(self, n: int) -> list[int]:
        """The teacher classes the way-way student sees this iteration (all of them if n <= way)."""
        way = self.cfg.learner.way
        if n <= way:
            return list(range(n))
        return sorted(torch.randperm(n, generator=self.rng)[:way].tolist())

    def _class_keys(self, model_id: str) -> list[str] | None:
        if not self.cfg.bank.global_classes:
            return None
        return self.zoo.meta(model_id).class_labels

    def usable_ids(self) -> list[str]:
        """The zoo's models training may use: not quarantined, and past the screen if there is one."""
        ids = self.zoo.usable_ids()
        return ids if self.screen is None else self.screen.usable(ids)

    @property
    def warming_up(self) -> bool:
        return self.iteration < self.cfg.schedule.warmup

    # -------------------------------------------------------------------------------- training
    def step(self) -> dict:
        ids = sorted(self.usable_ids())   # not arrival order (module docstring); no quarantined model
        if not ids:
            raise RuntimeError("the zoo is empty: FREE needs at least one model before it can train")
        cfg = self.cfg
        t0 = time.perf_counter()
        n_t = min(cfg.schedule.teachers_per_iter, len(ids))
        picked = [ids[i] for i in torch.randperm(len(ids), generator=self.rng)[:n_t].tolist()]
        teachers = [self._teacher(m) for m in picked]
        subsets = [self._subset(t.num_classes) for t in teachers]
        warm = self.warming_up
        lam_adv = 0.0 if warm else cfg.generator.lambda_adv
        student = None if lam_adv == 0 else self.meta.student()
        g, lrn = cfg.generator, cfg.learner
        if g.inversion == "five":
            results = self.engine.five_step(self.metagen, teachers, lambda_adv=lam_adv,
                                            student_model=self.learner, subsets=subsets)
        else:
            results = [invert_from_scratch(
                t, nz=g.nz, ngf=g.ngf, image_size=lrn.image_size, channels=lrn.channels,
                steps=g.scratch_steps, per_class=g.samples_per_class, rng=self.gen_rng,
                device=self.device, lr=g.lr, z_lr=g.z_lr, betas=tuple(g.betas),
                lambda_adv=lam_adv, student=student, subset=s, lambda_bn=g.lambda_bn,
                jitter=g.jitter)
                for t, s in zip(teachers, subsets)]
        # per teacher, for the runner's non-finite check (server/step_guard.py): id, CE, images
        self.last_inversions = [(t.model_id, r.final_ce, r.images) for t, r in zip(teachers, results)]
        for t, r in zip(teachers, results):     # EVERY teacher's images go to the bank
            self.bank.add(t.model_id, r.images, r.labels, self._class_keys(t.model_id))
        t_inv = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "iteration": self.iteration + 1, "teachers": len(teachers), "zoo_size": len(ids),
            "warmup": warm, "inversion_ce": sum(r.final_ce for r in results) / len(results),
            "inversion_s": t_inv, "bank_images": len(self.bank)}
        if not warm:
            if cfg.bell.enabled:
                metrics.update(self.meta.bell([(t, r.images, r.labels, s)
                                               for t, r, s in zip(teachers, results, subsets)],
                                              rng=self.rng))
            metrics.update(self.meta.replay(self.bank, self.rng))
        self.iteration += 1
        if self.eval_data is not None and cfg.schedule.eval_every and self.iteration % cfg.schedule.eval_every == 0:
            metrics.update(self.evaluate())
        metrics["step_s"] = time.perf_counter() - t0
        metrics = {k: _fmt(v) for k, v in metrics.items()}
        self.history.append(metrics)
        if self.sink is not None:
            self.sink.on_step(self, metrics)
        return metrics

    def evaluate(self, data=None, *, shot: int | None = None, episodes: int | None = None) -> dict:
        from free_dfml.common.evaluation import evaluate
        data = self.eval_data if data is None else data
        lrn = self.cfg.learner
        shot = self.cfg.schedule.eval_shot if shot is None else shot
        res = evaluate(self.learner, data, way=lrn.way, shot=shot,
                       episodes=episodes or self.eval_episodes, steps=lrn.adapt_steps,
                       lr=lrn.inner_lr, seed=self.cfg.schedule.seed + 1000, device=self.device)
        return {f"eval_{shot}shot": res.mean, f"eval_{shot}shot_ci95": res.ci95}

    def run(self, iterations: int, *, stop: threading.Event | None = None, progress: bool = True,
            on_metrics: Callable[[dict], None] | None = None) -> None:
        """Train until ``iterations`` iterations in total have been done (or ``stop`` is set)."""
        bar = None
        if progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            bar = Progress(TextColumn("FREE"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                           TimeElapsedColumn(), TimeRemainingColumn())
            bar.start()
            task = bar.add_task("FREE", total=iterations, completed=self.iteration, info="")
        try:
            while self.iteration < iterations:
                if stop is not None and stop.is_set():
                    break
                m = self.step()
                if on_metrics is not None:
                    on_metrics(m)
                if bar is not None:
                    info = f"ce {m['inversion_ce']:.3f}"
                    if "replay_acc" in m:
                        info += f" replay acc {m['replay_acc']:.2f}"
                    bar.update(task, completed=self.iteration, info=info)
                every = self.cfg.schedule.checkpoint_every
                if self.state_dir is not None and every and self.iteration % every == 0:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.stop()
            if self.state_dir is not None:
                self.checkpoint()

    # ------------------------------------------------------------------------------ persistence
    @property
    def checkpoint_path(self) -> Path:
        if self.state_dir is None:
            raise RuntimeError("this trainer has no state_dir")
        return self.state_dir / CHECKPOINT_NAME

    def checkpoint(self) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        tensors.update(ckpt.prefixed(self.learner.state_dict(), "learner"))
        tensors.update(ckpt.prefixed(self.metagen.generator.state_dict(), "generator"))
        t_gen, i_gen = ckpt.optimizer_tensors(self.metagen.optimizer, "generator")
        t_lrn, i_lrn = ckpt.optimizer_tensors(self.meta.optimizer, "learner")
        tensors.update(t_gen)
        tensors.update(t_lrn)
        bank_t, bank_info = self.bank.state_dict()
        tensors.update(bank_t)
        tensors["rng.trainer"] = ckpt.rng_tensor(self.rng)
        tensors["rng.generator"] = ckpt.rng_tensor(self.gen_rng)
        meta = {"iteration": self.iteration, "config": self.cfg.to_dict(), "history": self.history,
                "norm": [list(self.norm[0]), list(self.norm[1])], "bank": bank_info,
                "optimizers": {"generator": i_gen, "learner": i_lrn}}
        path = ckpt.save_checkpoint(self.checkpoint_path, tensors, meta)
        if self.sink is not None:
            self.sink.on_checkpoint(self)
        return path

    @classmethod
    def from_state(cls, state, device: str | torch.device = "auto") -> "FreeTrainer":
        """The trainer of a server state folder (:class:`~free_dfml.server.state.StateDir`) as its last
        checkpoint left it, config included. ``FileNotFoundError`` without a checkpoint;
        ``ckpt.CheckpointError`` / ``ValueError`` / ``KeyError`` for one that cannot be loaded."""
        path = state.checkpoint_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no training checkpoint in {state.root} yet (the server saves one "
                                    "every checkpoint-every iterations and on stop)")
        loaded = ckpt.load_checkpoint(path)
        trainer = cls(Zoo(state.zoo_dir), FreeConfig.from_dict(loaded[1]["config"]),
                      state_dir=state.checkpoint_dir, device=device)
        trainer.resume(loaded)
        return trainer

    def resume(self, loaded: tuple[dict[str, torch.Tensor], dict] | None = None) -> bool:
        """Load ``state_dir``'s checkpoint if there is one; True if it was loaded. ``loaded``: that
        checkpoint's (tensors, meta) when the caller has read it already."""
        if loaded is None:
            if self.state_dir is None or not self.checkpoint_path.exists():
                return False
            loaded = ckpt.load_checkpoint(self.checkpoint_path)
        tensors, meta = loaded
        saved = FreeConfig.from_dict(meta["config"])      # nested, or the flat form of older checkpoints
        if saved != self.cfg:
            mine = self.cfg.flat()
            diff = sorted(k for k, v in saved.flat().items() if mine.get(k) != v)
            if saved.generator.inversion == self.cfg.generator.inversion == "five":
                diff = [k for k in diff if k != "generator.scratch_steps"]   # read by scratch inversion only
            if set(diff) - RESUMABLE_CHANGES:
                raise ValueError(f"checkpoint config differs in {', '.join(diff)}; "
                                 "use the same config (or a fresh state_dir)")
        # load into the existing objects
        self.norm = (tuple(meta["norm"][0]), tuple(meta["norm"][1]))
        with torch.no_grad():
            self.learner.mean.copy_(torch.tensor(self.norm[0]).view_as(self.learner.mean))
            self.learner.std.copy_(torch.tensor(self.norm[1]).view_as(self.learner.std))
        self.bank = self._new_bank()
        self.learner.load_state_dict(ckpt.unprefixed(tensors, "learner"))
        self.metagen.generator.load_state_dict(ckpt.unprefixed(tensors, "generator"))
        ckpt.load_optimizer(self.metagen.optimizer, "generator", tensors, meta["optimizers"]["generator"])
        ckpt.load_optimizer(self.meta.optimizer, "learner", tensors, meta["optimizers"]["learner"])
        self.bank.load_state_dict({k: v for k, v in tensors.items() if k.startswith("bank.")}, meta["bank"])
        ckpt.set_rng(self.rng, tensors["rng.trainer"])
        ckpt.set_rng(self.gen_rng, tensors["rng.generator"])
        self.iteration = int(meta["iteration"])
        self.history = list(meta["history"])
        return True

    # --------------------------------------------------------------------------------- outputs
    def recovered_images(self, model_id: str, per_class: int = 8) -> torch.Tensor:
        """Float [n, C, H, W] recovered images of one model (newest from the bank, or freshly inverted)."""
        x, _ = self.bank.model_images(model_id, per_class)
        if len(x):
            return x
        if model_id not in self.zoo:
            raise KeyError(f"no model {model_id!r} in the zoo")
        rng = torch.Generator().manual_seed(int(model_id[:12], 16))
        saved = self.metagen.rng
        self.metagen.rng = rng    # do not disturb the training stream
        try:
            res = self.metagen.adapt(self._teacher(model_id))
        finally:
            self.metagen.rng = saved
        keep = torch.cat([torch.nonzero(res.labels == c).flatten()[:per_class]
                          for c in res.labels.unique()])
        return res.images[keep].cpu()

    def export(self) -> ModelPackage:
        cfg, lrn = self.cfg, self.cfg.learner
        training = {"method": "free" if cfg.bell.enabled else "free-noalign",
                    "inversion": cfg.generator.inversion, "way": lrn.way, "adapt_steps": lrn.adapt_steps,
                    "inner_lr": lrn.inner_lr, "iteration": self.iteration, "zoo_size": len(self.zoo)}
        return make_package(self.learner, arch=lrn.arch, arch_kwargs={"width": lrn.width, "norm": lrn.norm},
                            num_classes=lrn.way, input_shape=(lrn.channels, lrn.image_size, lrn.image_size),
                            mean=self.norm[0], std=self.norm[1], training=training)
