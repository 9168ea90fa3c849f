"""Few-shot data sets: the interface every other module codes against, ``open_dataset``, and glyphs.

* ``glyphs``          - the embedded default (characters rendered from matplotlib's fonts; see glyphs.py)
* ``cifar-fs:PATH``   - CIFAR-FS (CIFAR-100 with the 64/16/20 class split of Bertinetto et al., 2019;
                        cifar_fs.py)
* ``folder:PATH``     - any folder-per-class image tree (a plain existing directory path works too;
                        folder_data.py)

Images are uint8 ``[N, C, H, W]``; convert with :func:`to_float` and normalise with the data set's
``mean`` / ``std``. Labels are int64 ``0..num_classes-1`` indexing ``SplitData.classes``.
See docs/data.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from free_dfml.common import glyphs as _glyphs

SPLITS = ("train", "val", "test")
ALL = "all"                       # every class of a data set (a folder: every class folder)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """A data problem with a one-line explanation: missing paths, bad specs, too few images."""


@dataclass
class SplitData:
    images: torch.Tensor      # uint8, [N, C, H, W]
    labels: torch.Tensor      # int64, [N], values 0..len(classes)-1
    classes: list[str]        # human-readable class names, index = label
    _class_indices: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def class_indices(self) -> list[torch.Tensor]:
        """Per class, the indices of its images (computed once)."""
        if self._class_indices is None:
            order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
            self._class_indices = list(torch.split(order, counts))
        return self._class_indices

    def take(self, classes: Sequence[int]) -> "SplitData":
        """Just the images of ``classes`` (indices into this split), relabelled 0..k-1 in that order."""
        index = self.class_indices()
        parts = [index[c] for c in classes]
        idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        labels = torch.cat([torch.full((len(p),), k, dtype=torch.int64) for k, p in enumerate(parts)]) \
            if parts else torch.empty(0, dtype=torch.int64)
        return SplitData(self.images[idx], labels, [self.classes[c] for c in classes])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __repr__(self) -> str:
        return (f"SplitData({len(self)} images {tuple(self.images.shape[1:])}, "
                f"{self.num_classes} classes)")


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
    return images_uint8.float().div_(255.0)


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")


def _check_classes(classes: Sequence[int], n: int, split: str) -> list[int]:
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < n]
    if bad:
        raise DataError(f"class index {bad[0]} out of range for split {split!r} with {n} classes")
    if len(set(out)) != len(out):
        raise DataError(f"repeated class indices in {out}")
    return out


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for i in range(0, len(images), 4096):
        x = images[i:i + 4096].double().div_(255.0)
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    if n == 0:
        raise DataError("cannot compute mean/std: the train split has no images")
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


class FewShotDataset:
    """Base class: three class-disjoint splits, each loaded once and kept."""

    name: str = "dataset"
    image_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(self) -> None:
        self._splits: dict[str, SplitData] = {}
        self._mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    # subclasses implement
    def _load(self, name: str) -> SplitData:  # pragma: no cover - abstract
        raise NotImplementedError

    def split(self, name: str) -> SplitData:
        """The split ``name`` ("train", "val" or "test"), loaded on first use and cached."""
        _check_split(name)
        if name not in self._splits:
            self._splits[name] = self._load(name)
        return self._splits[name]

    def classes(self, split: str) -> list[str]:
        """The class names of a split (cheap for glyphs: no rendering)."""
        return list(self.split(split).classes)

    def all_classes(self) -> SplitData:
        """Every class of the data set as one SplitData: the three splits, in split order."""
        parts = [self.split(s) for s in SPLITS]
        parts = [p for p in parts if p.num_classes]
        offsets = torch.tensor([0] + [p.num_classes for p in parts]).cumsum(0).tolist()
        return SplitData(torch.cat([p.images for p in parts]),
                         torch.cat([p.labels + off for p, off in zip(parts, offsets)]),
                         [c for p in parts for c in p.classes])

    def select(self, split: str) -> SplitData:
        """``split`` as in :meth:`split`, or ``"all"`` for :meth:`all_classes`."""
        return self.all_classes() if split == ALL else self.split(split)

    def subset(self, split: str, classes: Sequence[int]) -> SplitData:
        """Just the images of ``classes`` (indices into the split), relabelled 0..k-1 in the given order."""
        data = self.split(split)
        return data.take(_check_classes(classes, data.num_classes, split))

    # normalisation: from the meta-train split unless a subclass fixes it
    @property
    def mean(self) -> tuple[float, ...]:
        return self._stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats()[1]

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._mean_std is None:
            self._mean_std = _mean_std(self.split("train").images)
        return self._mean_std

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float, normalised with this data set's mean and std."""
        mean = torch.tensor(self.mean, device=images_uint8.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images_uint8.device).view(1, -1, 1, 1)
        return (to_float(images_uint8) - mean) / std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape})"


# ================================================================================================
# glyphs
# ================================================================================================

class GlyphsDataset(FewShotDataset):
    """The embedded default: see :mod:`free_dfml.common.glyphs` and docs/data.md."""

    name = "glyphs"

    def __init__(self, *, image_size: int = 32, grayscale: bool = False, seed: int = 0,
                 images_per_class: int | None = None, cache_dir: str | os.PathLike | None = None):
        super().__init__()
        if image_size < 8:
            raise DataError(f"image_size must be at least 8, got {image_size}")
        ipc = _glyphs.DEFAULT_IMAGES_PER_CLASS if images_per_class is None else int(images_per_class)
        if ipc < 1:
            raise DataError(f"images_per_class must be at least 1, got {images_per_class}")
        self.config = _glyphs.RenderConfig(image_size=int(image_size), grayscale=bool(grayscale),
                                           seed=int(seed), images_per_class=ipc)
        self.cache_dir = cache_dir
        self.image_shape = (self.config.channels, self.config.image_size, self.config.image_size)
        if grayscale:
            self._mean_std = (_glyphs.MEAN_GRAY, _glyphs.STD_GRAY)
        else:
            self._mean_std = (_glyphs.MEAN_RGB, _glyphs.STD_RGB)

    @property
    def images_per_class(self) -> int:
        return self.config.images_per_class

    def index(self) -> "_glyphs.GlyphIndex":
        try:
            return _glyphs.load_index(self.cache_dir)
        except _glyphs.GlyphsError as e:
            raise DataError(str(e)) from None

    def glyph_classes(self, split: str) -> list["_glyphs.GlyphClass"]:
        """The classes of a split (code point, name, script, fonts), without rendering."""
        _check_split(split)
        return self.index().split_classes(split)

    def classes(self, split: str) -> list[str]:
        if split in self._splits:
            return list(self._splits[split].classes)
        return [c.label for c in self.glyph_classes(split)]

    def _ensure(self, name: str):
        try:
            return _glyphs.ensure_split(name, self.config, self.cache_dir)
        except _glyphs.GlyphsError as e:
            raise DataError(str(e)) from None

    def _load(self, name: str) -> SplitData:
        path, classes = self._ensure(name)
        images, labels = _glyphs.read_split(path)
        return SplitData(images, labels, [c.label for c in classes])

    def subset(self, split: str, classes: Sequence[int]) -> SplitData:
        """As the base class, but reads only those classes' rows from the cache file (low memory)."""
        _check_split(split)
        if split in self._splits:
            return super().subset(split, classes)
        path, all_classes = self._ensure(split)
        cls = _check_classes(classes, len(all_classes), split)
        images, labels = _glyphs.read_split(path, cls, self.config.images_per_class)
        return SplitData(images, labels, [all_classes[c].label for c in cls])


# ================================================================================================
# open_dataset
# ================================================================================================

SPEC_HELP = ('"glyphs", "cifar-fs:PATH", "folder:PATH" (optionally "folder:PATH?split=FILE.json") '
             "or an existing directory path")


def open_dataset(spec: str, *, image_size: int = 32, grayscale: bool = False, seed: int = 0,
                 images_per_class: int | None = None, cache_dir: str | None = None) -> FewShotDataset:
    """Open a data set from a spec: ``glyphs`` | ``cifar-fs:PATH`` | ``folder:PATH`` | a directory path.

    ``seed`` drives the glyph rendering and the seeded class split of a folder without split file
    (CIFAR-FS has a fixed split). ``images_per_class`` caps (folder, CIFAR-FS) or sets (glyphs,
    default 40) the images per class. ``cache_dir`` overrides ``$FREE_DFML_CACHE`` for glyphs.
    """
    from free_dfml.common.cifar_fs import CIFAR_HELP, CifarFSDataset
    from free_dfml.common.folder_data import FolderDataset
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data set spec; expected {SPEC_HELP}")
    if image_size < 8:
        raise DataError(f"image_size must be at least 8, got {image_size}")
    if images_per_class is not None and images_per_class < 1:
        raise DataError(f"images_per_class must be at least 1, got {images_per_class}")
    s = spec.strip()
    kind, sep, rest = s.partition(":")
    kind_l = kind.lower()
    if kind_l == "glyphs" and (not sep or not rest):
        return GlyphsDataset(image_size=image_size, grayscale=grayscale, seed=seed,
                             images_per_class=images_per_class, cache_dir=cache_dir)
    if kind_l in ("cifar-fs", "cifarfs", "cifar_fs") and sep:
        if not rest:
            raise DataError(f"cifar-fs needs a path: cifar-fs:PATH; {CIFAR_HELP}")
        return CifarFSDataset(rest, image_size=image_size, grayscale=grayscale,
                              images_per_class=images_per_class)
    if kind_l in ("cifar-fs", "cifarfs", "cifar_fs"):
        raise DataError(f"cifar-fs needs a path: cifar-fs:PATH; {CIFAR_HELP}")
    if kind_l == "folder" and sep:
        path, _, query = rest.partition("?")
        split_file = None
        if query:
            key, eq, val = query.partition("=")
            if key != "split" or not eq or not val:
                raise DataError(f"bad folder option {query!r}; expected folder:PATH?split=FILE.json")
            split_file = val
        if not path:
            raise DataError("folder needs a path: folder:PATH")
        return FolderDataset(path, image_size=image_size, grayscale=grayscale, seed=seed,
                             images_per_class=images_per_class, split_file=split_file)
    if Path(s).expanduser().is_dir():
        return FolderDataset(s, image_size=image_size, grayscale=grayscale, seed=seed,
                             images_per_class=images_per_class)
    if kind_l == "folder":
        raise DataError("folder needs a path: folder:PATH")
    raise DataError(f"unknown data set spec {spec!r} (not a known kind, and no such directory); "
                    f"expected {SPEC_HELP}")
