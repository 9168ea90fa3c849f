"""Local training on a client: a classifier over the client's own classes, written as a model package.

A fixed share of each class's images is held out to report accuracy; nothing but the resulting
weights and metadata ever leaves the client. Deterministic for a seed on CPU.

One training loop serves plain and DP training; ``TrainConfig.dp_epsilon`` is the flag.

- Plain: shuffled batches from a generator seeded by ``seed + 1`` (a batch of one is skipped,
  BatchNorm needs two samples).
- DP (``dp_epsilon`` set): DP-SGD with Opacus 1.6. ``opacus.validators.ModuleValidator.fix``
  first replaces every BatchNorm2d (which mixes samples, so is not DP-compatible) by
  ``GroupNorm(min(32, C), C)``, exactly what ``common.models`` builds for ``norm="gn"``, so the
  package says ``arch_kwargs["norm"] = "gn"`` and the server rebuilds the same module. Then
  ``PrivacyEngine.make_private_with_epsilon`` wraps model, optimizer and data loader: the loader
  draws Poisson-sampled batches (sampling rate 1 / number of batches), per-sample gradients are
  clipped to ``max_grad_norm`` and the noise multiplier is the smallest that reaches the target
  (epsilon, delta) after ``epochs`` epochs. The achieved epsilon, delta, noise multiplier, clipping
  norm, sampling rate and step count go into the package's ``dp`` metadata. Batch sampling and
  noise come from generators seeded by ``seed + 1`` and ``seed + 2`` (Opacus' ``secure_mode`` is
  off), so a DP run is repeatable on CPU.

Accountant: RDP (Renyi DP, ``PrivacyEngine(accountant="rdp")``), for calibrating the noise and for
the reported epsilon. Its epsilon is an analytic upper bound, it is the accountant DP-SGD results
are most often quoted with, and calibration takes well under a second to a few seconds. Opacus'
PRV accountant is tighter: at sampling rates 0.08-0.2 and 150-400 steps it reaches the same target
(epsilon 1-8) with a 6-10% smaller noise multiplier, at the DP recipe's (rate 1, 80 steps) 7-9%, but its epsilon is
a numerical estimate with a discretisation error term and calibration is 3-5x slower. Switching
would change every DP package for that modest noise reduction, so it waits on a measurement that
the accuracy gain matters.

Recipe knobs (``lr``, ``optimizer``, ``momentum``, ``batch_size``, ``epochs``, ``max_grad_norm``,
``augment``, ``prior``, ``train_layers``) are ``TrainConfig`` fields; the defaults are the plain
recipe (Adam, lr 0.01, batch 32, 30 epochs, no augmentation, all layers from a random start).
:func:`dp_config` gives the DP recipe (``DP_RECIPE``): the features start from the public stroke
prior (``client.prior``: pretrained on random-process images, no privacy cost) and stay fixed, and
DP-SGD trains only the head, on full batches (sampling rate 1), SGD lr 1, momentum 0.9, 20
epochs, clipping norm 1, each image's gradient the mean over 4 shifted copies (augmentation
multiplicity). On the demo's client at epsilon 8 it keeps held-out accuracy level with
the non-DP client where the plain recipe under DP falls to chance (docs/privacy.md).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from free_dfml.common.datasets import FewShotDataset, SplitData, to_float
from free_dfml.common.models import Normalized, build_model
from free_dfml.common.package import ModelPackage, make_package

OPTIMIZERS = ("adam", "sgd")
AUGMENTATIONS = ("none", "flip", "crop", "crop+flip")
TRAIN_LAYERS = ("all", "head")
# the DP recipe (see the module docstring); dp_config() applies it, free-client train uses it under
# --dp-epsilon for every knob not given on the command line
DP_RECIPE = {"prior": "strokes", "train_layers": "head", "batch_size": 0, "optimizer": "sgd", "lr": 1.0,
             "epochs": 20, "augment": "crop", "aug_mult": 4}


@dataclass
class TrainConfig:
    arch: str = "conv4"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    lr: float = 0.01            # Adam, as for the paper's pre-trained models
    optimizer: str = "adam"     # adam | sgd
    momentum: float = 0.9       # SGD only
    batch_size: int = 32        # 0: all training images in one batch (DP: sampling rate 1)
    augment: str = "none"       # none | flip | crop | crop+flip (random shift by up to size/8 px)
    aug_mult: int = 1           # augmented copies of each image per step (DP: gradient averaged per image)
    holdout: float = 0.2        # share of each class's images held out for the accuracy report
    seed: int = 0
    device: str = "cpu"
    share_labels: bool = False  # put the class names into the package metadata
    dp_epsilon: float | None = None     # train with DP-SGD to this (epsilon, delta)
    dp_delta: float | None = None       # default: 1 / (10 * number of training images)
    max_grad_norm: float = 1.0          # DP-SGD per-sample clipping norm
    prior: str = "none"         # none | strokes: start the features from the public prior (client.prior)
    train_layers: str = "all"   # all | head: with "head", every other layer stays as it starts

    @property
    def dp(self) -> bool:
        return self.dp_epsilon is not None

    def check(self) -> None:
        """Raise ValueError naming the first bad field; the message starts with the field's name."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not (self.batch_size >= 2 or self.batch_size == 0):
            raise ValueError(f"batch_size must be 0 (all images) or >= 2, got {self.batch_size}")
        from free_dfml.client.prior import PRIORS
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.aug_mult < 1 or (self.aug_mult > 1 and self.augment == "none"):
            raise ValueError(f"aug_mult must be 1, or > 1 with an augmentation, got {self.aug_mult} "
                             f"with augment={self.augment!r}")
        if self.train_layers not in TRAIN_LAYERS:
            raise ValueError(f"train_layers must be one of {', '.join(TRAIN_LAYERS)}, got {self.train_layers!r}")
        if self.dp:
            if not self.dp_epsilon > 0:
                raise ValueError(f"dp_epsilon must be > 0, got {self.dp_epsilon}")
            if not self.max_grad_norm > 0:
                raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")


def dp_config(epsilon: float, **fields: Any) -> TrainConfig:
    """A ``TrainConfig`` for DP training to ``epsilon`` with the DP recipe; ``fields`` override it."""
    return TrainConfig(**{**DP_RECIPE, "dp_epsilon": epsilon, **fields})


def holdout_split(data: SplitData, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class seeded split into (train indices, held-out indices)."""
    g = torch.Generator().manual_seed(seed)
    tr, ho = [], []
    for idx in data.class_indices():
        perm = idx[torch.randperm(len(idx), generator=g)]
        n_ho = int(round(len(idx) * holdout)) if holdout > 0 else 0
        if holdout > 0:
            n_ho = max(1, min(n_ho, len(idx) - 1))
        ho.append(perm[:n_ho])
        tr.append(perm[n_ho:])
    return torch.cat(tr), torch.cat(ho)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    if len(y) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def augment_batch(x: torch.Tensor, how: str, g: torch.Generator) -> torch.Tensor:
    """Per-sample random shift (reflect-pad by size/8, random crop) and/or horizontal flip."""
    if how == "none":
        return x
    n, _, h, w = x.shape
    if "crop" in how:
        p = max(1, h // 8)
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if "flip" in how:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def _average_over_augmentations(params: list[torch.nn.Parameter], k: int) -> None:
    """Augmentation multiplicity (De et al., 2022): the batch holds k augmented copies of each
    sampled image, laid out [copy, image]; each image's per-sample gradient becomes the mean over
    its copies, before Opacus clips it and adds noise, so one image still has one clipped gradient
    and the privacy accounting is unchanged."""
    for p in params:
        gs = p.grad_sample
        p.grad_sample = gs.view(k, gs.shape[0] // k, *gs.shape[1:]).mean(0)


def _dp_compatible(net: torch.nn.Module) -> torch.nn.Module:
    from opacus.validators import ModuleValidator
    net = ModuleValidator.fix(net)                     # BatchNorm2d -> GroupNorm(min(32, C), C)
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible: {errors[0]}")
    return net


def train_client(dataset: FewShotDataset, classes: Sequence[int], cfg: TrainConfig, *,
                 split: str = "train",
                 on_epoch: Callable[[int, float], None] | None = None,
                 on_prior_epoch: Callable[[int, float], None] | None = None) -> tuple[ModelPackage, dict]:
    """Train ``cfg.arch`` on ``classes`` (indices into ``dataset.split(split)``); return (package, report).

    With ``cfg.dp_epsilon`` set, the same loop runs under Opacus (see the module docstring) and the
    package carries ``dp`` metadata. ``on_prior_epoch`` reports the prior's pretraining, when it is
    not cached yet.
    """
    cfg.check()
    data = dataset.subset(split, list(classes))
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    c, h, _ = dataset.image_shape
    arch_kwargs = dict(cfg.arch_kwargs)
    if cfg.prior != "none":
        arch_kwargs["norm"] = "gn"      # the prior is pretrained with GroupNorm, which DP needs anyway
    net = build_model(cfg.arch, num_classes=data.num_classes, in_channels=c, image_size=h, **arch_kwargs)
    if cfg.dp:
        net = _dp_compatible(net)
        arch_kwargs["norm"] = "gn"
    model = Normalized(net, dataset.mean, dataset.std).to(device)
    if cfg.prior != "none":
        from free_dfml.client.prior import load_prior, prior_features
        load_prior(model, prior_features(cfg.arch, arch_kwargs, dataset.image_shape, dataset.mean, dataset.std,
                                         on_epoch=on_prior_epoch))
    if cfg.train_layers == "head":
        for k, p in model.named_parameters():
            p.requires_grad_(".head." in f".{k}")
    params = [p for p in model.parameters() if p.requires_grad]
    tr, ho = holdout_split(data, cfg.holdout, cfg.seed)
    x_all, y_all = to_float(data.images), data.labels
    x_tr, y_tr, x_ho, y_ho = x_all[tr], y_all[tr], x_all[ho].to(device), y_all[ho].to(device)
    n = len(y_tr)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    batch_size = cfg.batch_size or n
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 3)

    engine = None
    trained = model
    if cfg.dp:
        engine, trained, opt, loader, delta = _make_private(model, opt, x_tr, y_tr, cfg, batch_gen, device)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for xb, yb in loader:
                if len(yb) > 0:             # Poisson sampling can draw an empty batch
                    yield xb.to(device), yb.to(device)
    else:
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(n, generator=batch_gen).to(device)
            for i in range(0, n, batch_size):
                b = order[i:i + batch_size]
                if len(b) >= 2:             # BatchNorm needs two samples
                    yield x_tr[b], y_tr[b]

    loss = torch.tensor(float("nan"))
    steps = 0
    with warnings.catch_warnings() if cfg.dp else nullcontext():
        # the first layer's input needs no gradient; Opacus' full backward hooks say so on every step
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(cfg.epochs):
            trained.train()
            for xb, yb in batches():
                k = cfg.aug_mult
                xin = torch.cat([augment_batch(xb, cfg.augment, aug_gen) for _ in range(k)]) if k > 1 \
                    else augment_batch(xb, cfg.augment, aug_gen)
                loss = F.cross_entropy(trained(xin), yb.repeat(k))
                opt.zero_grad()
                loss.backward()
                if cfg.dp and k > 1:
                    _average_over_augmentations(params, k)
                opt.step()
                steps += 1
            if on_epoch is not None:
                on_epoch(epoch, float(loss.detach()))

    dp = None
    final = model
    if cfg.dp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            epsilon = float(engine.get_epsilon(delta))
        # a clean copy without Opacus' hooks, built as the server will build it (norm="gn")
        clean = build_model(cfg.arch, num_classes=data.num_classes, in_channels=c, image_size=h, **arch_kwargs)
        clean.load_state_dict(net.state_dict())
        final = Normalized(clean, dataset.mean, dataset.std).to(device)
        dp = {"epsilon": epsilon, "delta": float(delta), "noise_multiplier": float(opt.noise_multiplier),
              "max_grad_norm": float(cfg.max_grad_norm), "target_epsilon": float(cfg.dp_epsilon),
              "sample_rate": float(1.0 / len(loader)), "steps": float(steps), "epochs": float(cfg.epochs)}
    report = {"train_accuracy": accuracy(final, x_tr.to(device), y_tr.to(device)),
              "holdout_accuracy": accuracy(final, x_ho, y_ho), "epochs": cfg.epochs, "train_images": int(n),
              "holdout_images": int(len(y_ho)), "dataset": dataset.name, "seed": cfg.seed}
    if cfg.prior != "none":
        report.update({"prior": cfg.prior, "train_layers": cfg.train_layers})
    if dp is not None:
        report.update({"dp": True, "dp_epsilon": dp["epsilon"]})
    pkg = make_package(final, arch=cfg.arch, arch_kwargs=arch_kwargs, num_classes=data.num_classes,
                       input_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
                       class_labels=list(data.classes) if cfg.share_labels else None,
                       training=report, dp=dp)
    return pkg, report


def _make_private(model: torch.nn.Module, opt: torch.optim.Optimizer, x_tr: torch.Tensor, y_tr: torch.Tensor,
                  cfg: TrainConfig, batch_gen: torch.Generator, device: torch.device):
    """Opacus wraps model, optimizer and a data loader; returns (engine, model, optimizer, loader, delta)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    n = len(y_tr)
    if n < 2:
        raise ValueError("DP training needs at least 2 training images")
    delta = cfg.dp_delta if cfg.dp_delta is not None else 1.0 / (10 * n)
    if not 0 < delta < 1:
        raise ValueError(f"dp_delta must be in (0, 1), got {delta}")
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=min(cfg.batch_size or n, n), shuffle=True,
                        generator=batch_gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # Opacus' notes about secure_mode and the RNG
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        dp_model, dp_opt, dp_loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=float(cfg.dp_epsilon),
            target_delta=float(delta), epochs=cfg.epochs, max_grad_norm=float(cfg.max_grad_norm),
            noise_generator=torch.Generator(device=device).manual_seed(cfg.seed + 2))
    return engine, dp_model, dp_opt, dp_loader, delta
