"""The embedded default data set: characters rendered from the fonts that matplotlib ships.

Nothing is downloaded. A *class* is one Unicode code point; its images are renderings of that
character in the font files that draw it, each under a random affine transform, stroke
thickness, coloured smooth-noise background, foreground colour of a minimum contrast,
distractor strokes and light pixel noise. Classes are split by *script* (the first word of the
character's Unicode name) into disjoint meta-train / meta-val / meta-test scripts, so meta-test
characters come from alphabets never seen in meta-training (as in Omniglot).

Two things are cached under the cache folder (``cache_dir`` argument, else ``$FREE_DFML_CACHE``,
else ``~/.cache/free-dfml``), in ``glyphs/``:

* the class index (which code points, which fonts draw each, which split): a JSON file keyed by
  the index version, the font files and the FreeType version;
* one ``.safetensors`` file of uint8 images per split, keyed by every render parameter, the
  renderer version and the class index. Splits are rendered lazily, one at a time.

Rendering is deterministic for a seed: each class has its own random generator seeded from
``(seed, code point, RENDERER_VERSION)``, so a class renders the same whatever else is rendered,
and a large split renders in worker processes with the same bytes (``render_workers``).
See docs/data.md for the class definition, the script-to-split table and the calibration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

INDEX_VERSION = 1
RENDERER_VERSION = 1

SPLITS = ("train", "val", "test")

# --- class definition -------------------------------------------------------------------------
MIN_FONTS = 6                         # a code point is a class when at least this many font files draw it
CATEGORIES = ("L", "N", "S", "P")     # Unicode general categories kept: letters, numbers, symbols, punctuation
# Compatibility variants that are only a smaller / shifted / restyled copy of another character.
DROPPED_DECOMPOSITION_TAGS = ("<super>", "<sub>", "<small>", "<wide>", "<narrow>", "<vertical>", "<font>")
EXCLUDED_FONTS = ("LastResortHE-Regular.ttf",)   # its glyphs are placeholder boxes
# The Computer Modern files use TeX byte encodings in their cmap: a code point counts only where the
# glyph's PostScript name means that very character (Adobe Glyph List), e.g. "A" -> "A" but not
# cmr10's '"' -> "quotedblright" or cmsy10's "!" -> "arrowright".
LEGACY_ENCODED_PREFIX = "cm"
NEAR_DUPLICATE_COSINE = 0.98          # font-averaged 16x16 normalised glyphs this similar: same class
DESCRIPTOR_SIZE = 16
INDEX_RENDER_SIZE = 64                # pixels per em for the index renders
MIN_INK = 64                          # a render whose brightest pixel is below this is blank

# --- split by script (first word of the Unicode name); every other script is meta-train --------
VAL_SCRIPTS = ("CYRILLIC", "LAO")
TEST_SCRIPTS = ("ARMENIAN", "GEORGIAN")
# Class counts per split at INDEX_VERSION 1 (documented in docs/data.md; checked by the tests).
EXPECTED_COUNTS = {"train": 2364, "val": 161, "test": 192}

# --- rendering ----------------------------------------------------------------------------------
DEFAULT_IMAGES_PER_CLASS = 40
GLYPH_CANVAS = 64                     # normalised glyph mask size (longest side fitted, margin 2)
# Per-channel normalisation constants, measured on the meta-train split at the defaults.
MEAN_RGB = (0.5, 0.5, 0.5)
STD_RGB = (0.31, 0.31, 0.31)
MEAN_GRAY = (0.5,)
STD_GRAY = (0.21,)


class GlyphsError(ValueError):
    """Raised for problems with the embedded fonts or the cache (a DataError subclass in datasets.py)."""


# ================================================================================================
# cache location and locking
# ================================================================================================

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FREE_DFML_CACHE``, else ``~/.cache/free-dfml``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FREE_DFML_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "free-dfml"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that concurrent processes build a cache file once."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GlyphsError(f"cannot create the glyph cache folder {path.parent} ({e.strerror or e}); "
                          "point FREE_DFML_CACHE or cache_dir at a writable folder") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking, atomic renames still keep files whole
        yield
        return
    try:
        fh = open(path, "a+")
    except OSError as e:
        raise GlyphsError(f"cannot open the glyph cache lock {path} ({e.strerror or e}); "
                          "point FREE_DFML_CACHE or cache_dir at a writable folder") from None
    with fh:
        if _in_spawn_bootstrap():
            # a render worker re-running its parent's main script while the parent holds this lock
            # to render: waiting would wait for ever. The worker exits with one line instead, and the
            # parent renders the split in-process
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SystemExit("free-dfml: a glyph render worker re-ran a script that opens the glyphs "
                                 "at import time; put that code under `if __name__ == \"__main__\":` to "
                                 "render in parallel") from None
        else:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Render on one intra-op thread: the tensors are small, and on a busy machine torch's thread
    pool makes rendering many times slower; it also keeps the float reductions in one order."""
    import torch
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`free_dfml.common.files.atomic_write_bytes`, its failures as a ``GlyphsError``."""
    from free_dfml.common.files import atomic_write_bytes
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise GlyphsError(f"cannot write the glyph cache file {path} ({e.strerror or e}); "
                          "point FREE_DFML_CACHE or cache_dir at a writable folder") from None


# ================================================================================================
# fonts
# ================================================================================================

def font_dir() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_files() -> list[str]:
    """The TrueType file names used (sorted), LastResortHE left out."""
    d = font_dir()
    if not d.is_dir():
        raise GlyphsError(f"matplotlib's font folder is missing: {d}")
    files = sorted(p.name for p in d.glob("*.ttf") if p.name not in EXCLUDED_FONTS)
    if not files:
        raise GlyphsError(f"no .ttf files in matplotlib's font folder {d}")
    return files


class FontBank:
    """Pillow font objects, opened once per (file, pixel size)."""

    def __init__(self) -> None:
        self._fonts: dict[tuple[str, int], object] = {}
        self._dir = font_dir()

    def font(self, name: str, size: int):
        key = (name, size)
        f = self._fonts.get(key)
        if f is None:
            from PIL import ImageFont
            f = ImageFont.truetype(str(self._dir / name), size, layout_engine=ImageFont.Layout.BASIC)
            self._fonts[key] = f
        return f

    def render(self, name: str, ch: str, size: int) -> np.ndarray | None:
        """The character's glyph as a uint8 array cropped to its ink, or None when nothing is drawn."""
        from PIL import Image, ImageDraw
        font = self.font(name, size)
        x0, y0, x1, y1 = font.getbbox(ch)
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            return None
        im = Image.new("L", (w + 2, h + 2))
        ImageDraw.Draw(im).text((1 - x0, 1 - y0), ch, font=font, fill=255)
        a = np.asarray(im)
        rows = np.flatnonzero(a.max(1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(a.max(0))
        return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    def canvas(self, name: str, ch: str, size: int = GLYPH_CANVAS, margin: int = 2) -> np.ndarray:
        """The glyph centred in a ``size`` x ``size`` float32 mask in [0, 1], longest side fitted."""
        a = self.render(name, ch, INDEX_RENDER_SIZE)
        if a is None:
            raise GlyphsError(f"{name} draws nothing for U+{ord(ch):04X}")
        inner = size - 2 * margin
        if max(a.shape) < inner // 2:
            # small glyph: render it larger rather than blow up a small bitmap
            big = int(round(INDEX_RENDER_SIZE * inner / max(a.shape)))
            a2 = self.render(name, ch, min(big, 1024))
            if a2 is not None:
                a = a2
        return _fit(a, size, margin)


def _fit(a: np.ndarray, size: int, margin: int) -> np.ndarray:
    from PIL import Image
    h, w = a.shape
    inner = size - 2 * margin
    s = inner / max(h, w)
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    im = Image.fromarray(a).resize((nw, nh), Image.Resampling.LANCZOS if s < 1 else Image.Resampling.BILINEAR)
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(im, np.float32) / 255.0
    return out


# ================================================================================================
# class index
# ================================================================================================

@dataclass(frozen=True)
class GlyphClass:
    codepoint: int
    name: str                 # Unicode character name
    script: str               # first word of the name
    split: str
    fonts: tuple[str, ...]    # font files that draw it

    @property
    def char(self) -> str:
        return chr(self.codepoint)

    @property
    def label(self) -> str:
        """Human-readable class name, e.g. ``'U+10D0 GEORGIAN LETTER AN'``."""
        return f"U+{self.codepoint:04X} {self.name}"


@dataclass
class GlyphIndex:
    classes: list[GlyphClass]     # all classes, by code point
    stats: dict
    key: str

    def split_classes(self, split: str) -> list[GlyphClass]:
        return [c for c in self.classes if c.split == split]

    def counts(self) -> dict[str, int]:
        return {s: len(self.split_classes(s)) for s in SPLITS}

    def script_table(self) -> dict[str, dict[str, int]]:
        """split -> script -> number of classes."""
        out: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        for c in self.classes:
            out[c.split][c.script] = out[c.split].get(c.script, 0) + 1
        return out


def script_of(cp: int) -> str:
    return unicodedata.name(chr(cp), "UNNAMED").split()[0]


def split_of_script(script: str) -> str:
    if script in TEST_SCRIPTS:
        return "test"
    if script in VAL_SCRIPTS:
        return "val"
    return "train"


def _mentions_held_out(name: str) -> bool:
    words = set(name.split()[1:])
    return any(s in words for s in VAL_SCRIPTS + TEST_SCRIPTS)


def _candidate(cp: int) -> bool:
    ch = chr(cp)
    if unicodedata.category(ch)[0] not in CATEGORIES:
        return False
    if not unicodedata.name(ch, ""):
        return False
    dec = unicodedata.decomposition(ch)
    return not (dec.startswith("<") and dec.split()[0] in DROPPED_DECOMPOSITION_TAGS)


def _index_key() -> str:
    from PIL import features
    d = font_dir()
    fonts = [(n, (d / n).stat().st_size) for n in font_files()]
    blob = json.dumps({"v": INDEX_VERSION, "fonts": fonts, "freetype": features.version("freetype2"),
                       "min_fonts": MIN_FONTS, "val": VAL_SCRIPTS, "test": TEST_SCRIPTS,
                       "near": NEAR_DUPLICATE_COSINE}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def build_index() -> GlyphIndex:
    """Compute the class index from the fonts (a few seconds; use :func:`load_index` for the cached one)."""
    import warnings
    from fontTools import agl
    from fontTools.ttLib import TTFont

    d = font_dir()
    files = font_files()
    coverage: dict[int, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging
        logging.getLogger("fontTools").setLevel(logging.ERROR)
        for f in files:
            tt = TTFont(str(d / f), lazy=True)
            cmap = tt.getBestCmap() or {}
            legacy = f.startswith(LEGACY_ENCODED_PREFIX)
            for cp, gname in cmap.items():
                if gname == ".notdef" or not _candidate(cp):
                    continue
                if legacy and agl.toUnicode(gname) != chr(cp):
                    continue
                coverage.setdefault(cp, []).append(f)
            tt.close()
    stats = {"cmap_candidates": sum(1 for v in coverage.values() if len(v) >= MIN_FONTS)}

    bank = FontBank()
    notdef: dict[str, bytes | None] = {}
    for f in files:   # what each font draws for a code point it lacks: its .notdef box
        a = bank.render(f, "\U000E0FFF", INDEX_RENDER_SIZE)
        notdef[f] = None if a is None else hashlib.sha1(a.tobytes() + str(a.shape).encode()).digest()

    kept: dict[int, list[str]] = {}
    descriptors: dict[int, np.ndarray] = {}
    by_render: dict[tuple[str, bytes], list[int]] = {}
    n_blank = 0
    for cp in sorted(coverage):
        if len(coverage[cp]) < MIN_FONTS:
            continue
        ch = chr(cp)
        good, desc = [], []
        for f in coverage[cp]:
            a = bank.render(f, ch, INDEX_RENDER_SIZE)
            if a is None or a.max() < MIN_INK:
                n_blank += 1
                continue
            h = hashlib.sha1(a.tobytes() + str(a.shape).encode()).digest()
            if h == notdef[f]:
                n_blank += 1
                continue
            good.append(f)
            by_render.setdefault((f, h), []).append(cp)
            desc.append(_fit(a, DESCRIPTOR_SIZE, 1))
        if len(good) >= MIN_FONTS:
            kept[cp] = good
            descriptors[cp] = np.mean(desc, axis=0, dtype=np.float64).ravel()
    stats["drawn_by_min_fonts"] = len(kept)
    stats["blank_or_notdef_renders"] = n_blank

    # identical renders in some font: keep the lowest code point
    exact_dup: set[int] = set()
    for cps in by_render.values():
        cps = sorted(c for c in cps if c in kept)
        exact_dup.update(cps[1:])
    stats["identical_render_duplicates"] = len(exact_dup)
    order = [cp for cp in sorted(kept) if cp not in exact_dup]

    # near-identical glyphs (cosine of font-averaged normalised 16x16 masks): keep the lowest code point
    D = np.stack([descriptors[cp] for cp in order])
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    keep_mask = np.zeros(len(order), bool)
    for i in range(len(order)):
        if i and (D[:i][keep_mask[:i]] @ D[i] > NEAR_DUPLICATE_COSINE).any():
            continue
        keep_mask[i] = True
    stats["near_duplicates"] = int((~keep_mask).sum())

    classes: list[GlyphClass] = []
    n_leak = 0
    for cp, keep in zip(order, keep_mask):
        if not keep:
            continue
        name = unicodedata.name(chr(cp))
        script = script_of(cp)
        if script not in VAL_SCRIPTS + TEST_SCRIPTS and _mentions_held_out(name):
            n_leak += 1     # e.g. a symbol named after a held-out script: keep it out of meta-train
            continue
        classes.append(GlyphClass(cp, name, script, split_of_script(script), tuple(kept[cp])))
    stats["dropped_mentioning_held_out_script"] = n_leak
    stats["classes"] = len(classes)
    return GlyphIndex(classes, stats, _index_key())


def _index_to_json(index: GlyphIndex) -> str:
    fonts = sorted({f for c in index.classes for f in c.fonts})
    fid = {f: i for i, f in enumerate(fonts)}
    return json.dumps({
        "index_version": INDEX_VERSION, "key": index.key, "stats": index.stats, "fonts": fonts,
        "classes": [[c.codepoint, c.split, [fid[f] for f in c.fonts]] for c in index.classes],
    }, separators=(",", ":"))


def _index_from_json(text: str) -> GlyphIndex:
    d = json.loads(text)
    fonts = d["fonts"]
    classes = []
    for cp, split, fids in d["classes"]:
        classes.append(GlyphClass(cp, unicodedata.name(chr(cp)), script_of(cp), split,
                                  tuple(fonts[i] for i in fids)))
    return GlyphIndex(classes, d["stats"], d["key"])


_INDEX_MEMO: dict[str, GlyphIndex] = {}


def load_index(cache_dir: str | os.PathLike | None = None) -> GlyphIndex:
    """The class index, from the cache when there (built and cached otherwise)."""
    key = _index_key()
    if key in _INDEX_MEMO:
        return _INDEX_MEMO[key]
    path = cache_root(cache_dir) / "glyphs" / f"index-v{INDEX_VERSION}-{key}.json"
    index = None
    with _file_lock(path.parent / ".lock"):
        if path.is_file():
            try:
                index = _index_from_json(path.read_text())
            except (ValueError, KeyError, IndexError, TypeError):
                index = None   # damaged: rebuild
        if index is None:
            index = build_index()
            _atomic_write_bytes(path, _index_to_json(index).encode())
    _INDEX_MEMO[key] = index
    return index


# ================================================================================================
# rendering
# ================================================================================================

@dataclass(frozen=True)
class RenderConfig:
    """Every parameter that changes the pixels (all of them are part of the cache key)."""
    image_size: int = 32
    grayscale: bool = False
    seed: int = 0
    images_per_class: int = DEFAULT_IMAGES_PER_CLASS
    max_rotation_deg: float = 25.0
    max_shear: float = 0.3                 # shear factor (tan of the shear angle), uniform in +-
    scale: tuple[float, float] = (0.45, 0.8)  # glyph's longest side / image side
    max_shift: float = 0.8                 # centre offset, as a share of the room left by the scale
    thickness: tuple[int, ...] = (-1, 0, 0, 1, 2)   # dilation (+) / erosion (-) steps on the 64 px mask
    background_amplitude: tuple[float, float] = (0.22, 0.10)  # coarse (3x3) and fine (6x6) noise
    min_contrast: float = 0.3              # |luma(fg) - luma(background under the glyph)|
    max_distractors: int = 3               # 0..max distractor strokes per image (uniform)
    stroke_length: tuple[float, float] = (0.12, 0.3)  # each of a stroke's two segments, share of the side
    stroke_width: tuple[float, float] = (1.0, 2.0)    # pixels at 32 px (scaled with the image size)
    distractor_same_colour: float = 0.5    # share of images whose strokes use the glyph's colour
    pixel_noise: float = 0.03              # std of Gaussian pixel noise, in [0, 1] units

    def key(self, index_key: str) -> str:
        blob = json.dumps({"renderer": RENDERER_VERSION, "index": index_key, **dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3


LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def render_class(gc: GlyphClass, cfg: RenderConfig, bank: FontBank | None = None) -> np.ndarray:
    """``cfg.images_per_class`` images of one class: uint8 [n, C, S, S], deterministic for cfg.seed."""
    with _one_torch_thread():
        return _render_class(gc, cfg, bank)


def _render_class(gc: GlyphClass, cfg: RenderConfig, bank: FontBank | None) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    bank = bank or FontBank()
    rng = np.random.default_rng([cfg.seed, gc.codepoint, RENDERER_VERSION])
    n, S = cfg.images_per_class, cfg.image_size
    ss = 2 if S < 64 else 1               # supersampling factor
    W = S * ss

    # --- all random parameters first, in a fixed order ---------------------------------------
    font_pick = rng.integers(len(gc.fonts), size=n)
    thick = rng.choice(np.array(cfg.thickness), size=n)
    rot = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, size=n))
    shear = rng.uniform(-cfg.max_shear, cfg.max_shear, size=n)
    scale = rng.uniform(cfg.scale[0], cfg.scale[1], size=n)
    aspect = np.exp(rng.uniform(-0.1, 0.1, size=n))
    shift = rng.uniform(-1.0, 1.0, size=(n, 2)) * cfg.max_shift * (1.0 - scale)[:, None]
    base = rng.uniform(0.0, 1.0, size=(n, 3, 1, 1))
    coarse = rng.normal(0.0, 1.0, size=(n, 3, 3, 3))
    fine = rng.normal(0.0, 1.0, size=(n, 3, 6, 6))
    fg_cand = rng.uniform(0.0, 1.0, size=(n, 16, 3))
    n_strokes = rng.integers(0, cfg.max_distractors + 1, size=n)
    K = max(cfg.max_distractors, 1)
    stroke_start = rng.uniform(0.1, 0.9, size=(n, K, 2))
    stroke_angle = rng.uniform(0.0, 2 * np.pi, size=(n, K))
    stroke_turn = rng.uniform(-1.2, 1.2, size=(n, K))
    stroke_len = rng.uniform(cfg.stroke_length[0], cfg.stroke_length[1], size=(n, K, 2))
    stroke_w = rng.uniform(cfg.stroke_width[0], cfg.stroke_width[1], size=(n, K))
    same_colour = rng.uniform(size=n) < cfg.distractor_same_colour
    stroke_cand = rng.uniform(0.0, 1.0, size=(n, 16, 3))
    noise = rng.standard_normal(size=(n, cfg.channels, S, S), dtype=np.float32)

    # --- glyph masks, thickness ----------------------------------------------------------------
    uniq = sorted(set(font_pick.tolist()))
    base_m = torch.from_numpy(np.stack([bank.canvas(gc.fonts[i], gc.char) for i in uniq]))[:, None]  # u,1,G,G
    dil1 = F.max_pool2d(base_m, 3, 1, 1)
    dil2 = F.max_pool2d(dil1, 3, 1, 1)
    ero = -F.max_pool2d(-base_m, 3, 1, 1)
    ero = torch.where((ero.sum((1, 2, 3)) >= 0.45 * base_m.sum((1, 2, 3)))[:, None, None, None], ero, base_m)
    variants = torch.stack([ero, base_m, dil1, dil2], 1)                                  # u,4,1,G,G
    pos = {f: j for j, f in enumerate(uniq)}
    t = torch.from_numpy(thick)
    sel = torch.where(t == -1, 0, torch.where(t == 1, 2, torch.where(t == 2, 3, 1)))
    m = variants[torch.tensor([pos[f] for f in font_pick.tolist()]), sel]                 # n,1,G,G

    # --- affine: output coords -> glyph-canvas coords (affine_grid takes the inverse map) -------
    c, s_ = np.cos(rot), np.sin(rot)
    # forward map (canvas -> image): scale with a little aspect change, then shear, then rotation
    R = np.stack([np.stack([c, -s_], -1), np.stack([s_, c], -1)], 1)
    Sh = np.zeros((n, 2, 2)); Sh[:, 0, 0] = 1; Sh[:, 1, 1] = 1; Sh[:, 0, 1] = shear
    Sc = np.zeros((n, 2, 2)); Sc[:, 0, 0] = scale * aspect; Sc[:, 1, 1] = scale / aspect
    A = R @ Sh @ Sc
    Ainv = np.linalg.inv(A)
    theta = np.concatenate([Ainv, -(Ainv @ shift[:, :, None])], 2)
    grid = F.affine_grid(torch.from_numpy(theta).float(), [n, 1, W, W], align_corners=False)
    alpha = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # n,1,W,W

    # --- background: base colour + smooth coloured noise ----------------------------------------
    bg = (torch.from_numpy(base).float()
          + cfg.background_amplitude[0] * smooth_field(torch.from_numpy(coarse).float(), W)
          + cfg.background_amplitude[1] * smooth_field(torch.from_numpy(fine).float(), W)).clamp(0, 1)

    # --- foreground colour with a minimum luma contrast to the background under the glyph -------
    luma = torch.from_numpy(LUMA)
    bg_luma = torch.einsum("nchw,c->nhw", bg, luma)
    wsum = alpha[:, 0].sum((1, 2))
    under = torch.where(wsum > 1e-3, (bg_luma * alpha[:, 0]).sum((1, 2)) / wsum.clamp_min(1e-3),
                        bg_luma.mean((1, 2))).numpy()
    fg = pick_contrasting(fg_cand, under, cfg.min_contrast)                     # n,3

    # --- distractor strokes: two-segment polylines -------------------------------------------------
    st = np.zeros((n, W, W), np.float32)
    for i in range(n):
        if n_strokes[i] == 0:
            continue
        im = Image.new("L", (W, W))
        dr = ImageDraw.Draw(im)
        for k in range(n_strokes[i]):
            p0 = stroke_start[i, k]
            a1, a2 = stroke_angle[i, k], stroke_angle[i, k] + stroke_turn[i, k]
            p1 = p0 + stroke_len[i, k, 0] * np.array([np.cos(a1), np.sin(a1)])
            p2 = p1 + stroke_len[i, k, 1] * np.array([np.cos(a2), np.sin(a2)])
            pts = [(float(x * W), float(y * W)) for x, y in (p0, p1, p2)]
            dr.line(pts, fill=255, width=max(1, int(round(stroke_w[i, k] * ss * S / 32))), joint="curve")
        st[i] = np.asarray(im, np.float32) / 255.0
    stroke_alpha = torch.from_numpy(st)[:, None]
    stroke_col = np.where(same_colour[:, None], fg,
                          pick_contrasting(stroke_cand, under, cfg.min_contrast))

    # --- composite, downsample, noise, quantise ---------------------------------------------------
    fg_t = torch.from_numpy(fg).float()[:, :, None, None]
    sc_t = torch.from_numpy(stroke_col).float()[:, :, None, None]
    img = torch.lerp(bg, fg_t.expand_as(bg), alpha)
    img = torch.lerp(img, sc_t.expand_as(img), stroke_alpha)
    if ss > 1:
        img = F.avg_pool2d(img, ss)
    if cfg.grayscale:
        img = torch.einsum("nchw,c->nhw", img, luma)[:, None]
    img = img + cfg.pixel_noise * torch.from_numpy(noise)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


_SMOOTH_MATS: dict[tuple[int, int], object] = {}


def smooth_field(x, size: int):
    """Bicubic upsampling of [n, c, k, k] to size x size, as two small matrix products (fast)."""
    import torch
    import torch.nn.functional as F
    k = x.shape[-1]
    U = _SMOOTH_MATS.get((k, size))
    if U is None:
        eye = torch.eye(k)[:, None, :, None]                                        # k,1,k,1
        U = F.interpolate(eye.expand(k, 1, k, 1).contiguous() * torch.ones(1, 1, 1, 1),
                          size=(size, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T.contiguous()
        _SMOOTH_MATS[(k, size)] = U                                                  # size,k
    return torch.einsum("hi,ncij,wj->nchw", U, x, U)


def pick_contrasting(cand: np.ndarray, under: np.ndarray, min_contrast: float) -> np.ndarray:
    """First candidate colour per image whose luma differs enough from ``under``; else the most distant."""
    lum = cand @ LUMA.astype(np.float64)                                         # n,k
    diff = np.abs(lum - under[:, None])
    ok = diff >= min_contrast
    first = np.where(ok.any(1), ok.argmax(1), diff.argmax(1))
    return cand[np.arange(len(cand)), first]


# ================================================================================================
# split files
# ================================================================================================

def split_path(split: str, cfg: RenderConfig, index: GlyphIndex, cache_dir=None) -> Path:
    return (cache_root(cache_dir) / "glyphs"
            / f"{split}-{cfg.image_size}px-{'gray' if cfg.grayscale else 'rgb'}-{cfg.key(index.key)}.safetensors")


# A split of at least this many images renders in worker processes (each class has its own seeded
# generator and renders on one thread, so the pixels are the same whatever the number of workers).
PARALLEL_RENDER_MIN_IMAGES = 20_000
RENDER_WORKERS_ENV = "FREE_DFML_RENDER_WORKERS"
MAX_RENDER_WORKERS = 8


def render_workers(images: int) -> int:
    """Worker processes for rendering ``images`` images: ``$FREE_DFML_RENDER_WORKERS`` when set
    (1: in this process), else the usable cores up to 8 for a split of 20 000 images or more."""
    env = os.environ.get(RENDER_WORKERS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise GlyphsError(f"{RENDER_WORKERS_ENV} must be a whole number >= 1, got {env!r}")
        return n
    if images < PARALLEL_RENDER_MIN_IMAGES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_RENDER_WORKERS, cores))


def _render_chunk(classes: Sequence[GlyphClass], cfg: RenderConfig) -> np.ndarray:
    """One worker task: consecutive classes rendered one after the other (uint8 [k * n, C, S, S])."""
    bank = FontBank()
    with _one_torch_thread():
        return np.concatenate([_render_class(gc, cfg, bank) for gc in classes])


def _render_split(classes: Sequence[GlyphClass], cfg: RenderConfig, desc: str,
                  workers: int | None = None) -> np.ndarray:
    n, C, S = cfg.images_per_class, cfg.channels, cfg.image_size
    out = np.empty((len(classes) * n, C, S, S), np.uint8)
    workers = render_workers(len(classes) * n) if workers is None else workers
    t0 = time.monotonic()
    announced = False
    bar = None

    def progress(done: int) -> None:
        nonlocal announced, bar
        if not announced and time.monotonic() - t0 > 2.0:
            announced = True
            how = f", {workers} processes" if workers > 1 else ""
            print(f"free-dfml: rendering the glyphs {desc} split once "
                  f"({len(classes)} classes x {n} images, {S}px{how}); it is cached afterwards",
                  file=sys.stderr, flush=True)
            bar = _progress_bar(desc, len(classes), done)
        if bar is not None:
            bar[0].update(bar[1], completed=done)

    try:
        if not (workers > 1 and _render_in_workers(classes, cfg, out, workers, progress)):
            bank = FontBank()
            with _one_torch_thread():
                for k, gc in enumerate(classes):
                    out[k * n:(k + 1) * n] = _render_class(gc, cfg, bank)
                    progress(k + 1)
    finally:
        if bar is not None:
            bar[0].stop()
    if announced:
        print(f"free-dfml: glyphs {desc} split rendered in {time.monotonic() - t0:.1f}s",
              file=sys.stderr, flush=True)
    return out


def _render_in_workers(classes: Sequence[GlyphClass], cfg: RenderConfig, out: np.ndarray, workers: int,
                       progress) -> bool:
    """Fill ``out`` from ``workers`` spawned processes; False (nothing promised about ``out``) when
    processes cannot be started here, e.g. inside a daemonic worker: the caller renders in-process."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    n = cfg.images_per_class
    per_task = max(1, min(32, -(-len(classes) // (4 * workers))))
    starts = list(range(0, len(classes), per_task))
    try:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    except (OSError, ValueError, AssertionError):
        return False
    try:
        futures = {pool.submit(_render_chunk, list(classes[a:a + per_task]), cfg): a for a in starts}
        done = 0
        for f in as_completed(futures):
            a = futures[f]
            block = f.result()
            out[a * n:a * n + len(block)] = block
            done += len(block) // n
            progress(done)
    except (BrokenProcessPool, AssertionError, OSError):
        return False
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return True


def _in_spawn_bootstrap() -> bool:
    """True while a spawned process re-runs its parent's main script (multiprocessing sets
    ``_inheriting`` for that phase): a script that renders at import time, without an
    ``if __name__ == "__main__":`` guard, does so again in each render worker."""
    import multiprocessing
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _progress_bar(desc: str, total: int, done: int):
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # pragma: no cover
        return None
    p = Progress(TextColumn(f"glyphs {desc}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 transient=True, console=Console(stderr=True))
    p.start()
    task = p.add_task(desc, total=total, completed=done)
    return p, task


def ensure_split(split: str, cfg: RenderConfig, cache_dir=None) -> tuple[Path, list[GlyphClass]]:
    """Render the split into its cache file unless it is already there; return (file, classes)."""
    if split not in SPLITS:
        raise GlyphsError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    index = load_index(cache_dir)
    classes = index.split_classes(split)
    path = split_path(split, cfg, index, cache_dir)
    if path.is_file():
        return path, classes
    with _file_lock(path.parent / ".lock"):
        if not path.is_file():
            import torch
            from safetensors.torch import save
            images = _render_split(classes, cfg, split)
            labels = np.repeat(np.arange(len(classes), dtype=np.int64), cfg.images_per_class)
            meta = {"format": "free-dfml glyphs", "renderer_version": str(RENDERER_VERSION),
                    "split": split, "config": json.dumps(dataclasses.asdict(cfg)),
                    "codepoints": json.dumps([c.codepoint for c in classes])}
            blob = save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, metadata=meta)
            _atomic_write_bytes(path, blob)
    return path, classes


def read_split(path: Path, class_ids: Sequence[int] | None = None, images_per_class: int | None = None):
    """(images, labels) tensors from a split file; only the rows of ``class_ids`` when given."""
    import torch
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        if class_ids is None:
            return f.get_tensor("images"), f.get_tensor("labels")
        n = images_per_class
        sl = f.get_slice("images")
        shape = sl.get_shape()
        parts = [sl[c * n:(c + 1) * n] for c in class_ids]
    images = torch.cat(parts) if parts else torch.empty((0, *shape[1:]), dtype=torch.uint8)
    labels = torch.arange(len(class_ids), dtype=torch.int64).repeat_interleave(n)
    return images, labels
