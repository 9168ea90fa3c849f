"""``folder:PATH``: any folder-per-class image tree as a few-shot data set (see docs/data.md).

An optional ``split.json`` (or ``folder:PATH?split=FILE.json``) names the train/val/test classes;
otherwise a seeded 64/16/20 class split is used. Images are decoded with Pillow and resized to the
requested side; only the classes asked for are decoded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from free_dfml.common.datasets import (IMAGE_EXTENSIONS, SPLITS, DataError, FewShotDataset, SplitData,
                                       _check_classes, _check_split)


def _load_image(path: Path, size: int, grayscale: bool) -> np.ndarray:
    """Pillow: convert to RGB / L, resize the shorter side to ``size``, centre-crop; uint8 [C, H, W]."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("L" if grayscale else "RGB")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return a[None] if grayscale else a.transpose(2, 0, 1)


def _seeded_class_split(names: list[str], seed: int) -> dict[str, list[str]]:
    n = len(names)
    if n < 3:
        raise DataError(f"a seeded class split needs at least 3 classes, found {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(0.16 * n)))
    n_test = max(1, int(round(0.20 * n)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"too few classes ({n}) for a 64/16/20 split")
    order = [names[i] for i in perm]
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


class FolderDataset(FewShotDataset):
    """A folder per class (torchvision ``ImageFolder`` layout).

    The class split comes from ``split_file`` when given, else ``ROOT/split.json`` when present
    (``{"train": [dir, ...], "val": [...], "test": [...]}``; a split may be empty or left out, e.g.
    every class in ``test`` for evaluation only, and is an error only when it is used), else a seeded
    64/16/20 split of the class folders. :meth:`all_classes` is every class folder, whatever the split. Images are resized (shorter side) and centre-cropped to ``image_size``.
    ``images_per_class`` keeps the first images of each class in file-name order (and requires
    at least that many). Mean/std come from the train split.
    """

    name = "folder"

    def __init__(self, root: str | os.PathLike, *, image_size: int = 32, grayscale: bool = False,
                 seed: int = 0, images_per_class: int | None = None,
                 split_file: str | os.PathLike | None = None):
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"folder data set: {self.root} is not a directory "
                            "(expected one sub-folder of images per class)")
        self.image_size, self.grayscale, self.seed = int(image_size), bool(grayscale), int(seed)
        self.images_per_class = images_per_class
        self.image_shape = (1 if grayscale else 3, self.image_size, self.image_size)
        self._files = self._scan()
        self.split_file: Path | None = None
        self.class_split = self._class_split(split_file)
        if images_per_class is not None:
            short = [(c, len(f)) for c, f in self._files.items()
                     if len(f) < images_per_class and any(c in v for v in self.class_split.values())]
            if short:
                raise DataError(f"folder data set: class {short[0][0]!r} has only {short[0][1]} images, "
                                f"fewer than images_per_class={images_per_class}")

    def _scan(self) -> dict[str, list[Path]]:
        files: dict[str, list[Path]] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            imgs = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if imgs:
                files[d.name] = imgs
        if not files:
            raise DataError(f"folder data set: no class folders with images under {self.root} "
                            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
        return files

    def _class_split(self, split_file) -> dict[str, list[str]]:
        path = Path(split_file).expanduser() if split_file is not None else self.root / "split.json"
        if split_file is not None and not path.is_file():
            raise DataError(f"folder data set: split file {path} does not exist")
        if not path.is_file():
            return _seeded_class_split(sorted(self._files), self.seed)
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"folder data set: cannot read split file {path}: {e}") from None
        if not isinstance(spec, dict) or any(not isinstance(spec.get(s, []), list) for s in SPLITS) \
                or not any(spec.get(s) for s in SPLITS):
            raise DataError(f"split file {path} must be a JSON object with lists 'train', 'val', 'test' "
                            "(at least one of them not empty)")
        spec = {s: spec.get(s, []) for s in SPLITS}
        self.split_file = path
        seen: dict[str, str] = {}
        for s in SPLITS:
            for c in spec[s]:
                c = str(c)
                if c not in self._files:
                    raise DataError(f"split file {path}: class folder {c!r} (in {s!r}) not found "
                                    f"under {self.root} or holds no images")
                if c in seen:
                    raise DataError(f"split file {path}: class {c!r} is in both {seen[c]!r} and {s!r}")
                seen[c] = s
        return {s: [str(c) for c in spec[s]] for s in SPLITS}

    def subset(self, split: str, classes: Sequence[int]) -> SplitData:
        """As the base class, but decodes only those classes' image files (the client's privacy
        audit reads no other class's images; the train split's mean/std still read them all)."""
        _check_split(split)
        if split in self._splits:
            return super().subset(split, classes)
        names = self._names(split)
        cls = _check_classes(classes, len(names), split)
        return self._read([names[c] for c in cls])

    def _names(self, split: str) -> list[str]:
        names = self.class_split[split]
        if not names:
            raise DataError(f"folder data set: split {split!r} is empty in split file {self.split_file}")
        return names

    def _load(self, name: str) -> SplitData:
        return self._read(self._names(name))

    @property
    def class_folders(self) -> list[str]:
        """Every class folder holding images, sorted by name."""
        return sorted(self._files)

    def all_classes(self) -> SplitData:
        """Every class folder (sorted by name), whether or not the split file lists it."""
        return self._read(self.class_folders)

    def _read(self, classes: list[str]) -> SplitData:
        images, labels = [], []
        for k, c in enumerate(classes):
            files = self._files[c]
            if self.images_per_class is not None:
                if len(files) < self.images_per_class:
                    raise DataError(f"folder data set: class {c!r} has only {len(files)} images, "
                                    f"fewer than images_per_class={self.images_per_class}")
                files = files[: self.images_per_class]
            for f in files:
                images.append(_load_image(f, self.image_size, self.grayscale))
                labels.append(k)
        x = torch.from_numpy(np.stack(images)) if images else \
            torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return SplitData(x, torch.tensor(labels, dtype=torch.int64), list(classes))
