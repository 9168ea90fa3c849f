"""The public prior: features pretrained on random-stroke images, for DP clients.

DP-SGD on a few hundred private images has too little signal for a whole network: the noise that
hides each image drowns the gradient of tens of thousands of weights. A client can start instead
from features learned on *public* images, which cost no privacy, and spend its privacy budget only
on the last layer. Here the public images come from a random process, not from any real data set
(in the spirit of DP-RandP, Tang et al., NeurIPS 2023, which learns priors from random-process
images): each synthetic class is a fixed random shape of 2-4 polylines, each image that shape under
a random rotation, scale, shift, stroke width and point jitter, in a contrasting colour on a smooth
random colour field, with 0-2 random distractor strokes and light pixel noise. No font, photograph
or client image is involved, so every client can render and pretrain the same prior.

The prior suits stroke-like data (characters, symbols, sketches); its benefit on natural images is
not measured.

Pretraining is deterministic for the architecture, its width, the input shape and the client's
normalisation, and is cached under ``$FREE_DFML_CACHE`` (default ``~/.cache/free-dfml``) in
``prior/<key>.safetensors`` (the features only; a lock makes concurrent clients pretrain once).
It takes about two minutes for a Conv4 of width 32 on one CPU core.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PRIOR_VERSION = 1
PRIORS = ("none", "strokes")


@dataclass(frozen=True)
class StrokePrior:
    classes: int = 128             # synthetic classes
    images_per_class: int = 100
    epochs: int = 8                # Adam, lr 3e-3, batch 64
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0                  # the same for every client: the prior is public


DEFAULT_PRIOR = StrokePrior()


def render_strokes(prior: StrokePrior, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [classes * images_per_class, channels, size, size] and their synthetic labels."""
    from PIL import Image, ImageDraw

    from free_dfml.common.glyphs import LUMA, pick_contrasting, smooth_field

    rng = np.random.default_rng([prior.seed, PRIOR_VERSION])
    ss = 2 if size < 64 else 1                 # supersampling
    W, n = ss * size, prior.images_per_class
    out = np.zeros((prior.classes * n, channels, size, size), np.uint8)
    for c in range(prior.classes):
        shape = []
        for _ in range(rng.integers(2, 5)):    # 2-4 polylines of 2-4 points, within +-0.45
            pts = [rng.uniform(-0.4, 0.4, 2)]
            for _ in range(rng.integers(1, 4)):
                a = rng.uniform(0, 2 * np.pi)
                pts.append(np.clip(pts[-1] + rng.uniform(0.15, 0.45) * np.array([np.cos(a), np.sin(a)]), -0.45, 0.45))
            shape.append(np.array(pts))
        rot = np.deg2rad(rng.uniform(-25, 25, n))
        scale = rng.uniform(0.5, 0.85, n)
        shift = rng.uniform(-0.15, 0.15, (n, 2))
        width = rng.uniform(1.0, 3.0, n) * size / 32
        bg = (torch.from_numpy(rng.uniform(0, 1, (n, 3, 1, 1))).float()
              + 0.22 * smooth_field(torch.from_numpy(rng.normal(0, 1, (n, 3, 3, 3))).float(), W)
              + 0.10 * smooth_field(torch.from_numpy(rng.normal(0, 1, (n, 3, 6, 6))).float(), W)).clamp(0, 1)
        under = (bg.permute(0, 2, 3, 1) @ torch.from_numpy(LUMA)).mean((1, 2)).numpy()
        fg = pick_contrasting(rng.uniform(0, 1, (n, 16, 3)), under, 0.3)
        other = pick_contrasting(rng.uniform(0, 1, (n, 16, 3)), under, 0.3)
        alpha = np.zeros((n, 2, W, W), np.float32)
        for i in range(n):
            R = scale[i] * np.array([[np.cos(rot[i]), -np.sin(rot[i])], [np.sin(rot[i]), np.cos(rot[i])]])
            for k, lines in enumerate((shape, _distractors(rng))):
                im = Image.new("L", (W, W))
                draw = ImageDraw.Draw(im)
                for pts in lines:
                    q = ((pts + rng.normal(0, 0.04, pts.shape)) @ R.T + shift[i] + 0.5) if k == 0 else pts
                    draw.line([(float(x * W), float(y * W)) for x, y in q], fill=255,
                              width=max(1, int(round(width[i] * ss))), joint="curve")
                alpha[i, k] = np.asarray(im, np.float32) / 255
        a = torch.from_numpy(alpha)
        img = torch.lerp(bg, torch.from_numpy(fg).float()[:, :, None, None].expand_as(bg), a[:, :1])
        img = torch.lerp(img, torch.from_numpy(other).float()[:, :, None, None].expand_as(img), a[:, 1:])
        if ss > 1:
            img = F.avg_pool2d(img, ss)
        if channels == 1:
            img = torch.einsum("nchw,c->nhw", img, torch.from_numpy(LUMA))[:, None]
        elif channels != 3:
            raise ValueError(f"the stroke prior renders 1 or 3 channels, not {channels}")
        img = img + 0.03 * torch.from_numpy(rng.standard_normal((n, channels, size, size)).astype(np.float32))
        out[c * n:(c + 1) * n] = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return torch.from_numpy(out), torch.arange(prior.classes).repeat_interleave(n)


def _distractors(rng: np.random.Generator) -> list[np.ndarray]:
    """0-2 short random strokes anywhere in the image (unit coordinates)."""
    lines = []
    for _ in range(rng.integers(0, 3)):
        p0 = rng.uniform(0.1, 0.9, 2)
        a = rng.uniform(0, 2 * np.pi)
        lines.append(np.stack([p0, p0 + rng.uniform(0.12, 0.3) * np.array([np.cos(a), np.sin(a)])]))
    return lines


def prior_key(arch: str, arch_kwargs: dict, input_shape: Sequence[int], mean: Sequence[float],
              std: Sequence[float], prior: StrokePrior) -> str:
    blob = json.dumps({"version": PRIOR_VERSION, "arch": arch, "arch_kwargs": arch_kwargs,
                       "input_shape": list(input_shape), "mean": [round(float(m), 6) for m in mean],
                       "std": [round(float(s), 6) for s in std], **asdict(prior)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def pretrain(arch: str, arch_kwargs: dict, input_shape: Sequence[int], mean: Sequence[float],
             std: Sequence[float], prior: StrokePrior = DEFAULT_PRIOR,
             on_epoch: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Train ``arch`` on the stroke classes; return its features' state dict (no head)."""
    from free_dfml.common.models import Normalized, build_model
    c, h, _ = input_shape
    x, y = render_strokes(prior, c, h)
    xf = x.float() / 255
    gen = torch.Generator().manual_seed(prior.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(prior.seed)
        model = Normalized(build_model(arch, num_classes=prior.classes, in_channels=c, image_size=h,
                                       **arch_kwargs), mean, std)
        opt = torch.optim.Adam(model.parameters(), lr=prior.lr)
        for epoch in range(prior.epochs):
            model.train()
            total = 0.0
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), prior.batch_size):
                b = order[i:i + prior.batch_size]
                loss = F.cross_entropy(model(xf[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            if on_epoch is not None:
                on_epoch(epoch, total / len(y))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not _is_head(k)}


def _is_head(key: str) -> bool:
    return ".head." in f".{key}"


def prior_features(arch: str, arch_kwargs: dict, input_shape: Sequence[int], mean: Sequence[float],
                   std: Sequence[float], prior: StrokePrior | None = None, cache_dir: str | None = None,
                   on_epoch: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """The pretrained features for this architecture and input (``prior`` default: ``DEFAULT_PRIOR``),
    from the cache or pretrained now."""
    from safetensors.torch import load_file, save

    from free_dfml.common.files import atomic_write_bytes
    from free_dfml.common.glyphs import cache_root

    prior = prior or DEFAULT_PRIOR
    path = cache_root(cache_dir) / "prior" / f"{prior_key(arch, arch_kwargs, input_shape, mean, std, prior)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            try:
                return load_file(str(path))
            except Exception:           # a damaged cache file is rebuilt
                pass
        sd = pretrain(arch, arch_kwargs, input_shape, mean, std, prior, on_epoch)
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in sd.items()}))
        return sd


def load_prior(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> None:
    """Copy the prior's features into ``model`` (a ``Normalized`` classifier); its head stays fresh."""
    result = model.load_state_dict(features, strict=False)
    bad = [k for k in result.missing_keys if not _is_head(k)] + list(result.unexpected_keys)
    if bad:
        raise ValueError(f"the prior does not fit this model: {bad[0]}")


class _locked:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            import fcntl
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        except ImportError:             # pragma: no cover - non-POSIX: the atomic write keeps files whole
            pass
        return self

    def __exit__(self, *exc):
        self.fh.close()                 # closing releases the lock
        return False


__all__ = ["DEFAULT_PRIOR", "PRIORS", "PRIOR_VERSION", "StrokePrior", "load_prior", "pretrain", "prior_features", "render_strokes"]
