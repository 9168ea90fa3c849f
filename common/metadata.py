"""Field checks of a model package's metadata document (the schema itself is
:func:`free_dfml.common.package.parse_meta`).

Each check takes a JSON-decoded value and returns ``None`` when it is acceptable, else the problem
in words (the caller raises it as a ``PackageError``, which bounds its length). Every walk is
iterative, so no input can exhaust the interpreter's stack, and every cap comes from
:mod:`free_dfml.common.limits` (the configurable ones from :func:`~free_dfml.common.limits.active`).
No torch import.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from free_dfml.common.limits import MAX_DP_FIELDS, MAX_KEY_BYTES, MAX_TRAINING_DEPTH, SETTING, active


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` is 1), counted up to ``limit + 1``."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list, tuple)) or isinstance(v, Mapping):
            d += 1
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((c, d) for c in (v.values() if isinstance(v, Mapping) else v))
    return deepest


def text_problem(s: Any, what: str, max_bytes: int) -> str | None:
    """A metadata string must be printable text (no control characters, ANSI escapes, NUL,
    newlines or invisible formatting characters) of at most ``max_bytes`` UTF-8 bytes."""
    if not isinstance(s, str):
        return f"metadata {what} must be a string, got {type(s).__name__}"
    if len(s) > max_bytes or len(s.encode("utf-8", errors="replace")) > max_bytes:
        return f"metadata {what} is longer than {max_bytes} bytes"
    if not s.isprintable():
        bad = next(c for c in s if not c.isprintable())
        return f"metadata {what} holds a non-printable character {bad!r} (printable text only)"
    return None


def check_labels(labels: Any, num_classes: int) -> str | None:
    if not isinstance(labels, list) or len(labels) != num_classes:
        return f"metadata class_labels must list {num_classes} strings"
    cap = active().label_bytes
    for i, label in enumerate(labels):
        problem = text_problem(label, f"class_labels[{i}]", cap)
        if problem:
            return problem + (f" ({SETTING['label_bytes']})" if "longer than" in problem else "")
    return None


def check_training(training: Any) -> str | None:
    """The free-form ``training`` summary: an object of JSON values (numbers, printable strings,
    booleans, null, lists and objects) at most ``MAX_TRAINING_DEPTH`` deep and
    ``active().training_bytes`` serialised."""
    cap = active().training_bytes
    name = SETTING["training_bytes"]
    if not isinstance(training, Mapping):
        return "metadata training must be an object"
    if json_depth(training, MAX_TRAINING_DEPTH) > MAX_TRAINING_DEPTH:
        return f"metadata training is nested deeper than {MAX_TRAINING_DEPTH} levels"
    stack: list[Any] = [training]
    while stack:
        v = stack.pop()
        if isinstance(v, Mapping):
            for k, c in v.items():
                problem = text_problem(k, "training key", MAX_KEY_BYTES)
                if problem:
                    return problem
                stack.append(c)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, str):
            if len(v) > cap:
                return f"metadata training is over {cap} bytes ({name})"
            problem = text_problem(v, "training value", cap)
            if problem:
                return problem
        elif v is not None and not isinstance(v, (bool, int, float)):
            return f"metadata training holds a {type(v).__name__}, not a JSON value"
    try:
        size = len(json.dumps(training, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError, OverflowError):
        return "metadata training is not JSON-serialisable"
    if size > cap:
        return f"metadata training is {size} bytes serialised, over the {cap}-byte limit ({name})"
    return None


def _finite(v: Any) -> bool:
    try:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:           # an int past float's range
        return False


def check_dp(dp: Any) -> str | None:
    """The client's own DP claim: ``epsilon`` > 0 and ``delta`` in (0, 1), every field a finite
    number (``noise_multiplier`` >= 0 and ``max_grad_norm`` > 0 when present)."""
    if not isinstance(dp, Mapping):
        return "metadata dp must be an object"
    if len(dp) > MAX_DP_FIELDS:
        return f"metadata dp has {len(dp)} fields, over the limit of {MAX_DP_FIELDS}"
    for key in ("epsilon", "delta"):
        if key not in dp:
            return f"metadata dp is missing {key!r}"
    for k, v in dp.items():
        problem = text_problem(k, "dp key", MAX_KEY_BYTES)
        if problem:
            return problem
        if not _finite(v):
            return f"metadata dp.{k} must be a finite number, got {v!r}"
    if not dp["epsilon"] > 0:
        return f"metadata dp.epsilon must be > 0, got {dp['epsilon']!r}"
    if not 0 < dp["delta"] < 1:
        return f"metadata dp.delta must be in (0, 1), got {dp['delta']!r}"
    if dp.get("noise_multiplier", 0) < 0:
        return f"metadata dp.noise_multiplier must be >= 0, got {dp['noise_multiplier']!r}"
    if "max_grad_norm" in dp and not dp["max_grad_norm"] > 0:
        return f"metadata dp.max_grad_norm must be > 0, got {dp['max_grad_norm']!r}"
    return None
