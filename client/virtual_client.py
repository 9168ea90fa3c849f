"""A virtual client of a simulated federation: it trains its own model on its own classes.

Partition ``i`` of ``n`` takes block ``i`` of the study's seeded class plan
(:func:`free_dfml.common.partition.client_classes`), trains with :func:`free_dfml.client.train.train_client`
(one torch thread, seed ``seed * 1000 + i``) and returns the package it would publish. The Flower
simulation's ClientApp and the in-process study call this same function, so both give the same
models. The settings travel to the ClientApp as JSON in the run config (``RUN_CONFIG_KEY``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from free_dfml.common.package import ModelPackage

RUN_CONFIG_KEY = "virtual-clients"
ARCH_MIX = ("conv4", "resnet10")


@dataclass
class VirtualClients:
    """How every virtual client trains (one setting for all; the partition picks classes and seed)."""

    dataset: str = "glyphs"
    image_size: int = 32
    images_per_class: int | None = None
    classes_per_client: int = 5
    arch: str = "conv4"                # an architecture, or "mix" (conv4 / resnet10 alternating)
    width: int = 16
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 32
    augment: str = "none"
    seed: int = 0
    dp_epsilon: float | None = None
    out_dir: str | None = None         # where each client also writes its package (for inspection)
    extra: dict[str, Any] = field(default_factory=dict)   # further TrainConfig fields

    def archs(self) -> list[str]:
        return list(ARCH_MIX) if self.arch == "mix" else [self.arch]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VirtualClients":
        return cls(**json.loads(text))

    @classmethod
    def from_study(cls, study, *, dp_epsilon: float | None = None, out_dir: str | None = None) -> "VirtualClients":
        d, c = study.data, study.clients
        return cls(dataset=d.dataset, image_size=d.image_size, images_per_class=d.images_per_class,
                   classes_per_client=c.classes_per_client, arch=c.arch, width=c.width, epochs=c.epochs,
                   lr=c.lr, batch_size=c.batch_size, augment=c.augment, seed=study.seed, dp_epsilon=dp_epsilon, out_dir=out_dir)


def partition_classes(settings: VirtualClients, partition: int, num_partitions: int, num_classes: int) -> list[int]:
    from free_dfml.common.partition import client_classes
    return client_classes(num_classes, num_partitions, settings.classes_per_client, True, settings.seed)[partition]


def train_partition(settings: VirtualClients, partition: int, num_partitions: int,
                    dataset=None) -> tuple["ModelPackage", dict]:
    """Train partition ``partition``'s model; returns (package, training report). ``dataset``: an
    already opened data set (the in-process study), else it is opened from the settings."""
    import torch

    from free_dfml.client.train import TrainConfig, dp_config, train_client
    from free_dfml.common.datasets import open_dataset

    ds = dataset if dataset is not None else open_dataset(
        settings.dataset, image_size=settings.image_size, seed=settings.seed,
        images_per_class=settings.images_per_class)
    classes = partition_classes(settings, partition, num_partitions, ds.split("train").num_classes)
    archs = settings.archs()
    common = dict(arch=archs[partition % len(archs)], arch_kwargs={"width": settings.width},
                  seed=settings.seed * 1000 + partition)
    if settings.dp_epsilon is not None:     # free-client's DP recipe; the study's epochs, lr, batch are plain training's
        cfg = dp_config(settings.dp_epsilon, **common, **settings.extra)
    else:
        cfg = TrainConfig(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                          augment=settings.augment, **common, **settings.extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pkg, report = train_client(ds, classes, cfg)
    finally:
        torch.set_num_threads(threads)
    if settings.out_dir:
        from free_dfml.common.package import save_package
        save_package(pkg, Path(settings.out_dir) / f"client-{partition:03d}.safetensors")
    return pkg, {"client": partition, "classes": classes, **report}
