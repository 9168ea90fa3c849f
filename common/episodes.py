"""N-way K-shot episodes sampled from a :class:`~free_dfml.common.datasets.SplitData`, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from free_dfml.common.datasets import SplitData


@dataclass
class Episode:
    support_x: torch.Tensor   # uint8 [way*shot, C, H, W], ordered class by class
    support_y: torch.Tensor   # int64 [way*shot], episode labels 0..way-1
    query_x: torch.Tensor     # uint8 [way*query, C, H, W]
    query_y: torch.Tensor
    classes: list[int]        # split-level class indices, in episode-label order


class EpisodeSampler:
    """Draws episodes from a split with its own ``torch.Generator``: the same seed gives the same episodes."""

    def __init__(self, data: SplitData, *, way: int, shot: int, query: int, seed: int = 0):
        if way < 2:
            raise ValueError(f"way must be >= 2, got {way}")
        if shot < 1 or query < 1:
            raise ValueError("shot and query must be >= 1")
        if data.num_classes < way:
            raise ValueError(f"a {way}-way episode needs {way} classes; the split has {data.num_classes}")
        self.data, self.way, self.shot, self.query = data, way, shot, query
        self._index = data.class_indices()
        short = [data.classes[c] for c, idx in enumerate(self._index) if len(idx) < shot + query]
        if short:
            raise ValueError(f"{len(short)} class(es) have fewer than shot+query={shot + query} "
                             f"images (first: {short[0]!r})")
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self) -> Episode:
        classes = torch.randperm(self.data.num_classes, generator=self.gen)[: self.way].tolist()
        s_idx, q_idx = [], []
        for c in classes:
            idx = self._index[c]
            pick = idx[torch.randperm(len(idx), generator=self.gen)[: self.shot + self.query]]
            s_idx.append(pick[: self.shot])
            q_idx.append(pick[self.shot:])
        s = torch.cat(s_idx)
        q = torch.cat(q_idx)
        labels = torch.arange(self.way)
        return Episode(self.data.images[s], labels.repeat_interleave(self.shot),
                       self.data.images[q], labels.repeat_interleave(self.query), classes)

    def take(self, n: int) -> list[Episode]:
        return [self.sample() for _ in range(n)]
