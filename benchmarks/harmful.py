"""Harmful client models (and honest-but-weak ones) for the screen's tests and the trust benchmark.

Each generator returns a well-formed :class:`~free_dfml.common.package.ModelPackage` that passes
every admission check: the harm is in what the weights compute, not in the package.

=================  ==================================================================================
type               what it is
=================  ==================================================================================
``random``         random initialisation, never trained (BatchNorm statistics at their defaults
                   unless ``random_stats``)
``shuffled``       trained on the client's real images with the labels shuffled (memorised noise)
``noise``          trained on uniform-noise images with random labels
``other_data``     trained honestly on another data set (the synthetic coloured patterns),
                   presented as a model of the client's classes
``constant``       an honest model whose head is scaled down and biased to one class: it predicts
                   that class on almost every input
``lying_norm``     an honest model whose metadata claims another input normalisation (mean 0,
                   std 1 instead of the data set's)
``head_permuted``  an honest model with the rows of its head permuted (its class labels, when
                   shared, name the wrong outputs; without shared labels it is harmless)
``weak``           an honest client with few images and epochs (held-out accuracy about 30-40%)
=================  ==================================================================================

:data:`ADAPTIVE` holds an attacker who knows the screen: ``random_calibrated``, random weights whose
BatchNorm statistics are recomputed on real images.

Training goes through :func:`free_dfml.client.train.train_client` on an in-memory data set, so a
harmful model is trained exactly as an honest one is, only on other images or labels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from benchmarks.common import SyntheticDataset
from free_dfml.common.datasets import SplitData
from free_dfml.common.models import build_model
from free_dfml.common.package import ModelPackage, make_package, package_from_tensors

HARMFUL_TYPES = ("random", "shuffled", "noise", "other_data", "constant", "lying_norm", "head_permuted")
HONEST_TYPES = ("honest", "weak")


class ArrayData:
    """A one-split data set (``train``) over given uint8 images and labels, with the interface
    ``train_client`` needs (``subset``, ``image_shape``, ``mean``, ``std``, ``name``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, name: str = "array"):
        self.images, self.labels = images, labels
        self.image_shape = tuple(images.shape[1:])
        self.mean, self.std, self.name = tuple(mean), tuple(std), name
        self.n = int(labels.max()) + 1

    def subset(self, split: str, classes: Sequence[int]) -> SplitData:
        return SplitData(self.images, self.labels, [f"class-{c}" for c in range(self.n)]).take(classes)


def _train(data, classes: Sequence[int], *, width: int, epochs: int, seed: int, split: str = "train"
           ) -> ModelPackage:
    from free_dfml.client.train import TrainConfig, train_client
    pkg, _ = train_client(data, list(classes), TrainConfig(epochs=epochs, arch_kwargs={"width": width}, seed=seed),
                          split=split)
    return pkg


def _client_images(ds, classes: Sequence[int], per_class: int | None = None) -> SplitData:
    data = ds.subset("train", list(classes))
    if per_class is None:
        return data
    keep = torch.cat([i[:per_class] for i in data.class_indices()])
    return SplitData(data.images[keep], data.labels[keep], data.classes)


def honest(ds, classes, *, width=32, epochs=20, seed=0) -> ModelPackage:
    return _train(ds, classes, width=width, epochs=epochs, seed=seed)


def weak(ds, classes, *, width=32, epochs=20, seed=0, per_class: int = 40, weak_epochs: int = 6) -> ModelPackage:
    """An honest client with ``per_class`` images a class and ``weak_epochs`` epochs (weak, not
    harmful: on the glyphs at 32 px, held-out accuracy about 0.2-0.5)."""
    d = _client_images(ds, classes, per_class)
    arr = ArrayData(d.images, d.labels, ds.mean, ds.std, "weak")
    return _train(arr, range(len(classes)), width=width, epochs=weak_epochs, seed=seed)


def random_weights(ds, classes, *, width=32, epochs=20, seed=0, random_stats: bool = False) -> ModelPackage:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        c, h, _ = ds.image_shape
        net = build_model("conv4", num_classes=len(classes), in_channels=c, image_size=h, width=width)
        if random_stats:
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return make_package(net, arch="conv4", arch_kwargs={"width": width}, num_classes=len(classes),
                        input_shape=ds.image_shape, mean=ds.mean, std=ds.std, training={"epochs": epochs})


def random_calibrated(ds, classes, *, width=32, epochs=20, seed=0) -> ModelPackage:
    """An adaptive attacker's random weights: BatchNorm statistics recomputed on the client's real
    images, so that they look trained (not in :data:`HARMFUL_TYPES`: the screen does not catch it)."""
    from free_dfml.common.datasets import to_float
    from free_dfml.common.models import Normalized
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(15_000 + seed)
        c, h, _ = ds.image_shape
        net = build_model("conv4", num_classes=len(classes), in_channels=c, image_size=h, width=width)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None               # a cumulative average over the one pass below
            m.reset_running_stats()
    model = Normalized(net, ds.mean, ds.std).train()
    with torch.no_grad():
        model(to_float(_client_images(ds, classes).images))
    return make_package(model.eval(), arch="conv4", arch_kwargs={"width": width}, num_classes=len(classes),
                        input_shape=ds.image_shape, mean=ds.mean, std=ds.std, training={"epochs": epochs})


def shuffled(ds, classes, *, width=32, epochs=20, seed=0) -> ModelPackage:
    d = _client_images(ds, classes)
    g = torch.Generator().manual_seed(20_000 + seed)
    arr = ArrayData(d.images, d.labels[torch.randperm(len(d.labels), generator=g)], ds.mean, ds.std)
    return _train(arr, range(len(classes)), width=width, epochs=epochs, seed=seed)


def noise(ds, classes, *, width=32, epochs=20, seed=0) -> ModelPackage:
    d = _client_images(ds, classes)
    g = torch.Generator().manual_seed(30_000 + seed)
    x = torch.randint(0, 256, tuple(d.images.shape), generator=g, dtype=torch.uint8)
    y = torch.arange(len(classes)).repeat_interleave(-(-len(d.labels) // len(classes)))[: len(d.labels)]
    return _train(ArrayData(x, y, ds.mean, ds.std), range(len(classes)), width=width, epochs=epochs, seed=seed)


def other_data(ds, classes, *, width=32, epochs=20, seed=0) -> ModelPackage:
    """Trained on another domain (coloured patterns), sent as a model of ``classes``."""
    c, h, _ = ds.image_shape
    other = SyntheticDataset(image_size=h, seed=40_000 + seed, channels=c,
                             images_per_class=max(20, len(_client_images(ds, classes)) // len(classes)),
                             classes=(len(classes), 1, 1))
    return _train(other, range(len(classes)), width=width, epochs=epochs, seed=seed)


def _with_state(pkg: ModelPackage, edit: Callable[[dict], None], **meta) -> ModelPackage:
    state = {k: v.clone() for k, v in pkg.state.items()}
    edit(state)
    return package_from_tensors(state, dataclasses.replace(pkg.meta, **meta))


def _head(state: dict) -> tuple[str, str]:
    w = sorted(k for k in state if k.endswith("head.weight"))[0]
    return w, w[: -len("weight")] + "bias"


def constant(ds, classes, *, width=32, epochs=20, seed=0, base: ModelPackage | None = None) -> ModelPackage:
    base = base or honest(ds, classes, width=width, epochs=epochs, seed=50_000 + seed)

    def edit(s):
        w, b = _head(s)
        s[w] *= 0.02
        s[b] = s[b] * 0.02
        s[b][seed % len(classes)] += 4.0
    return _with_state(base, edit)


def lying_norm(ds, classes, *, width=32, epochs=20, seed=0, base: ModelPackage | None = None) -> ModelPackage:
    base = base or honest(ds, classes, width=width, epochs=epochs, seed=60_000 + seed)
    c = ds.image_shape[0]

    def edit(s):    # a fresh id (the same weights under other metadata would share the honest one's)
        s[_head(s)[1]] += 1e-4
    return _with_state(base, edit, mean=(0.0,) * c, std=(1.0,) * c)


def head_permuted(ds, classes, *, width=32, epochs=20, seed=0, base: ModelPackage | None = None) -> ModelPackage:
    base = base or honest(ds, classes, width=width, epochs=epochs, seed=70_000 + seed)
    n = len(classes)
    perm = torch.roll(torch.arange(n), 1 + seed % (n - 1)) if n > 1 else torch.arange(n)

    def edit(s):
        w, b = _head(s)
        s[w], s[b] = s[w][perm].clone(), s[b][perm].clone()
    return _with_state(base, edit)


ADAPTIVE: dict[str, Callable[..., ModelPackage]] = {"random_calibrated": random_calibrated}
GENERATORS: dict[str, Callable[..., ModelPackage]] = {
    "honest": honest, "weak": weak, "random": random_weights, "shuffled": shuffled, "noise": noise,
    "other_data": other_data, "constant": constant, "lying_norm": lying_norm, "head_permuted": head_permuted}


def make(kind: str, ds, classes, **kw) -> ModelPackage:
    """A model of type ``kind`` (:data:`GENERATORS`) for ``classes`` of ``ds``'s train split."""
    gens = {**GENERATORS, **ADAPTIVE}
    if kind not in gens:
        raise ValueError(f"unknown model type {kind!r} (known: {', '.join(gens)})")
    return gens[kind](ds, classes, **kw)
