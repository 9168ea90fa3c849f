"""Hostile model packages: one generator per package-borne probe of the hardening issue.

Each generator returns a :class:`Hostile`: the weights and the metadata document a hostile client
would send (no check applied), and a regex the rejection reason must match (it names the
problem). :func:`as_content` turns one into a wire reply's content exactly as a ClientApp that
skips its own checks would send it, so the same case runs through ``package_from_tensors`` and
through ``common.wire.content_to_package``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from free_dfml.common import wire
from free_dfml.common.models import build_model
from free_dfml.common.package import make_package


@dataclass
class Hostile:
    state: dict[str, torch.Tensor]
    doc: Any                      # the metadata document (a dict, or a raw JSON string)
    match: str                    # regex the rejection reason must match


def valid(arch: str = "conv4", width: int = 8, side: int = 32, classes: int = 5, norm: str = "bn"
          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An honest package's weights and metadata (random init, seeded), as plain containers."""
    torch.manual_seed(0)
    net = build_model(arch, num_classes=classes, image_size=side, width=width, norm=norm)
    pkg = make_package(net, arch=arch, arch_kwargs={"width": width, "norm": norm}, num_classes=classes,
                       input_shape=(3, side, side), mean=(0.5,) * 3, std=(0.25,) * 3,
                       class_labels=[f"class {i}" for i in range(classes)],
                       training={"epochs": 1, "dataset": "glyphs"})
    return dict(pkg.state), json.loads(pkg.meta.to_json())


def _with(match: str, **meta: Any) -> Hostile:
    state, doc = valid()
    doc.update(meta)
    return Hostile(state, doc, match)


def tiny_std() -> Hostile:
    """std 1e-300: positive in float64, 0 in float32."""
    return _with(r"std must be positive in float32", std=[1e-300, 0.25, 0.25])


def huge_mean() -> Hostile:
    """mean 1e300: finite in float64, inf in float32."""
    return _with(r"mean 1e\+300 is outside", mean=[0.5, 1e300, 0.5])


def overflowing_weights() -> Hostile:
    """every weight 3e38: finite float32 values that overflow in the first layer."""
    state, doc = valid()
    return Hostile({k: torch.full_like(v, 3e38) for k, v in state.items()}, doc,
                   r"magnitude 3e\+38, over the limit")


def overflowing_output() -> Hostile:
    """weights within the cap whose product still overflows: only the probe forward catches it."""
    state, doc = valid()
    state = {k: (torch.full_like(v, 9e5) if k.endswith("weight") and "running" not in k else v)
             for k, v in state.items()}
    return Hostile(state, doc, r"output on a probe input is not finite")


def negative_epsilon() -> Hostile:
    state, doc = valid(norm="gn")
    doc["dp"] = {"epsilon": -3.0, "delta": 1e-5}
    return Hostile(state, doc, r"dp\.epsilon must be > 0")


def delta_out_of_range() -> Hostile:
    state, doc = valid(norm="gn")
    doc["dp"] = {"epsilon": 3.0, "delta": 5.0}
    return Hostile(state, doc, r"dp\.delta must be in \(0, 1\)")


def large_input() -> Hostile:
    """a 512x512-input model (Conv4 width 8: its weights stay small; the side is the problem)."""
    state, doc = valid()
    doc["input_shape"] = [3, 512, 512]
    return Hostile(state, doc, r"input_shape H must be an integer in 8\.\.128")


def oversized_resnet() -> Hostile:
    """a ResNet-18 at width 160 (about 71 M values, 285 MB): the metadata alone is refused, so
    the generator sends no weights at all (the parameter cap is checked before any tensor)."""
    state, doc = valid()
    doc.update(arch="resnet18", arch_kwargs={"width": 160, "norm": "bn"})
    return Hostile(state, doc, r"resnet18 .* values, over the limit of 16000000")


def costly_forward() -> Hostile:
    """Conv4 at width 512 and 128 px: 7.6 M values (under the parameter cap) but 12.9 G
    multiply-accumulates an image; refused from its metadata, before any tensor is read."""
    state, doc = valid()
    doc.update(arch_kwargs={"width": 512, "norm": "bn"}, input_shape=[3, 128, 128])
    return Hostile(state, doc, r"costs 12\.91 G multiply-accumulates an image, over the limit of 4 G")


def control_labels() -> Hostile:
    return _with(r"class_labels\[1\] holds a non-printable character",
                 class_labels=["ok", "\x1b[31mred\x1b[0m", "nul\x00", "bell\x07", "line\nbreak"])


def bidi_label() -> Hostile:
    """an invisible right-to-left override: printable-looking, still refused."""
    return _with(r"non-printable character", class_labels=["a", "b", "c", "d", "txt.\u202eexe"])


def big_training() -> Hostile:
    """a 900 kB free-form ``training`` field."""
    return _with(r"training is over 16384 bytes|training is \d+ bytes serialised, over the 16384-byte",
                 training={"notes": "x" * 900_000})


def many_training_entries() -> Hostile:
    return _with(r"training is \d+ bytes serialised, over the 16384-byte limit",
                 training={f"k{i}": i for i in range(5000)})


def deep_training() -> Hostile:
    deep: Any = 1
    for _ in range(10):
        deep = {"d": deep}
    return _with(r"training is nested deeper than 4 levels", training=deep)


def unknown_keys() -> Hostile:
    return _with(r"unknown key\(s\) 'backdoor', 'extra'", extra=1, backdoor={"x": 1})


def no_format() -> Hostile:
    state, doc = valid()
    del doc["format"]
    return Hostile(state, doc, r"no 'format' key")


def deep_json() -> Hostile:
    """metadata nested about 1000 deep (a RecursionError in a plain json.loads)."""
    state, _ = valid()
    return Hostile(state, "[" * 1000 + "]" * 1000, r"nested deeper than 16 levels")


def moderately_deep_json() -> Hostile:
    """nested 100 deep: parses, still past the depth cap."""
    state, doc = valid()
    text = json.dumps(doc)[:-1] + ', "training": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}"
    return Hostile(state, text, r"nested deeper than 16 levels")


PACKAGE_CASES: dict[str, Callable[[], Hostile]] = {f.__name__: f for f in (
    tiny_std, huge_mean, overflowing_weights, overflowing_output, negative_epsilon, delta_out_of_range,
    large_input, oversized_resnet, costly_forward, control_labels, bidi_label, big_training,
    many_training_entries, deep_training, unknown_keys, no_format, deep_json, moderately_deep_json)}

def huge_reason(n: int = 10_000_000) -> str:
    """A client's error reason of ``n`` characters: ANSI escapes, NUL, newlines and text."""
    chunk = "\x1b[2J\x00line\nbreak\r" + "A" * 50
    return (chunk * (n // len(chunk) + 1))[:n]


def as_content(h: Hostile) -> RecordDict:
    """The reply content a ClientApp without checks would send for ``h``."""
    arrays = ArrayRecord()
    for k, v in sorted(h.state.items()):
        arrays[k] = Array(np.ascontiguousarray(v.detach().cpu().numpy()))
    doc = h.doc if isinstance(h.doc, str) else json.dumps(h.doc)
    return RecordDict({wire.MODEL_KEY: arrays, wire.META_KEY: ConfigRecord({wire.PACKAGE_FIELD: doc})})
