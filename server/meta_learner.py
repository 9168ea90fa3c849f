"""The meta-learner and its two training signals: BELL (implicit gradient alignment) and MAML replay.

* :func:`build_learner`: Conv4 (or any :mod:`free_dfml.common.models` architecture) with a ``way``-way
  head, wrapped in :class:`~free_dfml.common.models.Normalized`; takes [0, 1] images.
* :meth:`MetaLearner.bell`: ``theta' <- theta``; for each teacher in sequence, one optimiser step
  on ``theta'`` minimising ``KL(softmax f_t(X_t) || softmax s_theta'(X_t))`` (the teacher's local
  label order, restricted to at most ``way`` of its classes); then ``theta <- theta + beta *
  (theta' - theta)``, written straight into the parameters (no optimiser, no scale factor).
* :meth:`MetaLearner.replay`: MAML on episodes from the memory bank: ``replay.inner_steps`` SGD
  steps (``inner_lr``) on the support set, CE on the query set, ``replay.meta_batch`` episodes
  summed, Adam step; repeated until the meta-batch training accuracy has not improved for
  ``replay.patience`` meta-batches or ``replay.max_batches`` is reached.

A :class:`MetaLearner` takes its configuration sections (:class:`~free_dfml.common.config.ReplayConfig`,
:class:`~free_dfml.common.config.BellConfig`) plus the task's ``way`` and adaptation ``inner_lr``.

The learner always runs with batch statistics (transductive BatchNorm, as MAML and the evaluation
protocol do) through ``functional_call`` with cloned buffers, so its running statistics never drift.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from free_dfml.common.adaptation import adapt, buffers_of, forward, parameters_of
from free_dfml.common.config import AUGMENTS, BellConfig, LearnerConfig, ReplayConfig
from free_dfml.common.models import Normalized, build_model, is_head_key
from free_dfml.server.memory_bank import MemoryBank
from free_dfml.server.meta_generator import AdamState, Teacher, adam_update, kl_per_sample, restrict

Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]   # sx, sy, qx, qy (float x)


def color_augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Per image: a random order of the colour channels, and with probability 1/2 the inverted image.

    Recovered images carry each teacher's colour statistics; replaying them as they are lets the
    meta-learner separate classes by colour alone. Both transforms keep the spatial structure
    (strokes, edges) and change only colour, so episodes must be solved by shape. ``x``: float
    ``[n, C, H, W]`` in [0, 1]; drawn from ``rng`` (the trainer's saved stream).
    """
    n, c = x.shape[:2]
    if c > 1:
        order = torch.argsort(torch.rand(n, c, generator=rng), dim=1).to(x.device)
        x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
    flip = (torch.rand(n, generator=rng) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, 1.0 - x, x)


def build_learner(way: int, *, arch: str = "conv4", width: int = 64, norm: str = "bn",
                  image_size: int = 32, channels: int = 3,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  rng: torch.Generator | None = None) -> Normalized:
    """A fresh ``way``-way learner; its initialisation is drawn from ``rng`` when given."""
    mean = tuple(mean) if mean is not None else (0.5,) * channels
    std = tuple(std) if std is not None else (0.25,) * channels

    def make() -> Normalized:
        net = build_model(arch, num_classes=way, in_channels=channels, image_size=image_size,
                          width=width, norm=norm)
        return Normalized(net, mean, std)

    if rng is None:
        model = make()
    else:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
    model.train()
    return model


def learner_from_config(lrn: LearnerConfig, *, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, rng: torch.Generator | None = None) -> Normalized:
    """:func:`build_learner` for a :class:`~free_dfml.common.config.LearnerConfig` (``mean``/``std``
    default to the configured normalisation, else 0.5 / 0.25)."""
    return build_learner(lrn.way, arch=lrn.arch, width=lrn.width, norm=lrn.norm, image_size=lrn.image_size,
                         channels=lrn.channels, mean=lrn.norm_mean if mean is None else mean,
                         std=lrn.norm_std if std is None else std, rng=rng)


def zoo_normalisation(metas: Sequence, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Mean over the teachers (with ``channels`` input channels) of their mean and std; None if none."""
    ms = [m for m in metas if m.input_shape[0] == channels]
    if not ms:
        return None
    mean = torch.tensor([m.mean for m in ms], dtype=torch.float64).mean(0)
    std = torch.tensor([m.std for m in ms], dtype=torch.float64).mean(0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def distill_loss(teacher: Teacher, student_logits: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor, subset: Sequence[int] | None,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(softmax f_t || softmax s) over the samples whose class is in ``subset``."""
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = teacher.logits(images)
    t, s, _ = restrict(teacher_logits, student_logits, labels, subset)
    if t.shape[0] == 0:
        return student_logits.sum() * 0.0
    return kl_per_sample(t, s).mean()


class MetaLearner:
    """The meta-learner ``model`` and its outer Adam (``replay.outer_lr``); ``replay`` and ``bell``
    default to their sections' defaults."""

    def __init__(self, model: nn.Module, replay: ReplayConfig | None = None, bell: BellConfig | None = None,
                 *, way: int = 5, inner_lr: float = 0.01, device: torch.device | str = "cpu"):
        self.replay_cfg = replay = replay if replay is not None else ReplayConfig()
        self.bell_cfg = bell = bell if bell is not None else BellConfig()
        if bell.optimizer not in ("adam", "sgd"):
            raise ValueError("bell.optimizer must be 'adam' or 'sgd'")
        if replay.augment not in AUGMENTS:
            raise ValueError(f"replay.augment must be one of {AUGMENTS}, got {replay.augment!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.train()
        self.way, self.inner_lr = way, inner_lr
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=replay.outer_lr)

    # ---------------------------------------------------------------------------------- student
    def student(self):
        """The current learner as a frozen function x -> logits (for L_adv)."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        buffers = buffers_of(self.model)
        return lambda x: forward(self.model, params, x, buffers)

    # ------------------------------------------------------------------------------------- BELL
    def bell(self, items: Sequence[tuple[Teacher, torch.Tensor, torch.Tensor, Sequence[int] | None]],
             rng: torch.Generator | None = None) -> dict[str, float]:
        """Sequential distillation over ``items`` = (teacher, images, labels, subset), then the
        Reptile-style interpolation ``theta += beta * (theta' - theta)``. Returns the mean KL.

        With ``bell.head=False`` the interpolation skips the linear head: theta' still trains its
        head in the sequence (each teacher in its own local label order), but only the feature
        extractor keeps the step, so BELL does not pull the head that replay meta-learns towards
        the arbitrary label orders of the teachers drawn.

        With ``replay.augment="color"`` and an ``rng``, the meta-learner sees colour-augmented copies of
        the images while the teacher's targets come from the images as recovered, so BELL, like
        replay, cannot fit the teachers' colour statistics instead of shapes."""
        cfg = self.bell_cfg
        color = self.replay_cfg.augment == "color"
        fast = parameters_of(self.model, detach=True)
        buffers = buffers_of(self.model)
        state = AdamState()
        losses = []
        for teacher, x, y, subset in items:
            x, y = x.to(self.device), y.to(self.device)
            with torch.no_grad():
                t_logits = teacher.logits(x)
            xs = color_augment(x, rng) if color and rng is not None else x
            with torch.enable_grad():
                loss = distill_loss(teacher, forward(self.model, fast, xs, buffers), x, y, subset,
                                    teacher_logits=t_logits)
                grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()))))
            losses.append(float(loss.detach()))
            if cfg.optimizer == "adam":
                fast = adam_update(fast, grads, state, lr=cfg.lr)
            else:
                fast = {k: (v.detach() - cfg.lr * grads[k]).requires_grad_(True)
                        for k, v in fast.items()}
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                if cfg.head or not is_head_key(k):
                    p.add_(fast[k].detach() - p, alpha=cfg.beta)
        return {"bell_kl": sum(losses) / max(1, len(losses))}

    # ------------------------------------------------------------------------------------- MAML
    def maml_step(self, episodes: Sequence[Episode]) -> tuple[float, float]:
        """One outer Adam step on the summed query losses of ``episodes``; returns (mean loss, mean acc)."""
        self.optimizer.zero_grad(set_to_none=True)
        tot_loss, tot_acc = 0.0, 0.0
        for sx, sy, qx, qy in episodes:
            sx, sy, qx, qy = (t.to(self.device) for t in (sx, sy, qx, qy))
            buffers = buffers_of(self.model)
            with torch.enable_grad():
                fast = adapt(self.model, sx, sy, steps=self.replay_cfg.inner_steps, lr=self.inner_lr,
                             buffers=buffers, second_order=self.replay_cfg.second_order)
                logits = forward(self.model, fast, qx, buffers)
                loss = F.cross_entropy(logits, qy)
                loss.backward()    # per episode: gradients add up (summed meta-batch), graphs freed
            tot_loss += float(loss.detach())
            tot_acc += float((logits.argmax(1) == qy).float().mean())
        self.optimizer.step()
        n = max(1, len(episodes))
        return tot_loss / n, tot_acc / n

    def replay(self, bank: MemoryBank, rng: torch.Generator, *, max_batches: int | None = None
               ) -> dict[str, float]:
        """MAML meta-batches from the bank until accuracy stalls for ``replay.patience`` batches (or
        the cap, ``replay.max_batches`` unless given)."""
        cfg = self.replay_cfg
        cap = cfg.max_batches if max_batches is None else max_batches
        if cap <= 0 or not bank.can_sample(self.way, cfg.shot, cfg.query):
            return {"replay_batches": 0}
        best, since, n, loss, acc = -1.0, 0, 0, float("nan"), float("nan")
        while n < cap:
            eps = []
            for _ in range(cfg.meta_batch):
                e = bank.sample_episode(self.way, cfg.shot, cfg.query, rng)
                sx, qx = e.support_x, e.query_x
                if cfg.augment == "color":
                    sx, qx = color_augment(sx, rng), color_augment(qx, rng)
                eps.append((sx, e.support_y, qx, e.query_y))
            loss, acc = self.maml_step(eps)
            n += 1
            if acc > best:
                best, since = acc, 0
            else:
                since += 1
                if since >= cfg.patience:
                    break
        return {"replay_batches": n, "replay_loss": loss, "replay_acc": acc, "replay_best_acc": best}
