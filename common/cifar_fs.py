"""``cifar-fs:PATH``: CIFAR-FS, CIFAR-100 with the standard 64/16/20 class split (see docs/data.md).

``PATH`` is the ``cifar-100-python.tar.gz`` archive, downloaded by hand, or its extracted folder.
The archive's pickles are read with a restricted unpickler that only rebuilds numeric arrays.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from free_dfml.common.datasets import SPLITS, DataError, FewShotDataset, SplitData


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

CIFAR_HELP = (f"download {CIFAR100_URL} by hand and pass its path: the .tar.gz itself, the extracted "
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
        raise DataError(f"CIFAR-100 {what}: cannot decode ({e}); {CIFAR_HELP}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-100 {what}: not a dict of arrays; {CIFAR_HELP}")
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
        raise DataError(f"CIFAR-FS: no CIFAR-100 under {path}; {CIFAR_HELP}")
    raise DataError(f"CIFAR-FS: {path} does not exist; {CIFAR_HELP}")


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
        raise DataError(f"CIFAR-FS: cannot read {p} ({e}); {CIFAR_HELP}") from None
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
                                f"(is this CIFAR-100?); {CIFAR_HELP}")
            xs, ys = [], []
            for f in ("train", "test"):
                d = files[f]
                if "data" not in d or "fine_labels" not in d:
                    raise DataError(f"CIFAR-FS: batch {f!r} lacks data/fine_labels; {CIFAR_HELP}")
                x = np.asarray(d["data"], dtype=np.uint8)
                if x.ndim != 2 or x.shape[1] != 3072:
                    raise DataError(f"CIFAR-FS: batch {f!r} has data of shape {x.shape}, "
                                    f"expected [N, 3072]; {CIFAR_HELP}")
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
