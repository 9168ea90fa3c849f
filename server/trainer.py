"""FreeTrainer: FREE (FIVE + memory bank + BELL + MAML replay) over a :class:`~free_dfml.server.zoo.Zoo`.

One iteration (:meth:`FreeTrainer.step`):

1. sample ``min(T, len(zoo))`` teachers from the zoo's ids in sorted order (models that arrived
   since the last iteration take part at once). Sorted, not in arrival order: training is a
   function of which models the zoo holds, so a simulation whose clients answer in another order
   gives the same result;
2. inversion: a FIVE step (``inversion="five"``) or a fresh generator per teacher
   (``inversion="scratch"``); ALL teachers' images go into the memory bank;
3. after ``warmup`` iterations: L_adv in the inversion loss, BELL (when ``align``), MAML replay
   from the bank;
4. every ``eval_every`` iterations a few-shot evaluation on ``eval_data`` (if given).

All randomness comes from torch.Generator objects the trainer owns (teacher sampling, latents,
episodes), saved in the checkpoint: resuming continues the same streams.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from free_dfml.common.models import Normalized
from free_dfml.common.package import ModelPackage, make_package
from free_dfml.server import checkpoint as ckpt
from free_dfml.server.device import resolve_device
from free_dfml.server.memory_bank import MemoryBank
from free_dfml.server.meta_generator import MetaGenerator, Teacher, invert_from_scratch
from free_dfml.server.meta_learner import MetaLearner, build_learner, zoo_normalisation
from free_dfml.server.zoo import Zoo

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class FreeConfig:
    # task
    way: int = 5
    # FIVE
    teachers_per_iter: int = 4          # T
    inner_steps: int = 5                # k
    samples_per_class: int = 20         # m
    nz: int = 256
    ngf: int = 64
    gen_lr: float = 1e-3                # inner Adam on phi_t
    z_lr: float = 1e-3
    gen_meta_lr: float = 1e-3           # outer Adam on phi
    gen_betas: tuple[float, float] = (0.5, 0.999)
    lambda_adv: float = 1.0
    lambda_bn: float = 0.0
    # DeepInversion jitter: the teacher (and L_adv's meta-learner) sees the generated images circularly
    # shifted by a random offset of up to this many pixels (rows and columns) at every inner step;
    # 0: off (the paper). Meta-val: +1.5 points from 160 iterations on (docs/algorithm.md)
    inversion_jitter: int = 0
    warmup: int = 20
    inversion: str = "five"             # "five" | "scratch"
    scratch_steps: int = 200
    # batch same-architecture teachers through one FIVE step (server/batched_inversion.py: grouped
    # convolutions for Conv4 teachers, else vmap): the same results to float rounding. "auto": on for
    # CUDA, off for CPU. Measured on an H200 with the vmap engine, one FIVE step against the loop:
    # 1.4-1.7x at T = 4 (the default teachers_per_iter), 2.6-3.2x at T = 16 with paper sizes, 6.5-7.1x
    # with the quick sizes. On CPU, grouped convolutions: 1.05x (T = 4) to 0.37x (T = 64)
    batched_inversion: bool | str = "auto"      # True | False | "auto"
    # BELL
    align: bool = True
    # chosen on glyph meta-val over 6 training seeds (docs/algorithm.md, "BELL over seeds"): at 1e-3
    # adam left the learner at chance on 2 of 6 seeds (its head norm kept growing); at 1e-4 it never
    # did and was ahead of align=false on average at every checkpoint up to 480 iterations
    bell_lr: float = 1e-4
    bell_optimizer: str = "adam"        # "adam" (a fresh state every iteration) | "sgd" (e.g. at bell_lr 0.1)
    beta: float = 0.5                   # Reptile step size: theta += beta * (theta' - theta)
    bell_head: bool = True              # False: BELL's step leaves the learner's linear head as it was
    # MAML replay
    meta_batch: int = 10
    inner_lr: float = 0.01              # adaptation lr: replay AND evaluation, every method
    replay_steps: int = 5
    replay_shot: int = 1
    replay_query: int = 15
    outer_lr: float = 1e-3
    second_order: bool = False
    patience: int = 10
    max_replay_batches: int = 100       # hard cap per iteration
    replay_augment: str = "none"        # "none" | "color": per-image random channel order + inversion
    # memory bank
    bank_capacity: int = 400            # images per (model, class) ring
    bank_dtype: str = "uint8"           # "uint8" | "float16"
    bank_max_mb: float = 1024.0         # whole-bank bound; the longest-unwritten keys go first (0: none)
    global_classes: bool = True         # key the bank by class label when packages share labels
    # meta-learner
    image_size: int = 32
    channels: int = 3
    learner_arch: str = "conv4"
    learner_width: int = 64
    learner_norm: str = "bn"
    norm_mean: list[float] | None = None   # None: mean of the zoo teachers' normalisations
    norm_std: list[float] | None = None
    # schedule
    iterations: int = 1000
    eval_every: int = 0                 # 0: never during training
    eval_shot: int = 1
    eval_steps: int = 10
    checkpoint_every: int = 50
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gen_betas"] = list(self.gen_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FreeConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FreeConfig key(s): {', '.join(unknown)}")
        d = dict(d)
        if "gen_betas" in d:
            d["gen_betas"] = tuple(d["gen_betas"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> None:
        if self.inversion not in ("five", "scratch"):
            raise ValueError(f"inversion must be 'five' or 'scratch', got {self.inversion!r}")
        if self.way < 2:
            raise ValueError("way must be >= 2")
        if self.replay_augment not in ("none", "color"):
            raise ValueError(f"replay_augment must be 'none' or 'color', got {self.replay_augment!r}")
        if self.batched_inversion not in (True, False, "auto"):
            raise ValueError(f"batched_inversion must be true, false or 'auto', got {self.batched_inversion!r}")
        if (isinstance(self.inversion_jitter, bool) or not isinstance(self.inversion_jitter, int)
                or not 0 <= self.inversion_jitter < self.image_size):
            raise ValueError(f"inversion_jitter must be between 0 and image_size - 1, got {self.inversion_jitter}")
        if self.bank_dtype not in ("uint8", "float16"):
            raise ValueError("bank_dtype must be 'uint8' or 'float16'")
        if self.bank_max_mb < 0:
            raise ValueError("bank_max_mb must be >= 0 (0: unbounded)")
        if self.bank_max_mb:
            ring = MemoryBank.ring_bytes(self.bank_capacity, (self.channels, self.image_size, self.image_size),
                                         torch.uint8 if self.bank_dtype == "uint8" else torch.float16)
            if self.bank_max_mb * 2 ** 20 < 2 * self.way * ring:
                raise ValueError(f"bank_max_mb {self.bank_max_mb} holds fewer than {2 * self.way} classes of "
                                 f"{self.bank_capacity} images ({ring / 2 ** 20:.2f} MB each)")
        for name in ("teachers_per_iter", "inner_steps", "samples_per_class", "meta_batch",
                     "replay_shot", "replay_query", "bank_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def uses_batched_inversion(self, device: torch.device | str) -> bool:
        """Whether FIVE steps go through the vmapped multi-teacher step on ``device``."""
        if self.batched_inversion == "auto":
            return torch.device(device).type == "cuda"
        return bool(self.batched_inversion)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FreeConfig":
        """``paper``: the published settings. ``quick``: a CPU run of minutes. ``tiny``: tests (seconds)."""
        presets: dict[str, dict[str, Any]] = {
            "paper": {},
            # inner_lr 0.1 and gen_lr 1e-2: chosen on glyph meta-val (docs/algorithm.md, "Inner
            # learning rate" and "A larger FIVE inner step")
            "quick": dict(ngf=16, nz=64, samples_per_class=10, warmup=5, iterations=60, gen_lr=1e-2,
                          max_replay_batches=10, patience=5, meta_batch=4, replay_query=5,
                          replay_augment="color",
                          bank_capacity=100, learner_width=32, checkpoint_every=20, inner_lr=0.1),
            "tiny": dict(ngf=8, nz=16, samples_per_class=4, teachers_per_iter=2, inner_steps=2,
                         warmup=1, iterations=4, max_replay_batches=2, patience=2, meta_batch=2,
                         replay_query=2, bank_capacity=16, learner_width=8, checkpoint_every=2),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(presets)})")
        d = {**cls().to_dict(), **presets[name], **overrides}
        return cls.from_dict(d)


def _fmt(v: Any) -> Any:
    return round(v, 5) if isinstance(v, float) else v


class FreeTrainer:
    def __init__(self, zoo: Zoo, cfg: FreeConfig, *, state_dir: Path | str | None = None,
                 device: str | torch.device = "auto", eval_data=None, eval_episodes: int = 100):
        cfg.validate()
        self.zoo, self.cfg = zoo, cfg
        self.device = resolve_device(device)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.eval_data, self.eval_episodes = eval_data, eval_episodes
        self.iteration = 0
        self.history: list[dict] = []
        # every random stream is a generator we own (saved in checkpoints)
        self.rng = torch.Generator().manual_seed(cfg.seed)             # teachers, subsets, episodes
        self.gen_rng = torch.Generator().manual_seed(cfg.seed + 1)     # generator init + latents
        init_rng = torch.Generator().manual_seed(cfg.seed + 2)         # learner init
        if cfg.norm_mean is not None and cfg.norm_std is not None:
            self.norm = (tuple(cfg.norm_mean), tuple(cfg.norm_std))
        else:
            self.norm = zoo_normalisation([zoo.meta(m) for m in sorted(zoo.ids())], cfg.channels) or \
                ((0.5,) * cfg.channels, (0.25,) * cfg.channels)
        self._build(init_rng)

    def _build(self, init_rng: torch.Generator) -> None:
        cfg = self.cfg
        self.learner: Normalized = build_learner(
            cfg.way, arch=cfg.learner_arch, width=cfg.learner_width, norm=cfg.learner_norm,
            image_size=cfg.image_size, channels=cfg.channels, mean=self.norm[0], std=self.norm[1],
            rng=init_rng).to(self.device)
        self.meta = MetaLearner(
            self.learner, way=cfg.way, inner_lr=cfg.inner_lr, replay_steps=cfg.replay_steps,
            meta_batch=cfg.meta_batch, replay_shot=cfg.replay_shot, replay_query=cfg.replay_query,
            outer_lr=cfg.outer_lr, second_order=cfg.second_order, patience=cfg.patience,
            max_batches=cfg.max_replay_batches, augment=cfg.replay_augment, bell_lr=cfg.bell_lr,
            bell_optimizer=cfg.bell_optimizer, beta=cfg.beta, bell_head=cfg.bell_head,
            device=self.device)
        self.metagen = MetaGenerator.from_config(cfg, rng=self.gen_rng, device=self.device)
        if cfg.uses_batched_inversion(self.device) and cfg.inversion == "five":
            from free_dfml.server.batched_inversion import install
            install(self)
        self.bank = self._new_bank()

    # ---------------------------------------------------------------------------------- pieces
    def _new_bank(self) -> MemoryBank:
        cfg = self.cfg
        return MemoryBank(cfg.bank_capacity, (cfg.channels, cfg.image_size, cfg.image_size),
                          torch.uint8 if cfg.bank_dtype == "uint8" else torch.float16,
                          max_bytes=int(cfg.bank_max_mb * 2 ** 20) if cfg.bank_max_mb else None)

    def _teacher(self, model_id: str) -> Teacher:
        meta = self.zoo.meta(model_id)
        return Teacher(self.zoo.teacher(model_id, self.device), tuple(meta.input_shape),
                       meta.num_classes, model_id, meta.is_dp)

    def _subset(self, n: int) -> list[int]:
        """The teacher classes the way-way student sees this iteration (all of them if n <= way)."""
        if n <= self.cfg.way:
            return list(range(n))
        return sorted(torch.randperm(n, generator=self.rng)[: self.cfg.way].tolist())

    def _class_keys(self, model_id: str) -> list[str] | None:
        if not self.cfg.global_classes:
            return None
        return self.zoo.meta(model_id).class_labels

    @property
    def warming_up(self) -> bool:
        return self.iteration < self.cfg.warmup

    # -------------------------------------------------------------------------------- training
    def step(self) -> dict:
        ids = sorted(self.zoo.ids())        # not arrival order: see the module docstring
        if not ids:
            raise RuntimeError("the zoo is empty: FREE needs at least one model before it can train")
        cfg = self.cfg
        t0 = time.perf_counter()
        n_t = min(cfg.teachers_per_iter, len(ids))
        picked = [ids[i] for i in torch.randperm(len(ids), generator=self.rng)[:n_t].tolist()]
        teachers = [self._teacher(m) for m in picked]
        subsets = [self._subset(t.num_classes) for t in teachers]
        warm = self.warming_up
        lam_adv = 0.0 if warm else cfg.lambda_adv
        student = None if lam_adv == 0 else self.meta.student()
        if cfg.inversion == "five":
            results = self.metagen.step(teachers, lambda_adv=lam_adv, student=student, subsets=subsets)
        else:
            results = [invert_from_scratch(
                t, nz=cfg.nz, ngf=cfg.ngf, image_size=cfg.image_size, channels=cfg.channels,
                steps=cfg.scratch_steps, per_class=cfg.samples_per_class, rng=self.gen_rng,
                device=self.device, lr=cfg.gen_lr, z_lr=cfg.z_lr, betas=tuple(cfg.gen_betas),
                lambda_adv=lam_adv, student=student, subset=s, lambda_bn=cfg.lambda_bn,
                jitter=cfg.inversion_jitter)
                for t, s in zip(teachers, subsets)]
        for t, r in zip(teachers, results):     # EVERY teacher's images go to the bank
            self.bank.add(t.model_id, r.images, r.labels, self._class_keys(t.model_id))
        t_inv = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "iteration": self.iteration + 1, "teachers": len(teachers), "zoo_size": len(ids),
            "warmup": warm, "inversion_ce": sum(r.final_ce for r in results) / len(results),
            "inversion_s": t_inv, "bank_images": len(self.bank)}
        if not warm:
            if cfg.align:
                metrics.update(self.meta.bell([(t, r.images, r.labels, s)
                                               for t, r, s in zip(teachers, results, subsets)],
                                              rng=self.rng))
            metrics.update(self.meta.replay(self.bank, self.rng))
        self.iteration += 1
        if self.eval_data is not None and cfg.eval_every and self.iteration % cfg.eval_every == 0:
            metrics.update(self.evaluate())
        metrics["step_s"] = time.perf_counter() - t0
        metrics = {k: _fmt(v) for k, v in metrics.items()}
        self.history.append(metrics)
        return metrics

    def evaluate(self, data=None, *, shot: int | None = None, episodes: int | None = None) -> dict:
        from free_dfml.common.evaluation import evaluate
        data = self.eval_data if data is None else data
        shot = self.cfg.eval_shot if shot is None else shot
        res = evaluate(self.learner, data, way=self.cfg.way, shot=shot,
                       episodes=episodes or self.eval_episodes, steps=self.cfg.eval_steps,
                       lr=self.cfg.inner_lr, seed=self.cfg.seed + 1000, device=self.device)
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
                if (self.state_dir is not None and self.cfg.checkpoint_every
                        and self.iteration % self.cfg.checkpoint_every == 0):
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
        return ckpt.save_checkpoint(self.checkpoint_path, tensors, meta)

    def resume(self) -> bool:
        """Load ``state_dir``'s checkpoint if there is one; True if it was loaded."""
        if self.state_dir is None or not self.checkpoint_path.exists():
            return False
        tensors, meta = ckpt.load_checkpoint(self.checkpoint_path)
        saved = FreeConfig.from_dict(meta["config"])
        if saved.to_dict() != self.cfg.to_dict():
            diff = sorted(k for k, v in saved.to_dict().items() if self.cfg.to_dict().get(k) != v)
            # the schedule may change between runs; the model-defining keys may not
            allowed = {"iterations", "eval_every", "checkpoint_every", "eval_shot", "max_replay_batches",
                       "patience", "bank_max_mb", "batched_inversion"}
            if set(diff) - allowed:
                raise ValueError(f"checkpoint config differs in {', '.join(diff)}; "
                                 "use the same config (or a fresh state_dir)")
        # load into the existing objects (hooks installed on them, e.g. batched inversion, survive)
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
        cfg = self.cfg
        training = {"method": "free" if cfg.align else "free-noalign", "inversion": cfg.inversion,
                    "way": cfg.way, "adapt_steps": cfg.eval_steps, "inner_lr": cfg.inner_lr,
                    "iteration": self.iteration, "zoo_size": len(self.zoo)}
        return make_package(self.learner, arch=cfg.learner_arch,
                            arch_kwargs={"width": cfg.learner_width, "norm": cfg.learner_norm},
                            num_classes=cfg.way, input_shape=(cfg.channels, cfg.image_size, cfg.image_size),
                            mean=self.norm[0], std=self.norm[1], training=training)
