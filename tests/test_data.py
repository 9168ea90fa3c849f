"""Data sets: glyphs (determinism, splits, counts, shapes, cache), folder trees and CIFAR-FS."""

from __future__ import annotations

import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from free_dfml.common import glyphs
from free_dfml.common.cifar_fs import CIFAR_FS_SPLIT
from free_dfml.common.datasets import (DataError, FewShotDataset, SplitData, open_dataset,
                                       to_float)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glyph-cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, glyph_cache):
    monkeypatch.setenv("FREE_DFML_CACHE", str(glyph_cache))


# ------------------------------------------------------------------------------------------------
# glyphs
# ------------------------------------------------------------------------------------------------

def test_glyph_splits_are_disjoint_by_class_and_script():
    index = glyphs.load_index()
    by_split = {s: index.split_classes(s) for s in glyphs.SPLITS}
    cps = {s: {c.codepoint for c in v} for s, v in by_split.items()}
    scripts = {s: {c.script for c in v} for s, v in by_split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not cps[a] & cps[b], (a, b)
        assert not scripts[a] & scripts[b], (a, b)
    assert scripts["test"] == set(glyphs.TEST_SCRIPTS)
    assert scripts["val"] == set(glyphs.VAL_SCRIPTS)
    for c in index.classes:
        assert len(c.fonts) >= glyphs.MIN_FONTS
        assert not any(f in glyphs.EXCLUDED_FONTS for f in c.fonts)
        assert c.split == glyphs.split_of_script(c.script)


def test_glyph_class_counts_match_docs():
    counts = glyphs.load_index().counts()
    assert counts["train"] >= 600 and counts["test"] >= 150
    assert counts == glyphs.EXPECTED_COUNTS
    text = DOCS.read_text(encoding="utf-8")
    m = re.search(r"Totals: train (\d+), val (\d+), test (\d+)", text)
    assert m, "docs/data.md must state 'Totals: train N, val N, test N'"
    assert {"train": int(m[1]), "val": int(m[2]), "test": int(m[3])} == counts
    # the per-script table in the docs adds up to the same totals
    table = glyphs.load_index().script_table()
    for split, scripts in table.items():
        for script, n in scripts.items():
            if n >= 10:
                assert re.search(rf"\| {re.escape(script)} \| {split} \| {n} \|", text), (script, split, n)


def test_glyph_index_is_cached(glyph_cache):
    glyphs.load_index()
    files = list((glyph_cache / "glyphs").glob(f"index-v{glyphs.INDEX_VERSION}-*.json"))
    assert len(files) == 1
    again = glyphs._index_from_json(files[0].read_text())
    assert [c.codepoint for c in again.classes] == [c.codepoint for c in glyphs.load_index().classes]


def test_glyphs_deterministic_and_lazy(glyph_cache, tmp_path):
    ds = open_dataset("glyphs", images_per_class=3, seed=0)
    test = ds.split("test")
    # only the test split was rendered
    names = [p.name for p in (glyph_cache / "glyphs").glob("*.safetensors")]
    assert names and all(n.startswith("test-") for n in names), names
    # same seed, fresh cache: the same bytes; another seed: different images
    again = open_dataset("glyphs", images_per_class=3, seed=0, cache_dir=str(tmp_path / "c2")).split("test")
    assert torch.equal(test.images, again.images)
    other = open_dataset("glyphs", images_per_class=3, seed=1, cache_dir=str(tmp_path / "c3")).split("test")
    assert not torch.equal(test.images, other.images)
    # a class renders the same on its own, whatever else was rendered
    gc = ds.glyph_classes("test")[7]
    alone = glyphs.render_class(gc, ds.config)
    assert np.array_equal(alone, test.images[7 * 3:8 * 3].numpy())


def test_glyph_render_workers_give_the_serial_pixels(glyph_cache):
    index = glyphs.load_index()
    classes = index.split_classes("val")[:10]
    cfg = glyphs.RenderConfig(images_per_class=3)
    serial = glyphs._render_split(classes, cfg, "val", workers=1)
    out = np.zeros_like(serial)
    seen = []
    assert glyphs._render_in_workers(classes, cfg, out, 2, seen.append)   # processes did start here
    assert np.array_equal(out, serial)
    assert sorted(seen)[-1] == len(classes)
    assert glyphs.render_workers(glyphs.PARALLEL_RENDER_MIN_IMAGES - 1) == 1


def test_glyph_render_workers_env_is_checked(monkeypatch):
    monkeypatch.setenv(glyphs.RENDER_WORKERS_ENV, "3")
    assert glyphs.render_workers(10) == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(glyphs.RENDER_WORKERS_ENV, bad)
        with pytest.raises(glyphs.GlyphsError, match=glyphs.RENDER_WORKERS_ENV):
            glyphs.render_workers(10)


def test_parallel_render_from_an_unguarded_script_does_not_hang(tmp_path):
    """Spawned render workers re-run the parent's main script; one that renders at import time
    (no ``__main__`` guard) must not wait on the lock its parent holds: the split is rendered
    in-process instead, with the same pixels."""
    import os
    import subprocess
    import sys
    script = tmp_path / "render.py"
    script.write_text("import sys\n"
                      "from free_dfml.common import glyphs\n"
                      "cfg = glyphs.RenderConfig(images_per_class=2)\n"
                      "path, _ = glyphs.ensure_split('val', cfg, cache_dir=sys.argv[1])\n"
                      "print(path)\n")
    env = {**os.environ, glyphs.RENDER_WORKERS_ENV: "2"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "__main__" in r.stderr            # the workers said why they could not help
    images, _ = glyphs.read_split(Path(r.stdout.strip().splitlines()[-1]))
    classes = glyphs.load_index(tmp_path / "cache").split_classes("val")
    cfg = glyphs.RenderConfig(images_per_class=2)
    for k in (0, len(classes) - 1):
        assert np.array_equal(images[2 * k:2 * k + 2].numpy(), glyphs.render_class(classes[k], cfg))


def test_glyph_images_shapes_and_types():
    for size, gray in ((32, False), (84, False), (32, True)):
        ds = open_dataset("glyphs", image_size=size, grayscale=gray, images_per_class=2)
        d = ds.split("val")
        c = 1 if gray else 3
        assert ds.image_shape == (c, size, size)
        assert d.images.dtype == torch.uint8 and d.labels.dtype == torch.int64
        assert d.images.shape == (2 * d.num_classes, c, size, size)
        assert d.labels.tolist() == [k for k in range(d.num_classes) for _ in range(2)]
        assert len(ds.mean) == len(ds.std) == c
        assert d.images.float().std() > 20      # not blank
        assert d.num_classes == glyphs.EXPECTED_COUNTS["val"]


def test_glyph_subset_and_split_data(glyph_cache):
    ds = open_dataset("glyphs", images_per_class=4)
    sub = ds.subset("test", [9, 2, 30])       # read from the file without loading the split
    assert "test" not in ds._splits
    assert sub.classes == [ds.classes("test")[i] for i in (9, 2, 30)]
    assert sub.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    full = ds.split("test")
    assert torch.equal(sub.images[:4], full.images[9 * 4:10 * 4])
    assert torch.equal(ds.subset("test", [9, 2, 30]).images, sub.images)   # via the loaded split
    idx = full.class_indices()
    assert len(idx) == full.num_classes and all(len(i) == 4 for i in idx)
    assert idx is full.class_indices()
    with pytest.raises(DataError):
        ds.subset("test", [10_000])
    with pytest.raises(DataError):
        ds.split("training")
    x = to_float(sub.images)
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_glyph_labels_are_readable():
    names = open_dataset("glyphs").classes("test")
    assert names[0].startswith("U+0531 ARMENIAN")
    assert all(("ARMENIAN" in n) or ("GEORGIAN" in n) for n in names)


# ------------------------------------------------------------------------------------------------
# folder
# ------------------------------------------------------------------------------------------------

def _make_tree(root: Path, n_classes: int = 10, per_class: int = 4, size: int = 20) -> list[str]:
    from PIL import Image
    names = [f"class_{i:02d}" for i in range(n_classes)]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True)
        for j in range(per_class):
            a = np.full((size, size + 6, 3), (i * 20, j * 40, 100), np.uint8)
            a[:2] = rng.integers(0, 255, (2, size + 6, 3))
            Image.fromarray(a).save(d / f"img_{j}.png")
    (root / "not_a_class.txt").write_text("ignored")
    return names


def test_folder_with_seeded_split(tmp_path):
    names = _make_tree(tmp_path / "tree")
    ds = open_dataset(str(tmp_path / "tree"), image_size=16, seed=3)
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    got = [c for s in splits.values() for c in s.classes]
    assert sorted(got) == names                                   # every class once
    assert [len(splits[s].classes) for s in ("train", "val", "test")] == [6, 2, 2]
    assert splits["train"].images.shape == (24, 3, 16, 16) and splits["train"].images.dtype == torch.uint8
    # colour survives: class_03 is red = 60
    k = splits["train"].classes.index("class_03") if "class_03" in splits["train"].classes else None
    if k is not None:
        assert int(splits["train"].images[splits["train"].labels == k][0, 0, 8, 8]) == 60
    same = open_dataset(f"folder:{tmp_path / 'tree'}", image_size=16, seed=3)
    assert same.split("test").classes == splits["test"].classes
    assert len(ds.mean) == 3 and all(0 < s for s in ds.std)
    gray = open_dataset(str(tmp_path / "tree"), image_size=16, grayscale=True, images_per_class=2)
    assert gray.split("val").images.shape == (4, 1, 16, 16)


def test_folder_with_split_json(tmp_path):
    names = _make_tree(tmp_path / "t")
    spec = {"train": names[:5], "val": names[5:7], "test": names[7:]}
    (tmp_path / "t" / "split.json").write_text(json.dumps(spec))
    ds = open_dataset(f"folder:{tmp_path / 't'}", image_size=12)
    assert ds.split("train").classes == names[:5]
    assert ds.split("test").classes == names[7:]
    assert ds.split("val").labels.tolist() == [0] * 4 + [1] * 4
    # a split file given explicitly wins over split.json
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"train": names[:2], "val": names[2:4], "test": names[4:6]}))
    ds2 = open_dataset(f"folder:{tmp_path / 't'}?split={other}", image_size=12)
    assert ds2.split("test").classes == names[4:6]
    # errors are DataErrors with a message
    (tmp_path / "t" / "split.json").write_text(json.dumps({"train": ["nope"], "val": names[:1], "test": names[1:2]}))
    with pytest.raises(DataError, match="nope"):
        open_dataset(f"folder:{tmp_path / 't'}")
    (tmp_path / "t" / "split.json").write_text(json.dumps({"train": names[:2], "val": names[1:3], "test": names[3:4]}))
    with pytest.raises(DataError, match="both"):
        open_dataset(f"folder:{tmp_path / 't'}")
    (tmp_path / "t" / "split.json").unlink()
    with pytest.raises(DataError, match="fewer than images_per_class"):
        open_dataset(str(tmp_path / "t"), images_per_class=5)


def test_bad_specs():
    for spec in ("", "imagenet", "folder:/definitely/not/here", "cifar-fs", "glyphs:extra"):
        with pytest.raises(DataError):
            open_dataset(spec)


# ------------------------------------------------------------------------------------------------
# CIFAR-FS
# ------------------------------------------------------------------------------------------------

CIFAR100_NAMES = sorted(c for s in CIFAR_FS_SPLIT.values() for c in s)   # fine labels are alphabetical


def _fake_cifar(root: Path, per_class_train: int = 3, per_class_test: int = 1) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)

    def batch(n_per: int, offset: int) -> dict:
        labels = [c for c in range(100) for _ in range(n_per)]
        data = np.zeros((len(labels), 3072), np.uint8)
        for i, c in enumerate(labels):
            data[i, :1024] = c                     # red = class index
            data[i, 1024:2048] = offset + i % n_per  # green = image number
        return {b"batch_label": b"fake", b"fine_labels": labels, b"coarse_labels": [0] * len(labels),
                b"data": data, b"filenames": [b"x.png"] * len(labels)}

    meta = {b"fine_label_names": [n.encode() for n in CIFAR100_NAMES], b"coarse_label_names": [b"x"] * 20}
    for name, obj in (("meta", meta), ("train", batch(per_class_train, 0)), ("test", batch(per_class_test, 100))):
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    return d


def test_cifar_fs_split_is_the_standard_one():
    assert [len(CIFAR_FS_SPLIT[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert len(set(CIFAR100_NAMES)) == 100


def test_cifar_fs_missing_path_explains(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset(f"cifar-fs:{tmp_path / 'nowhere'}")
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg and "https://" in msg and "\n" not in msg
    with pytest.raises(DataError, match="cifar-100-python"):
        open_dataset(f"cifar-fs:{tmp_path}")      # exists, but holds no CIFAR-100


def test_cifar_fs_from_fake_archive(tmp_path):
    d = _fake_cifar(tmp_path)
    for spec in (f"cifar-fs:{d}", f"cifar-fs:{tmp_path}"):
        ds = open_dataset(spec)
        assert isinstance(ds, FewShotDataset) and ds.name == "cifar-fs"
        tr, va, te = ds.split("train"), ds.split("val"), ds.split("test")
        assert (tr.num_classes, va.num_classes, te.num_classes) == (64, 16, 20)
        assert tr.classes == list(CIFAR_FS_SPLIT["train"]) and te.classes[0] == "baby"
        assert tr.images.shape == (64 * 4, 3, 32, 32) and tr.images.dtype == torch.uint8
        for data in (tr, te):
            for k, name in enumerate(data.classes):
                reds = data.images[data.labels == k][:, 0, 0, 0]
                assert set(reds.tolist()) == {CIFAR100_NAMES.index(name)}
    # the .tar.gz works too, as do image_size / grayscale / images_per_class
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(d, arcname="cifar-100-python")
    ds = open_dataset(f"cifar-fs:{tmp_path / 'cifar-100-python.tar.gz'}", image_size=16, grayscale=True,
                      images_per_class=2)
    te = ds.split("test")
    assert te.images.shape == (40, 1, 16, 16)
    assert len(ds.mean) == 1


def test_cifar_fs_refuses_foreign_pickles(tmp_path):
    d = _fake_cifar(tmp_path)

    class Boom:
        def __reduce__(self):
            return (print, ("this must not run",))

    (d / "train").write_bytes(pickle.dumps({b"data": Boom()}, protocol=2))
    with pytest.raises(DataError, match="refusing global"):
        open_dataset(f"cifar-fs:{d}").split("train")


def test_split_data_helpers():
    sd = SplitData(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.tensor([1, 0, 1, 2, 0]), ["a", "b", "c"])
    assert sd.num_classes == 3
    assert [i.tolist() for i in sd.class_indices()] == [[1, 4], [0, 2], [3]]
    with pytest.raises(TypeError):
        to_float(torch.zeros(2))


def test_all_classes_and_a_split_file_with_empty_parts(tmp_path):
    """``select("all")`` is every class (a folder: every class folder, listed or not); a split file
    may leave splits empty or out, and using an empty split is a one-line DataError."""
    from PIL import Image

    from free_dfml.common.datasets import SPLITS
    names = [f"c{i}" for i in range(6)]
    for i, n in enumerate(names):
        d = tmp_path / "f" / n
        d.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((10, 10, 3), 20 * i + j, dtype=np.uint8)).save(d / f"{j}.png")
    (tmp_path / "f" / "split.json").write_text(json.dumps({"test": names[:4]}))
    ds = open_dataset(str(tmp_path / "f"), image_size=8)
    assert ds.split("test").classes == names[:4] and ds.class_folders == names
    every = ds.select("all")
    assert every.classes == names and len(every) == 18 and every.labels.tolist() == [k for k in range(6) for _ in range(3)]
    with pytest.raises(DataError, match="split 'train' is empty"):
        ds.split("train")
    with pytest.raises(DataError, match="split 'train' is empty"):
        ds.mean
    (tmp_path / "f" / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    with pytest.raises(DataError, match="at least one"):
        open_dataset(str(tmp_path / "f"))

    class Three(FewShotDataset):                        # the base class: the three splits in order
        def _load(self, name):
            k = SPLITS.index(name) + 1
            return SplitData(torch.full((2 * k, 1, 4, 4), k, dtype=torch.uint8),
                             torch.arange(k).repeat_interleave(2), [f"{name}{i}" for i in range(k)])
    allc = Three().select("all")
    assert allc.classes == ["train0", "val0", "val1", "test0", "test1", "test2"]
    assert allc.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and allc.images[-1, 0, 0, 0] == 3
