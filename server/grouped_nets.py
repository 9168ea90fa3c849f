"""T same-structure networks run as ONE network, with grouped convolutions.

The batched inversion engines (:mod:`free_dfml.server.inversion_engine`) run T generator copies
and T teachers at once. ``torch.func.vmap`` does that for any module, but around every convolution
it moves the teacher dimension into the channels and back (a copy of every activation, forward and
backward), and it dispatches each operator through its batching rules. For the networks FREE actually uses,
this module does the same arithmetic without either cost, in one fixed layout:

* **grouped layout**: a batch for T networks is one tensor ``[n, T*C, H, W]``; channels
  ``t*C .. (t+1)*C - 1`` belong to network t;
* a convolution is ``F.conv2d(..., groups=T * groups)`` with the T weight tensors concatenated;
  BatchNorm / GroupNorm normalise per channel (per group of channels), so they act on each network's
  channels separately with the T parameter sets concatenated; ReLU, LeakyReLU, max-pooling and
  nearest upsampling are per channel already;
* a linear layer (the generator's first, a classifier's head) is one ``baddbmm`` over ``[T, n, F]``.

Parameters and buffers come stacked, ``[T, ...]`` (as :func:`torch.func.stack_module_state` gives
them); a network shared by all T (the meta-learner in L_adv) passes its tensors repeated T times
(:func:`repeat`). BatchNorm uses batch statistics where the module would (train mode, or no running
statistics: the generator), else its running statistics, exactly as ``functional_call`` would.

Supported: :class:`~free_dfml.server.generator.Generator`, and classifiers that are a
:class:`~free_dfml.common.models.Conv4` (optionally inside
:class:`~free_dfml.common.models.Normalized`). :func:`supports` says whether a module is one of them;
anything else (ResNets) goes through ``vmap`` (:mod:`~free_dfml.server.stacked_nets` holds both).
tests/test_benchmarks.py checks both paths against the per-teacher loop in float64.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from free_dfml.common.models import Conv4, Normalized, cpu_layout
from free_dfml.server.generator import Generator, to_teacher_input

Params = Mapping[str, torch.Tensor]

# modules that act on each channel alone: they run on the grouped layout as they are
_PER_CHANNEL = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.Upsample)


def _layer_ok(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, nn.Upsample):
        return m.mode == "nearest"
    return isinstance(m, _PER_CHANNEL + (nn.BatchNorm2d, nn.GroupNorm))


def supports(module: nn.Module) -> bool:
    """Whether :func:`generator` / :func:`classifier` can run ``module`` (else use ``vmap``)."""
    if type(module) is Generator:
        return all(_layer_ok(m) for m in module.conv_blocks)
    net = module.model if type(module) is Normalized else module
    return (type(net) is Conv4 and isinstance(net.head, nn.Linear) and len(net.features) > 0
            and isinstance(net.features[-1], nn.Flatten)
            and all(_layer_ok(m) for m in list(net.features)[:-1]))


# ---------------------------------------------------------------------------------- layout

def to_grouped(x: torch.Tensor) -> torch.Tensor:
    """``[T, n, C, H, W]`` -> the grouped layout ``[n, T*C, H, W]``."""
    T, n, c = x.shape[:3]
    return x.transpose(0, 1).reshape(n, T * c, *x.shape[3:])


def from_grouped(x: torch.Tensor, T: int) -> torch.Tensor:
    """The grouped layout ``[n, T*C, H, W]`` -> ``[T, n, C, H, W]`` (contiguous)."""
    n = x.shape[0]
    return x.reshape(n, T, x.shape[1] // T, *x.shape[2:]).transpose(0, 1).contiguous()


def roll(x: torch.Tensor, T: int, shifts: torch.Tensor) -> torch.Tensor:
    """Network t's images circularly shifted by ``shifts[t]`` = (rows, columns), as
    :func:`~free_dfml.server.meta_generator.roll_images` does for one network."""
    n, tc, h, w = x.shape
    c = tc // T
    v = x.reshape(n, T, c, h, w)
    shifts = shifts.to(x.device)
    rows = (torch.arange(h, device=x.device) - shifts[:, :1]) % h      # [T, h]
    cols = (torch.arange(w, device=x.device) - shifts[:, 1:]) % w      # [T, w]
    v = v.gather(3, rows.view(1, T, 1, h, 1).expand(n, T, c, h, w))
    v = v.gather(4, cols.view(1, T, 1, 1, w).expand(n, T, c, h, w))
    return v.reshape(n, tc, h, w)


def teacher_input(x: torch.Tensor, T: int, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """:func:`~free_dfml.server.generator.to_teacher_input` on the grouped layout."""
    n, tc, h, w = x.shape
    if (tc // T, h, w) == tuple(input_shape):
        return x
    out = to_teacher_input(x.reshape(n * T, tc // T, h, w), input_shape)
    return out.reshape(n, T * out.shape[1], *out.shape[2:])


# ---------------------------------------------------------------------------------- layers

def repeat(tensors: Params, T: int) -> dict[str, torch.Tensor]:
    """One network's tensors as T identical stacked copies ``[T, ...]`` (detached, contiguous), for
    a network applied to T image batches, each with its own batch statistics."""
    return {k: v.detach().unsqueeze(0).expand(T, *v.shape).contiguous() for k, v in tensors.items()}


class _Tensors:
    """Stacked ``[T, ...]`` tensors by name."""

    def __init__(self, tensors: Params, T: int):
        self.tensors, self.T = tensors, T

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def flat(self, name: str) -> torch.Tensor | None:
        """The T tensors concatenated along their first dimension (a grouped layer's weight)."""
        v = self.get(name)
        return None if v is None else v.flatten(0, 1)


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, name: str, P: _Tensors, B: _Tensors,
               x: torch.Tensor, bn_losses: list[torch.Tensor] | None) -> torch.Tensor:
    T = P.T
    rm, rv = B.get(name + ".running_mean"), B.get(name + ".running_var")
    if bn_losses is not None and rm is not None:       # DeepInversion's term (meta_generator.BNStatLoss)
        mean = x.mean(dim=(0, 2, 3)).view(T, -1)
        var = x.var(dim=(0, 2, 3), correction=0).view(T, -1)
        bn_losses.append(torch.linalg.vector_norm(mean - rm, dim=1)
                         + torch.linalg.vector_norm(var - rv, dim=1))
    batch_stats = m.training or rm is None
    return F.batch_norm(x, None if batch_stats else rm.flatten(), None if batch_stats else rv.flatten(),
                        P.flat(name + ".weight"), P.flat(name + ".bias"), batch_stats, 0.0, m.eps)


def _layer(m: nn.Module, name: str, P: _Tensors, B: _Tensors, x: torch.Tensor,
           bn_losses: list[torch.Tensor] | None = None) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        return F.conv2d(x, P.flat(name + ".weight"), P.flat(name + ".bias"), m.stride, m.padding,
                        m.dilation, P.T * m.groups)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batchnorm(m, name, P, B, x, bn_losses)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, P.T * m.num_groups, P.flat(name + ".weight"), P.flat(name + ".bias"), m.eps)
    if isinstance(m, _PER_CHANNEL):
        return m(x)
    raise TypeError(f"no grouped form for {type(m).__name__}")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [T, n, F]`` through T linear layers ``weight [T, K, F]``, ``bias [T, K]`` -> ``[T, n, K]``."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


# -------------------------------------------------------------------------------- networks

def generator(gen: Generator, params: Params, z: torch.Tensor) -> torch.Tensor:
    """T copies of ``gen`` with stacked ``params`` on latents ``z [T, n, nz]`` -> images in the
    grouped layout ``[n, T*C, H, W]``."""
    T, n = z.shape[:2]
    P = _Tensors(params, T)
    out = _linear(z.flatten(2), P.get("l1.weight"), P.get("l1.bias"))
    s = gen.init_size
    x = cpu_layout(to_grouped(out.view(T, n, -1, s, s)))
    none = _Tensors({}, T)
    for i, m in enumerate(gen.conv_blocks):
        x = _layer(m, f"conv_blocks.{i}", P, none, x)
    return x


def classifier(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, T: int, *,
               bn_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T classifiers of ``model``'s structure on images in the grouped layout -> (logits
    ``[T, n, K]``, the DeepInversion BN loss of each network ``[T]`` when ``bn_loss``, else None).

    ``params`` / ``buffers`` are stacked ``[T, ...]`` (one network applied to T image batches, each
    with its own batch statistics: its tensors through :func:`repeat`)."""
    P, B = _Tensors(params, T), _Tensors(buffers, T)
    n = x.shape[0]
    net, prefix = model, ""
    if type(model) is Normalized:
        x = (x - B.flat("mean").reshape(1, -1, 1, 1)) / B.flat("std").reshape(1, -1, 1, 1)
        net, prefix = model.model, "model."
    x = cpu_layout(x)
    losses: list[torch.Tensor] | None = [] if bn_loss else None
    feats = list(net.features)
    for i, m in enumerate(feats[:-1]):
        x = _layer(m, f"{prefix}features.{i}", P, B, x, losses)
    x = x.reshape(n, T, -1).transpose(0, 1)                     # Flatten, per network: [T, n, F]
    logits = _linear(x, P.get(prefix + "head.weight"), P.get(prefix + "head.bias"))
    bn = torch.stack(losses).sum(0) if losses else None
    return logits, bn
