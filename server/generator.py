"""The FREE / PURER generator: a latent vector z in R^nz -> an image in [0, 1]^(C x H x W).

Linear(nz -> 2*ngf*(H/4)^2) -> reshape -> BN -> Up x2 -> Conv3x3(2ngf->2ngf) -> BN -> LeakyReLU(0.2)
-> Up x2 -> Conv3x3(2ngf->ngf) -> BN -> LeakyReLU(0.2) -> Conv3x3(ngf->C) -> Sigmoid.

The BatchNorm layers always use batch statistics (``track_running_stats=False``): the generator has
no buffers, so it is a pure function of (parameters, z) and can be called with
``torch.func.functional_call`` (and later vmapped over teachers).

The images come out at the meta-learner's size. :func:`to_teacher_input` resizes them (and maps the
channel count) for a teacher with another input shape; the teacher's own normalisation is applied
by its :class:`~free_dfml.common.models.Normalized` wrapper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from free_dfml.common.models import cpu_layout


class Generator(nn.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"generator image_size must be a multiple of 4, got {image_size}")
        self.nz, self.ngf, self.image_size, self.channels = nz, ngf, image_size, channels
        self.init_size = image_size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size ** 2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf, track_running_stats=False),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf, track_running_stats=False),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf, track_running_stats=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z.flatten(1))
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(cpu_layout(out))

    def config(self) -> dict:
        return {"nz": self.nz, "ngf": self.ngf, "image_size": self.image_size, "channels": self.channels}


def to_teacher_input(x: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Images in [0,1] at the generator's size -> the teacher's channel count and side (bilinear)."""
    c, h, w = input_shape
    if x.shape[1] != c:
        if c == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to {c} channels")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x
