"""Local training on a client: a classifier over the client's own classes, written as a model package.

A fixed share of each class's images is held out to report accuracy; nothing but the resulting
weights and metadata ever leaves the client. Deterministic for a seed on CPU.

Differential privacy (``TrainConfig.dp_epsilon``): DP-SGD with Opacus 1.6.
``PrivacyEngine.make_private_with_epsilon`` picks the noise multiplier that reaches the target
(epsilon, delta) after ``epochs`` epochs of Poisson-sampled batches (RDP accountant), with
per-sample gradients clipped to ``max_grad_norm``. BatchNorm mixes samples and is not
DP-compatible: ``opacus.validators.ModuleValidator.fix`` replaces every BatchNorm2d by
``GroupNorm(min(32, C), C)``, which is exactly what ``common.models`` builds for ``norm="gn"``,
so the package says ``arch_kwargs["norm"] = "gn"`` and the server rebuilds the same module. The
achieved epsilon (from the accountant), delta, noise multiplier, clipping norm, sampling rate
and step count go into the package's ``dp`` metadata. Batch sampling and noise come from
generators seeded by ``TrainConfig.seed`` (Opacus' ``secure_mode`` is off), so a DP run is
repeatable on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from free_dfml.common.datasets import FewShotDataset, SplitData, to_float
from free_dfml.common.models import Normalized, build_model
from free_dfml.common.package import ModelPackage, make_package


@dataclass
class TrainConfig:
    arch: str = "conv4"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    lr: float = 0.01            # Adam, as for the paper's pre-trained models
    batch_size: int = 32
    holdout: float = 0.2        # share of each class's images held out for the accuracy report
    seed: int = 0
    device: str = "cpu"
    share_labels: bool = False  # put the class names into the package metadata
    dp_epsilon: float | None = None     # train with DP-SGD to this (epsilon, delta)
    dp_delta: float | None = None       # default: 1 / (10 * number of training images)
    max_grad_norm: float = 1.0          # DP-SGD per-sample clipping norm

    @property
    def dp(self) -> bool:
        return self.dp_epsilon is not None


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


def train_client(dataset: FewShotDataset, classes: Sequence[int], cfg: TrainConfig, *,
                 split: str = "train",
                 on_epoch: Callable[[int, float], None] | None = None) -> tuple[ModelPackage, dict]:
    """Train ``cfg.arch`` on ``classes`` (indices into ``dataset.split(split)``); return (package, report)."""
    data = dataset.subset(split, list(classes))
    if cfg.dp:
        return _train_dp(dataset, data, cfg, on_epoch)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    c, h, _ = dataset.image_shape
    net = build_model(cfg.arch, num_classes=data.num_classes, in_channels=c, image_size=h,
                      **cfg.arch_kwargs)
    model = Normalized(net, dataset.mean, dataset.std).to(device)
    tr, ho = holdout_split(data, cfg.holdout, cfg.seed)
    x_all = to_float(data.images).to(device)
    y_all = data.labels.to(device)
    x_tr, y_tr, x_ho, y_ho = x_all[tr], y_all[tr], x_all[ho], y_all[ho]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    loss = torch.tensor(float("nan"))
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(y_tr), generator=g).to(device)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i:i + cfg.batch_size]
            if len(b) < 2:
                continue   # BatchNorm needs two samples
            loss = F.cross_entropy(model(x_tr[b]), y_tr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, float(loss.detach()))
    report = {"train_accuracy": accuracy(model, x_tr, y_tr), "holdout_accuracy": accuracy(model, x_ho, y_ho),
              "epochs": cfg.epochs, "train_images": int(len(y_tr)), "holdout_images": int(len(y_ho)),
              "dataset": dataset.name, "seed": cfg.seed}
    pkg = make_package(model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, num_classes=data.num_classes,
                       input_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
                       class_labels=list(data.classes) if cfg.share_labels else None,
                       training=report)
    return pkg, report


# ---------------------------------------------------------------------------------------- DP-SGD

def _train_dp(dataset: FewShotDataset, data: SplitData, cfg: TrainConfig,
              on_epoch: Callable[[int, float], None] | None) -> tuple[ModelPackage, dict]:
    import warnings

    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    if not cfg.dp_epsilon or cfg.dp_epsilon <= 0:
        raise ValueError(f"dp_epsilon must be > 0, got {cfg.dp_epsilon}")
    if cfg.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {cfg.max_grad_norm}")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    c, h, _ = dataset.image_shape
    net = build_model(cfg.arch, num_classes=data.num_classes, in_channels=c, image_size=h, **cfg.arch_kwargs)
    net = ModuleValidator.fix(net)                     # BatchNorm2d -> GroupNorm(min(32, C), C)
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible: {errors[0]}")
    arch_kwargs = {**cfg.arch_kwargs, "norm": "gn"}
    model = Normalized(net, dataset.mean, dataset.std).to(device)
    tr, ho = holdout_split(data, cfg.holdout, cfg.seed)
    x_all = to_float(data.images)
    y_all = data.labels
    x_tr, y_tr, x_ho, y_ho = x_all[tr], y_all[tr], x_all[ho].to(device), y_all[ho].to(device)
    n = len(y_tr)
    if n < 2:
        raise ValueError("DP training needs at least 2 training images")
    delta = cfg.dp_delta if cfg.dp_delta is not None else 1.0 / (10 * n)
    if not 0 < delta < 1:
        raise ValueError(f"dp_delta must be in (0, 1), got {delta}")
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=min(cfg.batch_size, n), shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # Opacus' notes about secure_mode and the RNG
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        dp_model, dp_opt, dp_loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=float(cfg.dp_epsilon),
            target_delta=float(delta), epochs=cfg.epochs, max_grad_norm=float(cfg.max_grad_norm),
            noise_generator=torch.Generator(device=device).manual_seed(cfg.seed + 2))
    loss = torch.tensor(float("nan"))
    steps = 0
    # the first layer's input needs no gradient; Opacus' full backward hooks say so on every step
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for epoch in range(cfg.epochs):
        dp_model.train()
        for xb, yb in dp_loader:
            if len(yb) == 0:
                continue     # Poisson sampling can draw an empty batch
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(dp_model(xb), yb)
            dp_opt.zero_grad()
            loss.backward()
            dp_opt.step()
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch, float(loss.detach()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epsilon = float(engine.get_epsilon(delta))
    # a clean copy without Opacus' hooks, built as the server will build it (norm="gn")
    clean = build_model(cfg.arch, num_classes=data.num_classes, in_channels=c, image_size=h, **arch_kwargs)
    clean.load_state_dict(net.state_dict())
    final = Normalized(clean, dataset.mean, dataset.std).to(device)
    dp = {"epsilon": epsilon, "delta": float(delta), "noise_multiplier": float(dp_opt.noise_multiplier),
          "max_grad_norm": float(cfg.max_grad_norm), "target_epsilon": float(cfg.dp_epsilon),
          "sample_rate": float(1.0 / len(dp_loader)), "steps": float(steps), "epochs": float(cfg.epochs)}
    report = {"train_accuracy": accuracy(final, x_tr.to(device), y_tr.to(device)),
              "holdout_accuracy": accuracy(final, x_ho, y_ho), "epochs": cfg.epochs, "train_images": int(n),
              "holdout_images": int(len(y_ho)), "dataset": dataset.name, "seed": cfg.seed, "dp": True,
              "dp_epsilon": epsilon}
    pkg = make_package(final, arch=cfg.arch, arch_kwargs=arch_kwargs, num_classes=data.num_classes,
                       input_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
                       class_labels=list(data.classes) if cfg.share_labels else None,
                       training=report, dp=dp)
    return pkg, report
