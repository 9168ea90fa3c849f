"""Caps on what a client publishes: one place for the package reader (common/package.py), the
wire protocol (common/wire.py) and the ingest service. No heavy imports, so either side loads it for free.

The caps a server applies are configurable (``free-server start``'s ``max-*`` settings, server/settings.py):
:class:`Limits` holds one set, the constants below are its defaults, and :func:`applied` makes a set
the one the package reader checks against (:func:`active`) in the current thread or task. The
reader and the metadata checks read :func:`active`, so the callers in between need no parameter.

Every default is sized from what the toolkit itself produces (docs/model-package.md, "Validation"):
the largest architecture we ship, ResNet-18 at width 64, stores 11.7 M values even with 1000
classes, at any side (global pooling); Conv4-64 at 84 px stores 1.7 M.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

# --- sizes
MAX_PARAMETERS = 16_000_000             # stored values (weights + BatchNorm statistics) in a package
# one image's forward pass through a teacher, in multiply-accumulates: the trainer runs every sampled
# teacher on each generated batch, so this bounds what one client can make a trainer step cost.
# 4 G admits every shipped architecture at width 64 up to 84 px (ResNet-18: 0.56 G at 32 px, 3.9 G
# at 84; Conv4-64 at 84 px: 0.1 G) and refuses e.g. ResNet-18-64 at 128 px (8.9 G).
MAX_FORWARD_MACS = 4_000_000_000
# 16 M float32 values are 64 MB: a package can never need more than 64 MiB (plus its metadata)
MAX_PACKAGE_BYTES = 64 * 1024 * 1024    # default cap on a package (file or wire payload)
MAX_HEADER_BYTES = 1024 * 1024          # the safetensors header / wire metadata document
MAX_ARRAYS = 4096                       # tensors in one wire reply

# --- input shape: 32 px (CIFAR-FS, glyphs) and 84 px (miniImageNet) are the field's sides; 128
# leaves headroom. The trainer runs every teacher on generated images at its own side, and a
# teacher's cost grows with the square of its side.
MIN_SIDE, MAX_SIDE = 8, 128

# --- metadata
MAX_JSON_DEPTH = 16          # nesting of the metadata document (the schema itself needs at most 5)
MAX_TRAINING_BYTES = 16 * 1024  # the free-form `training` summary, serialised as compact JSON
MAX_TRAINING_DEPTH = 4       # nesting inside `training` (an object of numbers/strings/short lists)
MAX_LABEL_BYTES = 200        # one class label, UTF-8
MAX_KEY_BYTES = 64           # a key inside `training` or `dp`
MAX_DP_FIELDS = 32           # entries in the `dp` object

# --- numerics: images are in [0, 1]; a package's (x - mean) / std must stay a sane float32
MAX_ABS_MEAN = 1e3           # |mean| per channel
MIN_STD, MAX_STD = 1e-3, 1e3  # std per channel (float32), both inclusive
MAX_ABS_WEIGHT = 1e6         # any stored value; trained models stay orders of magnitude below
PROBE_SEED = 0               # the seeded random probe input (a zero image is the other probe)

# --- reasons
MAX_REASON_BYTES = 300       # a rejection reason, wherever it is stored, logged or sent


@dataclass(frozen=True)
class Limits:
    """The admission caps one server applies; each field is a server setting (``max-`` + its name
    with dashes, ``package_bytes`` is ``max-payload-bytes``) and :data:`RANGES` says what values
    it may take."""

    package_bytes: int = MAX_PACKAGE_BYTES     # a package file or wire payload
    input_side: int = MAX_SIDE                 # input_shape H = W
    parameters: int = MAX_PARAMETERS           # stored values
    forward_macs: int = MAX_FORWARD_MACS       # one image's forward pass (the trainer's cost per teacher)
    label_bytes: int = MAX_LABEL_BYTES         # one class label
    training_bytes: int = MAX_TRAINING_BYTES   # the free-form `training` field, serialised
    json_depth: int = MAX_JSON_DEPTH           # nesting of the metadata document
    reason_bytes: int = MAX_REASON_BYTES       # a rejection reason


# the values each cap may be set to (inclusive): the smallest still admit a well-formed package
# (one without a nested `training` field nests 2 deep), the largest are what the reader takes safely
RANGES: dict[str, tuple[int, int]] = {
    "package_bytes": (1024, 2 ** 32), "input_side": (28, 1024), "parameters": (1, 2 ** 31),
    "forward_macs": (1, 10 ** 13), "label_bytes": (1, 65536), "training_bytes": (2, MAX_HEADER_BYTES),
    "json_depth": (2, 64), "reason_bytes": (40, 4096),
}
SETTING: dict[str, str] = {f: "max-payload-bytes" if f == "package_bytes" else "max-" + f.replace("_", "-")
                           for f in RANGES}

DEFAULT_LIMITS = Limits()
# what a re-read of a package the server stored itself (the zoo) is checked against: it passed
# admission under the caps of its time, so only its format is checked again (the largest caps)
STORED_LIMITS = Limits(**{f: hi for f, (_, hi) in RANGES.items() if f != "reason_bytes"})
_ACTIVE: ContextVar[Limits] = ContextVar("free_dfml_limits", default=DEFAULT_LIMITS)


def active() -> Limits:
    """The caps the package reader applies here and now (:data:`DEFAULT_LIMITS` unless
    :func:`applied` says otherwise)."""
    return _ACTIVE.get()


@contextmanager
def applied(limits: Limits) -> Iterator[Limits]:
    """Check packages against ``limits`` inside the block (this thread or task only)."""
    token = _ACTIVE.set(limits)
    try:
        yield limits
    finally:
        _ACTIVE.reset(token)


def bounded_reason(text: object, limit: int | None = None) -> str:
    """``text`` as one printable line of at most ``limit`` UTF-8 bytes: control characters, ANSI
    escapes, NUL, newlines and other non-printable characters are shown as escapes (``\\x1b``,
    ``\\n``), and a longer text is cut with an ellipsis. Cheap on any size (looks at ``limit``
    characters at most)."""
    if limit is None:
        limit = active().reason_bytes
    s = str(text)
    cut = len(s) > limit
    out = []
    for ch in s[:limit]:
        out.append(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
    line = "".join(out)
    raw = line.encode("utf-8")
    if cut or len(raw) > limit:
        raw = raw[:limit - 3]
        line = raw.decode("utf-8", errors="ignore") + "..."
    return line
