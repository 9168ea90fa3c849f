"""Caps on what a client publishes: one place for the package reader (common/package.py), the
wire protocol (common/wire.py) and the ingest service. No imports, so either side loads it for free.

Every default is sized from what the toolkit itself produces (docs/model-package.md, "Validation"):
the largest architecture we ship, ResNet-18 at width 64, stores 11.7 M values even with 1000
classes, at any side (global pooling); Conv4-64 at 84 px stores 1.7 M.
"""

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


def bounded_reason(text: object, limit: int = MAX_REASON_BYTES) -> str:
    """``text`` as one printable line of at most ``limit`` UTF-8 bytes: control characters, ANSI
    escapes, NUL, newlines and other non-printable characters are shown as escapes (``\\x1b``,
    ``\\n``), and a longer text is cut with an ellipsis. Cheap on any size (looks at ``limit``
    characters at most)."""
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
