"""Harmful client models on tiny settings: the generators of benchmarks/harmful.py (one module for
the tests and the trust benchmark), at the sizes of the tests' fixtures (Conv4 width 8, a few epochs
on the synthetic data set of tests/fake_data.py)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.harmful import GENERATORS, HARMFUL_TYPES, make  # noqa: E402

# harmful types the data-free screen catches (docs/security.md says why the others are not)
SCREENED = ("random", "constant", "lying_norm", "noise")


def tiny(kind: str, dataset, classes, seed: int = 0, **kw):
    """A tiny model of type ``kind`` (``base=PKG``: the honest model an edited type starts from). The
    noise-trained one trains longer: its BatchNorm statistics need that many steps to settle on the
    noise (a short run keeps most of their initial values)."""
    epochs = 15 if kind == "noise" else 4
    return make(kind, dataset, list(classes), width=8, epochs=epochs, seed=seed, **kw)


__all__ = ["GENERATORS", "HARMFUL_TYPES", "SCREENED", "make", "tiny"]
