"""A small synthetic FewShotDataset for the server tests, with the interface of
``free_dfml.common.datasets`` (``split``, ``classes``, ``subset``). Each class is a distinct coloured
pattern (per-class random low-frequency colour field) plus per-image noise and shifts: learnable,
and classes of different splits differ. Seconds to build, so the algorithm tests need neither the
glyph cache nor minutes of CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from free_dfml.common.datasets import SplitData, to_float


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
        return self._splits[split].take(class_indices)
