"""A small synthetic FewShotDataset for the server tests.

Used only while ``free_dfml.common.datasets`` does not exist yet (the glyph data set is written by
another engineer): :func:`ensure_datasets_module` then installs a stand-in module with the same
interface (``SplitData``, ``FewShotDataset``, ``to_float``, ``open_dataset``) so that
``common.episodes`` / ``common.evaluation`` import. Each class is a distinct coloured pattern
(per-class random low-frequency colour field) plus per-image noise and shifts: learnable, and
classes of different splits differ.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


try:   # the real container when it exists, so the fake is a drop-in
    from free_dfml.common.datasets import SplitData, to_float
except ImportError:  # pragma: no cover - before common/datasets.py landed
    SplitData, to_float = None, _to_float


@dataclass
class _FakeSplitData:
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_indices(self) -> list[torch.Tensor]:
        return [torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes)]


if SplitData is None:  # pragma: no cover
    SplitData = _FakeSplitData


class FakeFewShotDataset:
    name = "fake"

    def __init__(self, image_size: int = 32, seed: int = 0, images_per_class: int = 30,
                 classes: tuple[int, int, int] = (20, 8, 8), channels: int = 3,
                 noise: float = 0.15, shift: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.image_shape = (channels, image_size, image_size)
        self._splits: dict[str, SplitData] = {}
        for split, n in zip(("train", "val", "test"), classes):
            xs, ys = [], []
            for c in range(n):
                proto = F.interpolate(torch.rand(1, channels, 4, 4, generator=g), size=image_size,
                                      mode="bilinear", align_corners=False)[0]
                for _ in range(images_per_class):
                    dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
                    x = torch.roll(proto, shifts=(dx, dy), dims=(1, 2))
                    x = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
                    xs.append((x * 255).round().to(torch.uint8))
                    ys.append(c)
            self._splits[split] = SplitData(torch.stack(xs), torch.tensor(ys, dtype=torch.int64),
                                            [f"{split}-{c}" for c in range(n)])
        allx = to_float(self._splits["train"].images)
        self.mean = tuple(float(v) for v in allx.mean((0, 2, 3)))
        self.std = tuple(float(v) for v in allx.std((0, 2, 3)))

    def split(self, name: str) -> SplitData:
        return self._splits[name]

    def subset(self, split: str, class_indices) -> SplitData:
        data = self._splits[split]
        idx, labels = [], []
        for new, c in enumerate(class_indices):
            i = torch.nonzero(data.labels == c).flatten()
            idx.append(i)
            labels.append(torch.full((len(i),), new, dtype=torch.int64))
        idx = torch.cat(idx)
        return SplitData(data.images[idx], torch.cat(labels), [data.classes[c] for c in class_indices])


def ensure_datasets_module() -> bool:
    """Install the stand-in ``free_dfml.common.datasets`` if the real one is missing; True if installed."""
    try:
        import free_dfml.common.datasets  # noqa: F401
        return False
    except ImportError:
        pass
    mod = types.ModuleType("free_dfml.common.datasets")
    mod.SplitData = _FakeSplitData
    mod.FewShotDataset = FakeFewShotDataset
    mod.to_float = to_float
    mod.open_dataset = lambda name="fake", image_size=32, seed=0, images_per_class=None, cache_dir=None: \
        FakeFewShotDataset(image_size=image_size, seed=seed, images_per_class=images_per_class or 30)
    sys.modules["free_dfml.common.datasets"] = mod
    import free_dfml.common as common
    common.datasets = mod
    return True
