"""Model architectures, by name, rebuilt from metadata.

Every classifier in free-dfml is ``features -> head``: ``model.features`` maps an image batch to
a flat feature vector and ``model.head`` is one ``nn.Linear``. The few-shot code adapts all of the
parameters with :func:`torch.func.functional_call`, so no architecture needs special "fast
weight" layers.

Architectures are looked up in :data:`ARCHITECTURES` by name; :func:`build_model` turns a name
plus keyword arguments (as stored in a model package's metadata) back into the same module.
Inputs are images in ``[0, 1]``; a model package wraps its classifier in :class:`Normalized` so
that the model's own input normalisation travels with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

NORMS = ("bn", "gn")
MIN_SIDE = 28
MAX_WIDTH = 512


class ArchitectureError(ValueError):
    """An unknown architecture, or keyword arguments it does not take."""


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    # Same layer Opacus's ModuleValidator.fix puts in place of a BatchNorm2d, so a model fixed by
    # Opacus and a model built here with norm="gn" have identical state dicts.
    return nn.GroupNorm(min(32, channels), channels, affine=True)


def cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on CPU, where PyTorch's convolutions and max-pooling run faster in that layout
    (the adaptation episodes of evaluation and replay are conv-bound). Values are the same up to float
    rounding; GPU inputs are left as they are, and so are tensors inside ``torch.func.vmap`` (which
    cannot change memory format yet)."""
    if x.dim() == 4 and x.device.type == "cpu":
        try:
            return x.contiguous(memory_format=torch.channels_last)
        except RuntimeError:   # vmap: "NYI: querying is_contiguous inside of vmap"
            return x
    return x


class Conv4(nn.Module):
    """4 x [Conv3x3 -> norm -> ReLU -> MaxPool2], then a linear head (the standard few-shot Conv4)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 width: int = 64, norm: str = "bn"):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=False),
                       nn.MaxPool2d(2)]
            c = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_dim = width * side * side
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(cpu_layout(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, four stages, global average pool, linear head)."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int = 3,
                 image_size: int = 32, width: int = 64, norm: str = "bn"):
        super().__init__()
        del image_size  # global pooling makes the head independent of the input side
        stem_stride = 1
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1,
                                             bias=False), _norm(norm, width), nn.ReLU(inplace=False)]
        c = width
        for i, n in enumerate(blocks):
            cout = width * (2 ** i)
            for j in range(n):
                layers.append(BasicBlock(c, cout, 2 if (i > 0 and j == 0) else 1, norm))
                c = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = c
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(cpu_layout(x)))


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any]
    description: str


def _resnet(blocks: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return ResNet(blocks, **kw)
    return build


ARCHITECTURES: dict[str, Architecture] = {
    "conv4": Architecture("conv4", Conv4, {"width": 64, "norm": "bn"},
                          "4 x [Conv3x3 -> norm -> ReLU -> MaxPool2] + linear head"),
    "resnet10": Architecture("resnet10", _resnet((1, 1, 1, 1)), {"width": 64, "norm": "bn"},
                             "ResNet-10 (BasicBlock x [1,1,1,1]), 3x3 stem"),
    "resnet18": Architecture("resnet18", _resnet((2, 2, 2, 2)), {"width": 64, "norm": "bn"},
                             "ResNet-18 (BasicBlock x [2,2,2,2]), 3x3 stem"),
}


def check_arch_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validated architecture keyword arguments with defaults filled in."""
    if arch not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    spec = ARCHITECTURES[arch]
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise ArchitectureError(f"architecture {arch!r} takes no argument(s) {', '.join(unknown)}")
    out = {**spec.defaults, **kwargs}
    width = out["width"]
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= MAX_WIDTH:
        raise ArchitectureError(f"width must be an integer in 1..{MAX_WIDTH}, got {width!r}")
    if out["norm"] not in NORMS:
        raise ArchitectureError(f"norm must be one of {NORMS}, got {out['norm']!r}")
    return out


def build_model(arch: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32,
                **kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` for ``num_classes`` outputs on ``in_channels x image_size^2`` inputs."""
    kw = check_arch_kwargs(arch, kwargs)
    if image_size < MIN_SIDE:
        raise ArchitectureError(f"image side must be >= {MIN_SIDE}, got {image_size}")
    if in_channels not in (1, 3):
        raise ArchitectureError(f"in_channels must be 1 or 3, got {in_channels}")
    return ARCHITECTURES[arch].builder(num_classes=num_classes, in_channels=in_channels,
                                       image_size=image_size, **kw)


class Normalized(nn.Module):
    """A classifier that takes images in [0, 1] and applies its own per-channel normalisation."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def feature_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the feature extractor (everything but the head)."""
    return [k for k in model.state_dict() if k.startswith("features.")]


def is_head_key(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to the linear head, on a bare classifier
    (``head.weight``) or one wrapped in :class:`Normalized` (``model.head.weight``)."""
    return name.startswith("head.") or ".head." in name


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image's forward pass through ``model``'s convolutions and linear
    layers (the rest is negligible). Built on the meta device (``with torch.device("meta")``), the
    model is priced with no memory and no arithmetic, before anything is allocated for it."""
    total = 0

    def count(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
