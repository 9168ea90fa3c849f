"""The memory bank: recovered images per (model, class), bounded, sampled into cross-task episodes.

Every key (``"<model_id>:<class>"``, or ``"label:<name>"`` where clients share class identifiers)
owns a ring buffer of at most ``capacity`` images, stored as uint8 (or float16) tensors at the
meta-learner's size. ``max_bytes`` bounds the whole bank: when a new key would take it past that,
the key written to longest ago is dropped (its model's classes come back when FIVE next visits
it), so memory stays flat however many models the zoo holds. Nothing is ever written as an image
file: :meth:`MemoryBank.state_dict` gives plain tensors plus a JSON-able description, stored
inside the trainer's safetensors checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class BankEpisode:
    support_x: torch.Tensor   # float [way*shot, C, H, W] in [0, 1], ordered class by class
    support_y: torch.Tensor   # int64 episode labels 0..way-1
    query_x: torch.Tensor
    query_y: torch.Tensor
    keys: list[str]           # bank keys in episode-label order


class _Ring:
    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.data = torch.empty((capacity, *shape), dtype=dtype)
        self.size = 0
        self.pos = 0

    def add(self, x: torch.Tensor) -> None:
        cap = self.data.shape[0]
        if len(x) >= cap:
            x = x[-cap:]
        n = len(x)
        first = min(n, cap - self.pos)
        self.data[self.pos:self.pos + first] = x[:first]
        if n > first:
            self.data[: n - first] = x[first:]
        self.pos = (self.pos + n) % cap
        self.size = min(cap, self.size + n)

    def ordered(self) -> torch.Tensor:
        """Contents oldest -> newest."""
        if self.size < self.data.shape[0]:
            return self.data[: self.size]
        return torch.cat([self.data[self.pos:], self.data[: self.pos]])


class MemoryBank:
    def __init__(self, capacity: int = 400, image_shape: tuple[int, int, int] = (3, 32, 32),
                 dtype: torch.dtype = torch.uint8, max_bytes: int | None = None):
        if capacity < 1:
            raise ValueError("bank capacity must be >= 1")
        if dtype not in (torch.uint8, torch.float16):
            raise ValueError("bank dtype must be uint8 or float16")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("bank max_bytes must be >= 1 (or None: unbounded)")
        self.capacity, self.image_shape, self.dtype = capacity, tuple(image_shape), dtype
        self.max_bytes = max_bytes
        self._rings: OrderedDict[str, _Ring] = OrderedDict()   # least recently written first
        self._model_of: dict[str, str] = {}
        self.evicted = 0

    @classmethod
    def from_config(cls, bank, image_shape: tuple[int, int, int]) -> "MemoryBank":
        """The bank a :class:`~free_dfml.common.config.BankConfig` ``bank`` describes, for images of
        ``image_shape`` (the meta-learner's input)."""
        return cls(bank.capacity, image_shape, torch.uint8 if bank.dtype == "uint8" else torch.float16,
                   max_bytes=int(bank.max_mb * 2 ** 20) if bank.max_mb else None)

    @staticmethod
    def ring_bytes(capacity: int, image_shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes one key's ring takes (preallocated at full capacity)."""
        n = capacity
        for d in image_shape:
            n *= int(d)
        return n * (1 if dtype == torch.uint8 else 2)

    @property
    def max_keys(self) -> int | None:
        """How many keys fit under ``max_bytes`` (None: no bound)."""
        if self.max_bytes is None:
            return None
        return max(1, self.max_bytes // self.ring_bytes(self.capacity, self.image_shape, self.dtype))

    @property
    def nbytes(self) -> int:
        return sum(r.data.numel() * r.data.element_size() for r in self._rings.values())

    def _evict(self) -> None:
        limit = self.max_keys
        while limit is not None and len(self._rings) > limit:
            key, _ = self._rings.popitem(last=False)
            self._model_of.pop(key, None)
            self.evicted += 1

    # -------------------------------------------------------------------------------- writing
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).clamp(0, 1)
        if self.dtype == torch.uint8:
            return (x * 255).round().to(torch.uint8)
        return x.to(torch.float16)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    def add(self, model_id: str, images: torch.Tensor, labels: torch.Tensor,
            class_keys: list[str] | None = None) -> None:
        """Store a teacher's recovered ``images`` (float [0,1]) under their classes.

        ``class_keys`` (optional) names the teacher's classes globally; otherwise each of its local
        classes is its own key ``"<model_id>:<class>"``."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"bank holds {self.image_shape} images, got {tuple(images.shape[1:])}")
        enc = self._encode(images)
        labels = labels.detach().cpu()
        for c in labels.unique().tolist():
            key = f"label:{class_keys[c]}" if class_keys is not None else f"{model_id}:{c}"
            ring = self._rings.get(key)
            if ring is None:
                ring = self._rings[key] = _Ring(self.capacity, self.image_shape, self.dtype)
                self._model_of[key] = model_id
            else:
                self._rings.move_to_end(key)
            ring.add(enc[labels == c])
        self._evict()

    def drop_model(self, model_id: str) -> int:
        """Forget every key a model filled (a quarantined teacher's images); returns how many."""
        keys = [k for k, m in self._model_of.items() if m == model_id]
        for k in keys:
            self._rings.pop(k, None)
            del self._model_of[k]
        return len(keys)

    # -------------------------------------------------------------------------------- reading
    def keys(self) -> list[str]:
        return list(self._rings)

    def models(self) -> list[str]:
        return sorted(set(self._model_of.values()))

    def model_of(self, key: str) -> str:
        """The model whose images first filled ``key``."""
        return self._model_of[key]

    def count(self, key: str) -> int:
        ring = self._rings.get(key)
        return 0 if ring is None else ring.size

    def __len__(self) -> int:
        return sum(r.size for r in self._rings.values())

    def images(self, key: str) -> torch.Tensor:
        """Float [n, C, H, W] images of one key, oldest first."""
        return self._decode(self._rings[key].ordered())

    def model_images(self, model_id: str, per_class: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest ``per_class`` images of every class of a model (for image grids)."""
        xs, ys = [], []
        for i, key in enumerate(k for k in self._rings if self._model_of[k] == model_id):
            x = self.images(key)[-per_class:]
            xs.append(x)
            ys.append(torch.full((len(x),), i, dtype=torch.long))
        if not xs:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)

    def eligible(self, need: int) -> list[str]:
        return [k for k, r in self._rings.items() if r.size >= need]

    def can_sample(self, way: int, shot: int, query: int) -> bool:
        return len(self.eligible(shot + query)) >= way

    def sample_episode(self, way: int, shot: int, query: int, generator: torch.Generator
                       ) -> BankEpisode:
        """``way`` keys drawn across all models, ``shot`` support + ``query`` query images each."""
        keys = self.eligible(shot + query)
        if len(keys) < way:
            raise ValueError(f"the bank has {len(keys)} class(es) with >= {shot + query} images; "
                             f"a {way}-way episode needs {way}")
        pick = torch.randperm(len(keys), generator=generator)[:way].tolist()
        sx, qx = [], []
        for k in (keys[i] for i in pick):
            ring = self._rings[k]
            idx = torch.randperm(ring.size, generator=generator)[: shot + query]
            x = self._decode(ring.data[idx])
            sx.append(x[:shot])
            qx.append(x[shot:])
        lab = torch.arange(way)
        return BankEpisode(torch.cat(sx), lab.repeat_interleave(shot), torch.cat(qx),
                           lab.repeat_interleave(query), [keys[i] for i in pick])

    # ---------------------------------------------------------------------------- persistence
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, info): one tensor per key (raw ring order) and a JSON-able description."""
        tensors, entries = {}, []
        for i, (key, ring) in enumerate(self._rings.items()):
            # raw ring layout + write position, so a restored bank samples exactly like the original
            tensors[f"bank.{i}"] = ring.data[: ring.size].contiguous().clone()
            entries.append({"key": key, "model": self._model_of[key], "pos": ring.pos})
        info = {"capacity": self.capacity, "image_shape": list(self.image_shape),
                "dtype": str(self.dtype).replace("torch.", ""), "entries": entries}
        return tensors, info

    def load_state_dict(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        self.capacity = int(info["capacity"])
        self.image_shape = tuple(info["image_shape"])
        self.dtype = getattr(torch, info["dtype"])
        self._rings, self._model_of = OrderedDict(), {}
        for i, e in enumerate(info["entries"]):
            ring = _Ring(self.capacity, self.image_shape, self.dtype)
            data = tensors[f"bank.{i}"].to(self.dtype)
            ring.data[: len(data)] = data
            ring.size, ring.pos = len(data), int(e["pos"])
            self._rings[e["key"]] = ring
            self._model_of[e["key"]] = e["model"]
        self._evict()   # a smaller max_bytes than the checkpoint's: keep the newest keys
