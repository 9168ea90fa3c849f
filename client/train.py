"""Local training on a client: a classifier over the client's own classes, written as a model package.

A fixed share of each class's images is held out to report accuracy; nothing but the resulting
weights and metadata ever leaves the client. Deterministic for a seed on CPU.
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
            on_epoch(epoch, float(loss))
    report = {"train_accuracy": accuracy(model, x_tr, y_tr), "holdout_accuracy": accuracy(model, x_ho, y_ho),
              "epochs": cfg.epochs, "train_images": int(len(y_tr)), "holdout_images": int(len(y_ho)),
              "dataset": dataset.name, "seed": cfg.seed}
    pkg = make_package(model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, num_classes=data.num_classes,
                       input_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
                       class_labels=list(data.classes) if cfg.share_labels else None,
                       training=report)
    return pkg, report
