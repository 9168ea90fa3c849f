"""The model package: the one format a client publishes.

A package is a single ``.safetensors`` file: float32 tensors (the classifier's state dict, BatchNorm
running statistics included, ``num_batches_tracked`` left out) and, in the safetensors header's
``__metadata__`` under the key ``free_dfml``, a JSON document (see :class:`ModelMeta` and
``docs/model-package.md``). Nothing is ever unpickled: safetensors is a plain header + raw bytes.

:func:`load_package` / :func:`package_from_tensors` validate everything and raise
:class:`PackageError`, whose one-line message names the exact problem. The configurable caps (size,
input side, values, compute, label and ``training`` bytes, JSON depth) are those of
:func:`free_dfml.common.limits.active`; a message about one names its server setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from free_dfml.common.files import atomic_write_bytes
from free_dfml.common.limits import (MAX_ABS_MEAN, MAX_ABS_WEIGHT, MAX_HEADER_BYTES, MAX_PACKAGE_BYTES,  # noqa: F401
                                     MAX_STD, MIN_SIDE, MIN_STD, PROBE_SEED, SETTING, active, bounded_reason)
from free_dfml.common.metadata import check_dp, check_labels, check_training, json_depth
from free_dfml.common.models import (ArchitectureError, Normalized, build_model, check_arch_kwargs,
                                     forward_macs)

FORMAT = "free-dfml/model-package"
FORMAT_VERSION = 1
META_KEY = "free_dfml"
MIN_CLASSES, MAX_CLASSES = 2, 1000
# the metadata schema of format_version 1: any other top-level key is rejected
META_KEYS = frozenset({"format", "format_version", "arch", "arch_kwargs", "num_classes", "input_shape",
                       "mean", "std", "class_labels", "training", "dp"})


class PackageError(ValueError):
    """A model package that cannot be accepted; the message says exactly why, on one printable line
    of at most the active reason cap (``limits.active().reason_bytes``, default 300) bytes."""

    def __init__(self, message: object = "") -> None:
        super().__init__(bounded_reason(message))


@dataclass
class ModelMeta:
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]                 # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    class_labels: list[str] | None = None
    training: dict[str, Any] = field(default_factory=dict)   # free-form summary (accuracy, epochs...)
    dp: dict[str, float] | None = None   # epsilon, delta, noise_multiplier, max_grad_norm
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        d["input_shape"] = list(self.input_shape)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def is_dp(self) -> bool:
        return self.dp is not None


@dataclass
class ModelPackage:
    meta: ModelMeta
    state: dict[str, torch.Tensor]

    @property
    def model_id(self) -> str:
        return canonical_id(self.state)

    def build(self, device: torch.device | str = "cpu") -> Normalized:
        """The classifier, with its normalisation, in eval mode, on ``device``."""
        net = _skeleton(self.meta)
        net.load_state_dict(self.state, strict=False)
        model = Normalized(net, self.meta.mean, self.meta.std).to(device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def to_bytes(self) -> bytes:
        return st_save(self.state, metadata={META_KEY: self.meta.to_json()})


def _skeleton(meta: ModelMeta) -> nn.Module:
    c, h, _ = meta.input_shape
    return build_model(meta.arch, num_classes=meta.num_classes, in_channels=c, image_size=h,
                       **meta.arch_kwargs)


def expected_shapes(meta: ModelMeta) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a package with this metadata must hold."""
    with torch.device("meta"):
        net = _skeleton(meta)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def state_for_package(model: nn.Module) -> dict[str, torch.Tensor]:
    """A classifier's state dict as a package stores it (float32, contiguous, CPU)."""
    if isinstance(model, Normalized):
        model = model.model
    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def canonical_id(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, raw bytes) of the weights: the model's id."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------- validation

def _num(v: Any, what: str) -> float:
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:           # an int past float's range
        ok = False
    if not ok:
        raise PackageError(f"metadata {what} must be a finite number, got {v!r}")
    return float(v)


def _int(v: Any, what: str, lo: int, hi: int, setting: str = "") -> int:
    """``setting``: the server setting that sets ``hi`` (named in the reason)."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise PackageError(f"metadata {what} must be an integer in {lo}..{hi}, got {v!r}"
                           + (f" ({setting} {hi})" if setting else ""))
    return v


def _f32(v: float) -> float:
    """``v`` as float32 stores it (inf past float32's range, 0.0 below its smallest subnormal)."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _normalisation(vals: Any, name: str, c: int) -> tuple[float, ...]:
    """Mean or std: ``c`` finite numbers that stay finite (std: positive) in float32, in range."""
    if not isinstance(vals, (list, tuple)) or len(vals) != c:
        raise PackageError(f"metadata {name} must list {c} value(s), got {vals!r}")
    out = tuple(_num(v, name) for v in vals)
    for v in out:
        f = _f32(v)
        if name == "mean" and not (math.isfinite(f) and abs(f) <= MAX_ABS_MEAN):
            raise PackageError(f"metadata mean {v!r} is outside -{MAX_ABS_MEAN:g}..{MAX_ABS_MEAN:g} "
                               f"(images are in [0, 1]; float32 holds it as {f!r})")
        if name == "std" and not f > 0:
            raise PackageError(f"metadata std must be positive in float32, got {v!r} "
                               f"(float32 holds it as {f!r})")
        if name == "std" and not MIN_STD <= f <= MAX_STD:
            raise PackageError(f"metadata std {v!r} is outside {MIN_STD:g}..{MAX_STD:g} "
                               "(the normalised image would not be a sane float32)")
    return out


def _too_deep(what: str) -> PackageError:
    return PackageError(f"{what} is nested deeper than {active().json_depth} levels ({SETTING['json_depth']})")


def parse_json(text: str | bytes, what: str = "free-dfml metadata") -> Any:
    """``json.loads`` whose every failure (bad bytes, bad JSON, nesting past the interpreter's
    stack or past the JSON depth cap) is a :class:`PackageError`."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise _too_deep(what) from None
    except (TypeError, ValueError):      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PackageError(f"{what} is not valid JSON") from None
    if json_depth(doc, active().json_depth) > active().json_depth:
        raise _too_deep(what)
    return doc


def parse_meta(doc: Mapping[str, Any]) -> ModelMeta:
    """Validate a metadata document (already JSON-decoded) into a :class:`ModelMeta`."""
    if not isinstance(doc, Mapping):
        raise PackageError("metadata must be a JSON object")
    limits = active()
    if json_depth(doc, limits.json_depth) > limits.json_depth:
        raise _too_deep("metadata")
    if "format" not in doc:
        raise PackageError(f"metadata has no 'format' key (expected {FORMAT!r})")
    if doc["format"] != FORMAT:
        raise PackageError(f"metadata format {doc['format']!r} is not {FORMAT!r}")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise PackageError(f"unsupported format_version {version!r} (this build reads {FORMAT_VERSION})")
    unknown = sorted(str(k) for k in doc if k not in META_KEYS)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise PackageError(f"metadata has unknown key(s) {', '.join(repr(k[:40]) for k in unknown[:3])}"
                           f"{more} (format_version {FORMAT_VERSION} has: {', '.join(sorted(META_KEYS))})")
    for key in ("arch", "num_classes", "input_shape", "mean", "std"):
        if key not in doc:
            raise PackageError(f"metadata is missing {key!r}")
    arch = doc["arch"]
    if not isinstance(arch, str):
        raise PackageError(f"metadata arch must be a string, got {arch!r}")
    arch_kwargs = doc.get("arch_kwargs") or {}
    if not isinstance(arch_kwargs, Mapping):
        raise PackageError("metadata arch_kwargs must be an object")
    try:
        arch_kwargs = check_arch_kwargs(arch, dict(arch_kwargs))
    except ArchitectureError as e:
        raise PackageError(str(e)) from None
    num_classes = _int(doc["num_classes"], "num_classes", MIN_CLASSES, MAX_CLASSES)
    shape = doc["input_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise PackageError(f"metadata input_shape must be [C, H, W], got {shape!r}")
    c = _int(shape[0], "input_shape C", 1, 3)
    if c == 2:
        raise PackageError("metadata input_shape C must be 1 or 3, got 2")
    h = _int(shape[1], "input_shape H", MIN_SIDE, limits.input_side, SETTING["input_side"])
    w = _int(shape[2], "input_shape W", MIN_SIDE, limits.input_side, SETTING["input_side"])
    if h != w:
        raise PackageError(f"metadata input_shape must be square, got {h}x{w}")
    if h < 28:
        raise PackageError(f"architecture {arch} needs an image side >= 28, got {h}")
    mean, std = _normalisation(doc["mean"], "mean", c), _normalisation(doc["std"], "std", c)
    labels = doc.get("class_labels")
    if labels is not None and (problem := check_labels(labels, num_classes)):
        raise PackageError(problem)
    training = doc.get("training") or {}
    if problem := check_training(training):
        raise PackageError(problem)
    dp = doc.get("dp")
    if dp is not None:
        if problem := check_dp(dp):
            raise PackageError(problem)
        dp = {str(k): float(v) for k, v in dp.items()}
        if arch_kwargs.get("norm") == "bn":
            raise PackageError("a DP-trained model must use norm 'gn' (BatchNorm is not DP-compatible)")
    meta = ModelMeta(arch=arch, num_classes=num_classes, input_shape=(c, h, w), mean=mean, std=std,
                     arch_kwargs=arch_kwargs, class_labels=labels, training=dict(training),
                     dp=dp, format_version=FORMAT_VERSION)
    with torch.device("meta"):
        net = _skeleton(meta)
    what = f"{arch} {arch_kwargs} with {num_classes} classes at {h} px"
    values = sum(v.numel() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked"))
    if values > limits.parameters:
        raise PackageError(f"{what} stores {values} values, over the limit of {limits.parameters} "
                           f"({SETTING['parameters']})")
    macs = forward_macs(net, meta.input_shape)
    if macs > limits.forward_macs:
        raise PackageError(f"{what} costs {macs / 1e9:.2f} G multiply-accumulates an image, over the "
                           f"limit of {limits.forward_macs / 1e9:g} G ({SETTING['forward_macs']})")
    return meta


def package_from_tensors(state: Mapping[str, torch.Tensor], meta_doc: Mapping[str, Any] | ModelMeta
                         ) -> ModelPackage:
    """Validate weights + metadata from any source (a file, the wire) into a package."""
    meta = meta_doc if isinstance(meta_doc, ModelMeta) else parse_meta(meta_doc)
    expected = expected_shapes(meta)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PackageError(f"missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                if len(missing) > 1 else ""))
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PackageError(f"unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more"
                                                                 if len(extra) > 1 else ""))
    clean: dict[str, torch.Tensor] = {}
    for k in sorted(expected):
        t = state[k]
        if not isinstance(t, torch.Tensor):
            raise PackageError(f"tensor {k!r} is not a tensor")
        if t.dtype != torch.float32:
            raise PackageError(f"tensor {k!r} has dtype {str(t.dtype).replace('torch.', '')}, "
                               "expected float32")
        if tuple(t.shape) != expected[k]:
            raise PackageError(f"tensor {k!r} has shape {list(t.shape)}, expected {list(expected[k])}")
        peak = float(t.abs().amax()) if t.numel() else 0.0     # NaN or inf if any value is
        if not math.isfinite(peak):
            raise PackageError(f"tensor {k!r} holds non-finite values (NaN or Inf)")
        if peak > MAX_ABS_WEIGHT:
            raise PackageError(f"tensor {k!r} holds a value of magnitude {peak:.3g}, over the "
                               f"limit of {MAX_ABS_WEIGHT:g}")
        if k.endswith("running_var") and (t < 0).any():
            raise PackageError(f"tensor {k!r} holds negative variances")
        clean[k] = t.contiguous()
    _probe(meta, clean)
    return ModelPackage(meta=meta, state=clean)


def _probe(meta: ModelMeta, state: dict[str, torch.Tensor]) -> None:
    """The model's own output on two probe images (all zeros, and seeded uniform noise) at its
    declared shape, in eval mode, must be finite: weights and normalisation that overflow float32
    together are caught here, before any trainer step sees them. Uses its own generator (the
    global random state is left as it was) and the package's tensors in place (no copy)."""
    with torch.device("meta"):
        net = _skeleton(meta)
    net.load_state_dict(state, strict=False, assign=True)
    for mod in net.modules():               # num_batches_tracked: unused in eval mode
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                mod.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype))
    model = Normalized(net, meta.mean, meta.std).float().eval()     # float32 as stored, whatever the default dtype
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.cat([torch.zeros(1, *meta.input_shape), torch.rand(1, *meta.input_shape, generator=g)]).float()
    with torch.no_grad():
        out = model(x)
    if tuple(out.shape) != (2, meta.num_classes):
        raise PackageError(f"the model's output on a probe input has shape {list(out.shape)}, "
                           f"expected [2, {meta.num_classes}]")
    if not torch.isfinite(out).all():
        raise PackageError("the model's output on a probe input is not finite (NaN or Inf): its "
                           "weights and normalisation overflow float32")


def _header_meta(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise PackageError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise PackageError("not a safetensors file (bad header length; truncated or corrupt)")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):      # bad bytes or JSON, or nested past the stack
        raise PackageError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise PackageError("not a safetensors file (header is not an object)")
    meta = header.get("__metadata__") or {}
    meta = meta.get(META_KEY) if isinstance(meta, dict) else None
    if meta is None:
        raise PackageError(f"safetensors file has no free-dfml metadata (key {META_KEY!r})")
    if not isinstance(meta, str):
        raise PackageError("free-dfml metadata is not valid JSON")
    return parse_json(meta)


def _over_size(size: int, max_bytes: int) -> PackageError:
    return PackageError(f"package is {size} bytes, over the {max_bytes}-byte limit ({SETTING['package_bytes']})")


def package_from_bytes(data: bytes, *, max_bytes: int | None = None) -> ModelPackage:
    """A package from a file's bytes, checked against ``max_bytes`` (default: the active cap)."""
    max_bytes = active().package_bytes if max_bytes is None else max_bytes
    if len(data) > max_bytes:
        raise _over_size(len(data), max_bytes)
    doc = _header_meta(data)
    meta = parse_meta(doc)
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PackageError(f"corrupt safetensors data: {str(e).splitlines()[0]}") from None
    return package_from_tensors(state, meta)


def load_package(path: str | os.PathLike, *, max_bytes: int | None = None) -> ModelPackage:
    """Read and validate a package file. Raises :class:`PackageError` (never anything else for bad input)."""
    p = Path(path)
    if not p.exists():
        raise PackageError(f"no such file: {p}")
    if not p.is_file():
        raise PackageError(f"not a file: {p}")
    size = p.stat().st_size
    max_bytes = active().package_bytes if max_bytes is None else max_bytes
    if size > max_bytes:
        raise _over_size(size, max_bytes)
    return package_from_bytes(p.read_bytes(), max_bytes=max_bytes)


def save_package(pkg: ModelPackage, path: str | os.PathLike) -> str:
    """Validate and atomically write a package; returns its model id."""
    checked = package_from_tensors(pkg.state, pkg.meta)
    atomic_write_bytes(path, checked.to_bytes())
    return checked.model_id


def make_package(model: nn.Module, *, arch: str, arch_kwargs: dict[str, Any], num_classes: int,
                 input_shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
                 class_labels: list[str] | None = None, training: dict[str, Any] | None = None,
                 dp: dict[str, float] | None = None) -> ModelPackage:
    meta = ModelMeta(arch=arch, arch_kwargs=check_arch_kwargs(arch, dict(arch_kwargs)),
                     num_classes=num_classes, input_shape=tuple(input_shape),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                     class_labels=class_labels, training=dict(training or {}), dp=dp)
    meta = parse_meta(json.loads(meta.to_json()))   # same checks as a received package
    return package_from_tensors(state_for_package(model), meta)
