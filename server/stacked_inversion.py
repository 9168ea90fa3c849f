"""The inversion inner loop for many teachers at once (what the batched engines run).

:func:`free_dfml.server.meta_generator.invert` adapts a generator copy to ONE teacher. Here teachers
that share a structure (architecture, widths, input shape, class count, BN capability) are
processed together (:func:`invert_stacked`), their networks run through
:mod:`~free_dfml.server.stacked_nets` (``vmap`` for any module, grouped convolutions for Conv4s
and the Generator). Each stacked inner step does what the per-teacher loop does:

* the generator's BatchNorm layers keep no running statistics (``track_running_stats=False``), so
  each copy normalises with its own teacher's batch statistics, exactly as in the loop; the latents
  ``z`` are stacked ``[T, n, nz]``;
* one backward pass of the SUM of the per-teacher losses gives every teacher's gradient (the
  teachers share nothing), and Adam runs on the stacked tensors: Adam is elementwise and all copies
  share the step count, so this is T independent Adams, with the arithmetic of
  :func:`~free_dfml.server.meta_generator.adam_update`;
* the data-dependent masking of :func:`~free_dfml.server.meta_generator.restrict` is written as
  per-teacher gather indices and 0/1 weights (same value, fixed shapes).

The results equal the per-teacher loop's to float rounding (tests/test_benchmarks.py, float64).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from free_dfml.common.adaptation import buffers_of, forward
from free_dfml.server.generator import Generator
from free_dfml.server.meta_generator import InversionResult, Params, Student, Teacher, invert
from free_dfml.server.stacked_nets import nets_for


def frozen_student(model: nn.Module) -> Student:
    """``model`` as a frozen function x -> logits (what ``MetaLearner.student`` gives for L_adv)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = buffers_of(model)
    return lambda x: forward(model, params, x, buffers)


# ---------------------------------------------------------------------------------- grouping

def teacher_signature(t: Teacher, lambda_bn: float = 0.0) -> tuple:
    """Teachers with equal signatures can be stacked: same module structure and tensor shapes."""
    model = t.model
    shapes = tuple((k, tuple(v.shape), str(v.dtype), str(v.device))
                   for k, v in list(model.named_parameters()) + list(model.named_buffers()))
    structure = tuple(type(m).__name__ for m in model.modules())
    return (structure, shapes, tuple(t.input_shape), t.num_classes,
            bool(lambda_bn > 0 and t.bn_capable))


def group_teachers(teachers: Sequence[Teacher], lambda_bn: float = 0.0) -> list[list[int]]:
    """Indices of ``teachers`` grouped by :func:`teacher_signature`, in order of first appearance."""
    groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
    for i, t in enumerate(teachers):
        groups.setdefault(teacher_signature(t, lambda_bn), []).append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------------ losses

def _subset_tensors(subsets: Sequence[Sequence[int] | None], num_classes: int, way: int,
                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-teacher gather indices [T, s] and kept-sample weights [T, n] (restrict() without masking)."""
    idx = []
    for sub in subsets:
        sub = list(range(min(way, num_classes))) if sub is None else list(sub)
        if len(sub) > way:
            raise ValueError(f"a subset of {len(sub)} classes does not fit a {way}-way student")
        idx.append(torch.as_tensor(sub, dtype=torch.long, device=y.device))
    lens = {len(i) for i in idx}
    if len(lens) != 1:
        raise ValueError("teachers batched together need subsets of equal size")
    idx_t = torch.stack(idx)
    keep_t = (y.view(1, -1, 1) == idx_t.unsqueeze(1)).any(2).to(torch.float32)
    return idx_t, keep_t, lens.pop()


def adversarial_losses(t_logits: torch.Tensor, s_logits: torch.Tensor, idx: torch.Tensor,
                       keep: torch.Tensor, s_len: int) -> torch.Tensor:
    """L_adv per teacher ([T]): minus the mean KL(t || s) over kept samples where the argmaxes agree."""
    t = torch.gather(t_logits, 2, idx.unsqueeze(1).expand(-1, t_logits.shape[1], -1))
    s = s_logits[..., :s_len]
    log_t = F.log_softmax(t, 2)
    kl = (log_t.exp() * (log_t - F.log_softmax(s, 2))).sum(2)
    agree = (t.argmax(2) == s.argmax(2)).to(kl.dtype) * keep
    return -(kl * agree).sum(1) / agree.sum(1).clamp_min(1.0)


def _adam(params: Params, grads: Params, m: Params, v: Params, step: int, lrs: dict[str, float],
          betas: tuple[float, float], eps: float = 1e-8) -> Params:
    """``meta_generator.adam_update`` on stacked tensors (elementwise, so per-teacher independent)."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    out: Params = {}
    for k, p in params.items():
        g = grads[k]
        m[k] = g * (1 - b1) if k not in m else m[k] * b1 + g * (1 - b1)
        v[k] = g * g * (1 - b2) if k not in v else v[k] * b2 + g * g * (1 - b2)
        denom = (v[k] / bc2).sqrt() + eps
        out[k] = (p.detach() - lrs[k] * (m[k] / bc1) / denom).requires_grad_(True)
    return out


# --------------------------------------------------------------------------------- inversion

def invert_stacked(teachers: Sequence[Teacher], generator: Generator, generator_params: Sequence[Params],
                   z: Sequence[torch.Tensor], y: torch.Tensor, *, steps: int, lr: float = 1e-3,
                   z_lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999),
                   lambda_adv: float = 0.0, student_model: nn.Module | None = None,
                   subsets: Sequence[Sequence[int] | None] | None = None,
                   lambda_bn: float = 0.0,
                   shifts: Sequence[torch.Tensor] | None = None,
                   grouped_conv: bool = True) -> list[InversionResult]:
    """:func:`~free_dfml.server.meta_generator.invert` for T same-structure teachers at once.

    ``generator_params[t]`` / ``z[t]`` / ``shifts[t]`` are teacher t's starting parameters, latents
    and jitter shifts (shared targets ``y``). The adversarial term uses the frozen ``student_model``.
    With ``grouped_conv`` the networks run as grouped convolutions where they can (Conv4 teachers
    and learner, the Generator), else through ``vmap``. Returns one result per teacher, in order."""
    if steps < 1:
        raise ValueError("inversion needs at least one step")
    T = len(teachers)
    if not (T == len(generator_params) == len(z)):
        raise ValueError("one generator parameter set and one latent batch per teacher")
    if len({teacher_signature(t, lambda_bn) for t in teachers}) != 1:
        raise ValueError("invert_stacked needs teachers of one structure (see group_teachers)")
    subsets = [None] * T if subsets is None else list(subsets)
    use_bn = lambda_bn > 0 and teachers[0].bn_capable
    shift_t = None
    if shifts is not None:
        if len(shifts) != T or any(tuple(s.shape) != (steps, 2) for s in shifts):
            raise ValueError(f"shifts must be one [{steps}, 2] tensor per teacher")
        shift_t = torch.stack(list(shifts))
    learner = student_model if lambda_adv > 0 else None
    nets = nets_for(teachers, generator, learner, grouped_conv)(teachers, generator, use_bn, learner)
    names = list(generator_params[0])
    params = {k: torch.stack([p[k].detach() for p in generator_params]).clone().requires_grad_(True)
              for k in names}
    zs = torch.stack([zz.detach() for zz in z]).clone().requires_grad_(True)
    lrs = {**{k: lr for k in names}, "__z__": z_lr}
    m: Params = {}
    v: Params = {}
    last: Params = {}
    history: list[list[dict[str, float]]] = [[] for _ in range(T)]
    try:
        with torch.enable_grad():
            for step in range(1, steps + 1):
                x = nets.images(params, zs)
                if shift_t is not None:
                    x = nets.roll(x, shift_t[:, step - 1])
                t_logits, bn = nets.teachers(x)
                ce = F.cross_entropy(t_logits.flatten(0, 1), y.repeat(T), reduction="none").view(T, -1).mean(1)
                loss = ce
                parts = {"ce": ce.detach()}
                if use_bn:
                    loss = loss + lambda_bn * bn
                    parts["bn"] = bn.detach()
                if learner is not None:
                    s_logits = nets.student(x)
                    idx, keep, s_len = _subset_tensors(subsets, teachers[0].num_classes,
                                                       s_logits.shape[-1], y)
                    adv = adversarial_losses(t_logits, s_logits, idx, keep, s_len)
                    loss = loss + lambda_adv * adv
                    parts["adv"] = adv.detach()
                grads = torch.autograd.grad(loss.sum(), [*params.values(), zs])
                last = {k: g.detach() for k, g in zip(names, grads[:-1])}
                both = _adam({**params, "__z__": zs}, {**last, "__z__": grads[-1].detach()}, m, v,
                             step, lrs, betas)
                zs = both.pop("__z__")
                params = both
                cpu_parts = {k: t.cpu().tolist() for k, t in parts.items()}
                for i in range(T):
                    history[i].append({k: float(vals[i]) for k, vals in cpu_parts.items()})
        with torch.no_grad():
            x = nets.images(params, zs)
            t_logits, _ = nets.teachers(x)
            images = nets.stacked(x)
            final = F.cross_entropy(t_logits.flatten(0, 1), y.repeat(T), reduction="none").view(T, -1).mean(1)
    finally:
        nets.close()
    final_l = final.cpu().tolist()
    return [InversionResult({k: params[k][i].detach() for k in names}, zs[i].detach(), images[i].detach(),
                            y.detach(), {k: last[k][i] for k in names}, history[i], float(final_l[i]))
            for i in range(T)]


def invert_many(teachers: Sequence[Teacher], generator: Generator, generator_params: Sequence[Params],
                z: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
                subsets: Sequence[Sequence[int] | None] | None = None, lambda_bn: float = 0.0,
                shifts: Sequence[torch.Tensor | None] | None = None, student_model: nn.Module | None = None,
                grouped_conv: bool = True, **kw) -> list[InversionResult]:
    """Any mix of teachers: stacked per structure group (:func:`invert_stacked`), a lone teacher via
    the plain :func:`~free_dfml.server.meta_generator.invert`. Results in the teachers' order."""
    subsets = [None] * len(teachers) if subsets is None else list(subsets)
    shifts = [None] * len(teachers) if shifts is None else list(shifts)
    if any(s is None for s in shifts) and any(s is not None for s in shifts):
        raise ValueError("jitter shifts for some teachers but not for others")
    out: list[InversionResult | None] = [None] * len(teachers)
    for group in group_teachers(teachers, lambda_bn):
        if len(group) == 1:
            i = group[0]
            student = None if student_model is None else frozen_student(student_model)
            out[i] = invert(teachers[i], generator, generator_params[i], z[i], ys[i],
                            subset=subsets[i], lambda_bn=lambda_bn, student=student, shifts=shifts[i], **kw)
            continue
        res = invert_stacked([teachers[i] for i in group], generator,
                             [generator_params[i] for i in group], [z[i] for i in group], ys[group[0]],
                             subsets=[subsets[i] for i in group], lambda_bn=lambda_bn,
                             shifts=None if shifts[0] is None else [shifts[i] for i in group],
                             student_model=student_model, grouped_conv=grouped_conv, **kw)
        for i, r in zip(group, res):
            out[i] = r
    return out  # type: ignore[return-value]
