"""Baselines in the same harness as FREE.

* ``random``: a freshly initialised meta-learner, adapted at meta-test like every method.
* ``average``: parameter average of the zoo's same-architecture models' feature layers (BatchNorm
  running statistics averaged too) with a fresh ``way``-way head. Among the Conv4 teachers with the
  meta-learner's input shape, the most common (width, norm) group is averaged.
* ``oracle`` (:func:`train_oracle`, NOT data-free): MAML on real meta-train episodes with the same
  :class:`~free_dfml.server.meta_learner.MetaLearner` code; an upper bound for benchmarks.
* ``scratch`` inversion is ``generator.inversion = "scratch"`` in the trainer itself.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from free_dfml.common.models import Normalized, feature_keys
from free_dfml.common.package import ModelPackage
from free_dfml.server.device import resolve_device
from free_dfml.server.meta_learner import MetaLearner, build_learner, learner_from_config, zoo_normalisation


def random_learner(cfg, *, seed: int | None = None,
                   norm: tuple[Sequence[float], Sequence[float]] | None = None) -> Normalized:
    """A fresh meta-learner exactly as FREE starts from (config ``cfg``: a FreeConfig; ``norm``:
    (mean, std), e.g. ``FreeTrainer.norm``; default the configured one, else 0.5/0.25)."""
    rng = torch.Generator().manual_seed(cfg.schedule.seed + 2 if seed is None else seed)
    mean, std = norm if norm is not None else (None, None)
    return learner_from_config(cfg.learner, mean=mean, std=std, rng=rng)


def average_group(packages: Sequence[ModelPackage], *, image_size: int, channels: int
                  ) -> list[ModelPackage]:
    """The most common (width, norm) group of Conv4 packages with input (channels, size, size)."""
    ok = [p for p in packages if p.meta.arch == "conv4"
          and tuple(p.meta.input_shape) == (channels, image_size, image_size)]
    if not ok:
        return []
    key = lambda p: (p.meta.arch_kwargs["width"], p.meta.arch_kwargs["norm"])  # noqa: E731
    (best, _), = Counter(key(p) for p in ok).most_common(1)
    return [p for p in ok if key(p) == best]


def average_learner(packages: Sequence[ModelPackage], cfg, *, seed: int | None = None) -> Normalized:
    """Average of the feature layers of the largest compatible Conv4 group; fresh ``way``-way head.
    A function of the set of packages: they are taken in model-id order, whatever order they come in."""
    packages = sorted(packages, key=lambda p: p.model_id)
    lrn = cfg.learner
    group = average_group(packages, image_size=lrn.image_size, channels=lrn.channels)
    if not group:
        raise ValueError("no Conv4 model in the zoo matches the meta-learner's input shape; "
                         "the average baseline needs at least one")
    width, norm = group[0].meta.arch_kwargs["width"], group[0].meta.arch_kwargs["norm"]
    mean, std = zoo_normalisation([p.meta for p in group], lrn.channels)
    rng = torch.Generator().manual_seed(cfg.schedule.seed + 2 if seed is None else seed)
    learner = build_learner(lrn.way, arch="conv4", width=width, norm=norm, image_size=lrn.image_size,
                            channels=lrn.channels, mean=mean, std=std, rng=rng)
    state = learner.model.state_dict()
    for k in feature_keys(learner.model):
        if k.endswith("num_batches_tracked"):
            continue
        state[k] = torch.stack([p.state[k] for p in group]).mean(0)
    learner.model.load_state_dict(state)
    return learner


def train_oracle(dataset_split, cfg, iterations: int, *, device: str = "auto", seed: int | None = None,
                 shot: int | None = None, on_metrics: Callable[[dict], None] | None = None
                 ) -> Normalized:
    """MAML on real episodes of ``dataset_split`` (a SplitData of meta-train classes): ``iterations``
    meta-batches of ``cfg.replay.meta_batch`` episodes, same inner loop as FREE's replay. NOT data-free."""
    from free_dfml.common.datasets import to_float
    from free_dfml.common.episodes import EpisodeSampler

    dev = resolve_device(device)
    learner = random_learner(cfg, seed=seed).to(dev)
    rep, way = cfg.replay, cfg.learner.way
    meta = MetaLearner(learner, rep, way=way, inner_lr=cfg.learner.inner_lr, device=dev)
    sampler = EpisodeSampler(dataset_split, way=way, shot=shot or rep.shot,
                             query=rep.query, seed=cfg.schedule.seed if seed is None else seed)
    for it in range(iterations):
        eps = [(to_float(e.support_x), e.support_y, to_float(e.query_x), e.query_y)
               for e in sampler.take(rep.meta_batch)]
        loss, acc = meta.maml_step(eps)
        if on_metrics is not None:
            on_metrics({"iteration": it + 1, "loss": loss, "acc": acc})
    return learner
