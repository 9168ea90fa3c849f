"""Few-step gradient adaptation of a classifier, written with ``torch.func.functional_call``.

One inner loop serves every user: few-shot evaluation (plain SGD steps on a support set), MAML
replay in the meta-learner (first or second order), and the baselines. Parameters travel as a
name -> tensor dict; the module itself is never modified. Buffers (BatchNorm running statistics)
are cloned per call so that adapting never changes the model it started from.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def parameters_of(model: nn.Module, *, detach: bool = False) -> Params:
    """The model's parameters as a dict: the live tensors (so gradients reach them), or detached leaf copies."""
    if detach:
        return {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    return dict(model.named_parameters())


def buffers_of(model: nn.Module) -> Params:
    """Cloned buffers, so running-statistic updates during adaptation stay local."""
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
            buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    tensors = dict(params)
    tensors.update(buffers if buffers is not None else buffers_of(model))
    return functional_call(model, tensors, (x,))


def adapt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
          params: Params | None = None, buffers: Params | None = None,
          second_order: bool = False) -> Params:
    """``steps`` SGD steps of cross-entropy on (x, y), starting from ``params`` (default: the model's own).

    With ``second_order`` the returned tensors keep the graph through every step (MAML); without
    it each step's gradient is treated as a constant, so a loss on the result back-propagates to
    the starting parameters as in first-order MAML. Starting from detached parameters gives plain
    fine-tuning (evaluation).
    """
    p = parameters_of(model) if params is None else dict(params)
    bufs = buffers_of(model) if buffers is None else buffers
    for _ in range(steps):
        loss = F.cross_entropy(forward(model, p, x, bufs), y)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=second_order)
        if not second_order:
            grads = [g.detach() for g in grads]
        p = {k: v - lr * g for (k, v), g in zip(p.items(), grads)}
    return p
