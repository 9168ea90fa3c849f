"""Few-shot data sets: the interface every other module codes against, and the three data sets.

* ``glyphs``          - the embedded default (characters rendered from matplotlib's fonts; see glyphs.py)
* ``cifar-fs:PATH``   - CIFAR-FS (CIFAR-100 with the 64/16/20 class split of Bertinetto et al., 2019)
* ``folder:PATH``     - any folder-per-class image tree (a plain existing directory path works too)

Images are uint8 ``[N, C, H, W]``; convert with :func:`to_float` and normalise with the data set's
``mean`` / ``std``. Labels are int64 ``0..num_classes-1`` indexing ``SplitData.classes``.
See docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
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
        cls = _check_classes(classes, data.num_classes, split)
        index = data.class_indices()
        parts = [index[c] for c in cls]
        idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        labels = torch.cat([torch.full((len(p),), k, dtype=torch.int64) for k, p in enumerate(parts)]) \
            if parts else torch.empty(0, dtype=torch.int64)
        return SplitData(data.images[idx], labels, [data.classes[c] for c in cls])

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
# folder
# ================================================================================================

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


# ================================================================================================
# CIFAR-FS
# ================================================================================================

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

# Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable closed-form solvers"
# (ICLR 2019): the standard CIFAR-FS class split of CIFAR-100 (64 / 16 / 20 classes).
CIFAR_FS_SPLIT: dict[str, tuple[str, ...]] = {
    "train": (
        "train", "skyscraper", "turtle", "raccoon", "spider", "orange", "castle", "keyboard",
        "clock", "pear", "girl", "seal", "elephant", "apple", "aquarium_fish", "bus",
        "mushroom", "possum", "squirrel", "chair", "tank", "plate", "wolf", "road",
        "mouse", "boy", "shrew", "couch", "sunflower", "tiger", "caterpillar", "lion",
        "streetcar", "lawn_mower", "tulip", "forest", "dolphin", "cockroach", "bear", "porcupine",
        "bee", "hamster", "lobster", "bowl", "can", "bottle", "trout", "snake",
        "bridge", "pine_tree", "skunk", "lizard", "cup", "kangaroo", "oak_tree", "dinosaur",
        "rabbit", "orchid", "willow_tree", "ray", "palm_tree", "mountain", "house", "cloud",
    ),
    "val": (
        "otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver",
        "beetle", "tractor", "flatfish", "maple_tree", "camel", "crab", "sea", "cattle",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
        "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
        "wardrobe", "whale", "woman", "worm",
    ),
}

_CIFAR_HELP = (f"download {CIFAR100_URL} by hand and pass its path: the .tar.gz itself, the extracted "
               "'cifar-100-python' folder (files meta, train, test), or a folder holding either")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-100 batches only: dicts, lists, bytes, str, ints and numpy arrays.

    The only globals it will resolve are numpy's array-reconstruction function, ``ndarray``,
    ``dtype`` for plain numeric types (object arrays are refused) and ``_codecs.encode`` for
    latin-1 text (how protocol-2 pickles carry bytes); any other global raises.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),   # how Python 3 writes bytes at protocol 2: encode(str, "latin1")
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} in a CIFAR-100 batch file")
        if name == "_reconstruct":
            return _safe_reconstruct
        if name == "dtype":
            return _safe_dtype
        if name == "encode":
            return _latin1_encode
        return np.ndarray


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


def _safe_reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("unexpected array subclass in a CIFAR-100 batch file")
    return _RECONSTRUCT(np.ndarray, shape, dtype_code)


def _latin1_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected call to _codecs.encode in a CIFAR-100 batch file")
    return text.encode("latin1")


def _safe_dtype(spec, align=False, copy=False):
    if not (isinstance(spec, str) and len(spec) >= 2 and spec[0] in "biuf" and spec[1:].isdigit()):
        raise pickle.UnpicklingError(f"dtype {spec!r} is not allowed in a CIFAR-100 batch file")
    return np.dtype(spec, bool(align), bool(copy))


def _unpickle_batch(raw: bytes, what: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"CIFAR-100 {what}: cannot decode ({e}); {_CIFAR_HELP}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-100 {what}: not a dict of arrays; {_CIFAR_HELP}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _find_cifar(path: Path) -> tuple[str, Path]:
    """('dir', folder with meta/train/test) or ('tar', archive)."""
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar", path
    if path.is_dir():
        if all((path / f).is_file() for f in ("meta", "train", "test")):
            return "dir", path
        if all((path / "cifar-100-python" / f).is_file() for f in ("meta", "train", "test")):
            return "dir", path / "cifar-100-python"
        if (path / "cifar-100-python.tar.gz").is_file():
            return "tar", path / "cifar-100-python.tar.gz"
        raise DataError(f"CIFAR-FS: no CIFAR-100 under {path}; {_CIFAR_HELP}")
    raise DataError(f"CIFAR-FS: {path} does not exist; {_CIFAR_HELP}")


def _read_cifar_files(path: Path) -> dict[str, dict]:
    kind, p = _find_cifar(path)
    out = {}
    if kind == "dir":
        for f in ("meta", "train", "test"):
            out[f] = _unpickle_batch((p / f).read_bytes(), f)
        return out
    try:
        with tarfile.open(p) as tar:
            for f in ("meta", "train", "test"):
                member = tar.extractfile(f"cifar-100-python/{f}")
                if member is None:
                    raise KeyError(f)
                out[f] = _unpickle_batch(member.read(), f)
    except (tarfile.TarError, KeyError, OSError) as e:
        raise DataError(f"CIFAR-FS: cannot read {p} ({e}); {_CIFAR_HELP}") from None
    return out


class CifarFSDataset(FewShotDataset):
    """CIFAR-FS from a local copy of CIFAR-100 (python version), 600 images per class.

    The pickled batches are decoded with a restricted unpickler that builds only dicts, lists,
    bytes, str, ints and non-object numpy arrays (see docs/data.md).
    """

    name = "cifar-fs"

    def __init__(self, path: str | os.PathLike, *, image_size: int = 32, grayscale: bool = False,
                 images_per_class: int | None = None):
        super().__init__()
        self.path = Path(path).expanduser()
        self.image_size, self.grayscale = int(image_size), bool(grayscale)
        self.images_per_class = images_per_class
        self.image_shape = (1 if grayscale else 3, self.image_size, self.image_size)
        self._kind = _find_cifar(self.path)   # fail early, with the help text
        self._by_class: dict[str, np.ndarray] | None = None

    def _decode(self) -> dict[str, np.ndarray]:
        if self._by_class is None:
            files = _read_cifar_files(self.path)
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in files["meta"].get("fine_label_names", [])]
            missing = [c for s in SPLITS for c in CIFAR_FS_SPLIT[s] if c not in names]
            if missing:
                raise DataError(f"CIFAR-FS: class {missing[0]!r} missing from the archive's meta "
                                f"(is this CIFAR-100?); {_CIFAR_HELP}")
            xs, ys = [], []
            for f in ("train", "test"):
                d = files[f]
                if "data" not in d or "fine_labels" not in d:
                    raise DataError(f"CIFAR-FS: batch {f!r} lacks data/fine_labels; {_CIFAR_HELP}")
                x = np.asarray(d["data"], dtype=np.uint8)
                if x.ndim != 2 or x.shape[1] != 3072:
                    raise DataError(f"CIFAR-FS: batch {f!r} has data of shape {x.shape}, "
                                    f"expected [N, 3072]; {_CIFAR_HELP}")
                xs.append(x.reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["fine_labels"], dtype=np.int64))
            x, y = np.concatenate(xs), np.concatenate(ys)
            self._by_class = {name: x[y == i] for i, name in enumerate(names)}
        return self._by_class

    def _load(self, name: str) -> SplitData:
        by_class = self._decode()
        classes = list(CIFAR_FS_SPLIT[name])
        images, labels = [], []
        for k, c in enumerate(classes):
            x = by_class[c]
            if self.images_per_class is not None:
                if len(x) < self.images_per_class:
                    raise DataError(f"CIFAR-FS: class {c!r} has {len(x)} images, "
                                    f"fewer than images_per_class={self.images_per_class}")
                x = x[: self.images_per_class]
            images.append(x)
            labels.append(np.full(len(x), k, dtype=np.int64))
        x = torch.from_numpy(np.concatenate(images))
        x = _resize_uint8(x, self.image_size, self.grayscale)
        return SplitData(x, torch.from_numpy(np.concatenate(labels)), classes)


def _resize_uint8(x: torch.Tensor, size: int, grayscale: bool) -> torch.Tensor:
    """uint8 RGB [N,3,h,w] -> uint8 [N,C,size,size] (bilinear with antialias; luma for grayscale)."""
    import torch.nn.functional as F
    if not grayscale and x.shape[-1] == size:
        return x.contiguous()
    out = []
    for i in range(0, len(x), 2048):
        b = x[i:i + 2048].float()
        if grayscale:
            b = (b * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if b.shape[-1] != size:
            b = F.interpolate(b, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(b.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


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
            raise DataError(f"cifar-fs needs a path: cifar-fs:PATH; {_CIFAR_HELP}")
        return CifarFSDataset(rest, image_size=image_size, grayscale=grayscale,
                              images_per_class=images_per_class)
    if kind_l in ("cifar-fs", "cifarfs", "cifar_fs"):
        raise DataError(f"cifar-fs needs a path: cifar-fs:PATH; {_CIFAR_HELP}")
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
