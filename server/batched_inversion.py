"""Batched multi-teacher inversion: the FIVE inner loop for many teachers at once.

:func:`free_dfml.server.meta_generator.invert` adapts a generator copy to ONE teacher; a FIVE step
(:meth:`MetaGenerator.step`) and the ``scratch`` baseline call it in a Python loop over the T
teachers. Here teachers that share a structure (architecture, widths, input shape, class count, BN
capability) are processed together, through one of two engines (``engine=``; ``"auto"`` takes the
first that applies):

* ``grouped-conv`` (:mod:`~free_dfml.server.grouped_nets`): Conv4 teachers, a Conv4 meta-learner and
  the :class:`~free_dfml.server.generator.Generator` run as grouped convolutions on images laid out
  ``[n, T*C, H, W]``, with no per-operator batching rules and no layout copies around each layer;
* ``vmap``: any module. The teachers' weights and buffers (BatchNorm running statistics, input
  normalisation) are stacked with :func:`torch.func.stack_module_state` and called through
  ``vmap`` + ``functional_call`` (eval mode: nothing is written in place), the T generator copies
  ``phi_t`` the same way, and the meta-learner with per-teacher cloned buffers (BatchNorm in train
  mode, so running statistics never leak between teachers).

In both:

* the generator's BatchNorm layers keep no running statistics (``track_running_stats=False``), so
  each copy normalises with its own teacher's batch statistics, exactly as in the loop; the latents
  ``z`` are stacked ``[T, n, nz]``;
* one backward pass of the SUM of the per-teacher losses gives every teacher's gradient (the
  teachers share nothing), and Adam runs on the stacked tensors: Adam is elementwise and all copies
  share the step count, so this is T independent Adams, with the arithmetic of
  :func:`~free_dfml.server.meta_generator.adam_update`;
* the adversarial term uses the meta-learner's module when given, else the opaque ``student``
  callable per teacher;
* the data-dependent masking of :func:`~free_dfml.server.meta_generator.restrict` is written as
  per-teacher gather indices and 0/1 weights (same value, fixed shapes).

Random numbers are drawn in the same order as the sequential code, so :func:`five_step` /
:func:`scratch_inversions` return the same :class:`InversionResult` objects as
``MetaGenerator.step`` / the trainer's scratch loop, to float tolerance (tests/test_benchmarks.py).

Use from a trainer without editing it: :func:`install` swaps a ``FreeTrainer``'s meta-generator
step for :func:`five_step` (``uninstall`` puts the original back).
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from free_dfml.server import grouped_nets
from free_dfml.server.generator import Generator, to_teacher_input
from free_dfml.server.meta_generator import (BNStatLoss, InversionResult, MetaGenerator, Params,
                                             Teacher, invert, roll_images, scratch_draws)

Student = Callable[[torch.Tensor], torch.Tensor]


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


class StackedTeachers:
    """Same-structure teachers as one vmapped function ``x [T, n, C, H, W] -> logits [T, n, K]``
    (and, with ``bn_hooks``, the DeepInversion BN statistic loss of each teacher)."""

    def __init__(self, teachers: Sequence[Teacher], *, bn_hooks: bool = False):
        if not teachers:
            raise ValueError("no teachers to stack")
        self.teachers = list(teachers)
        self.input_shape = tuple(teachers[0].input_shape)
        models = [t.model for t in teachers]
        self.params, self.buffers = stack_module_state(models)
        self.params = {k: v.detach() for k, v in self.params.items()}
        # the skeleton whose tensors functional_call swaps out; never run with its own tensors
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base.eval()
        self.hook = BNStatLoss(self.base) if bn_hooks else None

    def __len__(self) -> int:
        return len(self.teachers)

    def _one(self, params: Params, buffers: Params, x: torch.Tensor):
        logits = functional_call(self.base, (params, buffers), (to_teacher_input(x, self.input_shape),))
        if self.hook is None:
            return logits, logits.new_zeros(())
        bn = self.hook.pop()
        return logits, (bn if bn is not None else logits.new_zeros(()))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [T, n, K], BN loss [T]) for stacked images ``x`` [T, n, C, H, W]."""
        return vmap(self._one)(self.params, self.buffers, x)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()


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


def _stacked_student(student_model: nn.Module, T: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``MetaLearner.student()`` for T image batches at once: frozen parameters, per-teacher cloned buffers."""
    params = {k: v.detach() for k, v in student_model.named_parameters()}
    bufs = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone()
            for k, v in student_model.named_buffers()}

    def one(b: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(student_model, ({**params, **b},), (x,))

    return lambda x: vmap(one)(bufs, x)


# --------------------------------------------------------------------------------- inversion

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


ENGINES = ("auto", "grouped-conv", "vmap")


class _VmapEngine:
    """Any module: teachers, generator copies and the learner through ``vmap`` + ``functional_call``.
    Images travel as ``[T, n, C, H, W]``."""

    def __init__(self, teachers: Sequence[Teacher], generator: Generator, use_bn: bool,
                 student_model: nn.Module | None):
        self.T = len(teachers)
        self.stack = StackedTeachers(teachers, bn_hooks=use_bn)
        self.gen_fn = vmap(lambda p, zz: functional_call(generator, p, (zz,)))
        self.s_fn = None if student_model is None else _stacked_student(student_model, self.T)

    def images(self, params: Params, z: torch.Tensor) -> torch.Tensor:
        return self.gen_fn(params, z)

    def roll(self, x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        return vmap(roll_images)(x, shifts)

    def teachers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stack(x)

    def student(self, x: torch.Tensor) -> torch.Tensor:
        """The meta-learner module's logits ``[T, n, way]`` on each teacher's images."""
        return self.s_fn(x)

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def close(self) -> None:
        self.stack.close()


class _GroupedConvEngine:
    """Conv4 teachers and the Generator as grouped convolutions (:mod:`~free_dfml.server.grouped_nets`):
    no per-operator batching rules, no layout copies around each convolution. Images travel in the
    grouped layout ``[n, T*C, H, W]``."""

    def __init__(self, teachers: Sequence[Teacher], generator: Generator, use_bn: bool,
                 student_model: nn.Module | None):
        self.T = len(teachers)
        self.generator = generator
        self.input_shape = tuple(teachers[0].input_shape)
        self.base = teachers[0].model
        params, buffers = stack_module_state([t.model for t in teachers])
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = buffers
        self.use_bn = use_bn
        self.student_model = student_model
        self.s_params = self.s_buffers = None
        if student_model is not None:      # frozen during inversion: repeated T times once, not per step
            self.s_params = grouped_nets.repeat(dict(student_model.named_parameters()), self.T)
            self.s_buffers = grouped_nets.repeat(dict(student_model.named_buffers()), self.T)

    @staticmethod
    def usable(teachers: Sequence[Teacher], generator: Generator, student_model: nn.Module | None) -> bool:
        return (grouped_nets.supports(generator) and grouped_nets.supports(teachers[0].model)
                and (student_model is None or grouped_nets.supports(student_model)))

    def images(self, params: Params, z: torch.Tensor) -> torch.Tensor:
        return grouped_nets.generator(self.generator, params, z)

    def roll(self, x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        return grouped_nets.roll(x, self.T, shifts)

    def teachers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = grouped_nets.teacher_input(x, self.T, self.input_shape)
        logits, bn = grouped_nets.classifier(self.base, self.params, self.buffers, x, self.T, bn_loss=self.use_bn)
        return logits, (bn if bn is not None else logits.new_zeros(self.T))

    def student(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_nets.classifier(self.student_model, self.s_params, self.s_buffers, x, self.T)[0]

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_nets.from_grouped(x, self.T)

    def close(self) -> None:
        pass


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def engine_for(teachers: Sequence[Teacher], generator: Generator, student_model: nn.Module | None = None,
               engine: str = "auto") -> str:
    """The engine :func:`invert_stacked` runs for these networks: ``"grouped-conv"`` or ``"vmap"``
    (``engine="grouped-conv"`` where it does not apply is an error)."""
    _check_engine(engine)
    grouped_ok = _GroupedConvEngine.usable(teachers, generator, student_model)
    if engine == "grouped-conv" and not grouped_ok:
        raise ValueError("the grouped-conv engine runs Conv4 teachers and learners and the Generator only")
    return "grouped-conv" if engine == "grouped-conv" or (engine == "auto" and grouped_ok) else "vmap"


def invert_stacked(teachers: Sequence[Teacher], generator: Generator, generator_params: Sequence[Params],
                   z: Sequence[torch.Tensor], y: torch.Tensor, *, steps: int, lr: float = 1e-3,
                   z_lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999),
                   lambda_adv: float = 0.0, student: Student | None = None,
                   student_model: nn.Module | None = None,
                   subsets: Sequence[Sequence[int] | None] | None = None,
                   lambda_bn: float = 0.0,
                   shifts: Sequence[torch.Tensor] | None = None,
                   engine: str = "auto") -> list[InversionResult]:
    """:func:`~free_dfml.server.meta_generator.invert` for T same-structure teachers at once.

    ``generator_params[t]`` / ``z[t]`` / ``shifts[t]`` are teacher t's starting parameters, latents
    and jitter shifts (shared targets ``y``). The adversarial term uses ``student_model`` (batched)
    when given, else the ``student`` callable per teacher. ``engine``: ``"grouped-conv"`` runs the
    networks as grouped convolutions (Conv4 teachers and learner, the Generator), ``"vmap"`` any
    module through ``torch.func.vmap``; ``"auto"`` takes the first where it applies. Returns one
    result per teacher, in order."""
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
    use_adv = lambda_adv > 0 and (student is not None or student_model is not None)
    kind = _GroupedConvEngine if engine_for(teachers, generator, student_model if use_adv else None,
                                            engine) == "grouped-conv" else _VmapEngine
    eng = kind(teachers, generator, use_bn, student_model if use_adv else None)
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
                x = eng.images(params, zs)
                if shift_t is not None:
                    x = eng.roll(x, shift_t[:, step - 1])
                t_logits, bn = eng.teachers(x)
                ce = F.cross_entropy(t_logits.flatten(0, 1), y.repeat(T), reduction="none").view(T, -1).mean(1)
                loss = ce
                parts = {"ce": ce.detach()}
                if use_bn:
                    loss = loss + lambda_bn * bn
                    parts["bn"] = bn.detach()
                if use_adv:
                    if student_model is not None:
                        s_logits = eng.student(x)
                    else:                     # an opaque callable: one teacher's images at a time
                        xs = eng.stacked(x)
                        s_logits = torch.stack([student(xs[i]) for i in range(T)])
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
            x = eng.images(params, zs)
            t_logits, _ = eng.teachers(x)
            images = eng.stacked(x)
            final = F.cross_entropy(t_logits.flatten(0, 1), y.repeat(T), reduction="none").view(T, -1).mean(1)
    finally:
        eng.close()
    final_l = final.cpu().tolist()
    return [InversionResult({k: params[k][i].detach() for k in names}, zs[i].detach(), images[i].detach(),
                            y.detach(), {k: last[k][i] for k in names}, history[i], float(final_l[i]))
            for i in range(T)]


def invert_grouped(teachers: Sequence[Teacher], generator: Generator, generator_params: Sequence[Params],
                   z: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *, max_batch: int | None = None,
                   subsets: Sequence[Sequence[int] | None] | None = None, lambda_bn: float = 0.0,
                   shifts: Sequence[torch.Tensor | None] | None = None, engine: str = "auto",
                   **kw) -> list[InversionResult]:
    """Any mix of teachers: stacked per structure group (chunks of ``max_batch``, through
    ``engine``, see :func:`invert_stacked`), a lone teacher via the plain :func:`invert`. Results in
    the teachers' order."""
    _check_engine(engine)
    subsets = [None] * len(teachers) if subsets is None else list(subsets)
    shifts = [None] * len(teachers) if shifts is None else list(shifts)
    if any(s is None for s in shifts) and any(s is not None for s in shifts):
        raise ValueError("jitter shifts for some teachers but not for others")
    student = kw.pop("student", None)
    student_model = kw.pop("student_model", None)
    out: list[InversionResult | None] = [None] * len(teachers)
    for group in group_teachers(teachers, lambda_bn):
        size = max_batch or len(group)
        for c in range(0, len(group), size):
            chunk = group[c:c + size]
            if len(chunk) == 1:
                i = chunk[0]
                s = student
                if s is None and student_model is not None:
                    s = _single_student(student_model)
                out[i] = invert(teachers[i], generator, generator_params[i], z[i], ys[i],
                                subset=subsets[i], lambda_bn=lambda_bn, student=s, shifts=shifts[i], **kw)
                continue
            res = invert_stacked([teachers[i] for i in chunk], generator,
                                 [generator_params[i] for i in chunk], [z[i] for i in chunk], ys[chunk[0]],
                                 subsets=[subsets[i] for i in chunk], lambda_bn=lambda_bn,
                                 shifts=None if shifts[0] is None else [shifts[i] for i in chunk],
                                 student=student, student_model=student_model, engine=engine, **kw)
            for i, r in zip(chunk, res):
                out[i] = r
    return out  # type: ignore[return-value]


def _single_student(model: nn.Module) -> Student:
    from free_dfml.common.adaptation import buffers_of, forward
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = buffers_of(model)
    return lambda x: forward(model, params, x, buffers)


# ------------------------------------------------------------------------------- FIVE / scratch

def five_step(metagen: MetaGenerator, teachers: Sequence[Teacher], *, lambda_adv: float = 0.0,
              student: Student | None = None, student_model: nn.Module | None = None,
              subsets: Sequence[Sequence[int] | None] | None = None,
              max_batch: int | None = None, engine: str = "auto") -> list[InversionResult]:
    """:meth:`MetaGenerator.step` with the inner loops batched: same latents (same RNG order), same
    FOMAML meta-update (gradients summed in teacher order), same results to float tolerance."""
    if not teachers:
        raise ValueError("a FIVE step needs at least one teacher")
    ys, zs, shifts = zip(*[metagen.draw(t) for t in teachers])   # as MetaGenerator.adapt in a loop
    phi = metagen.params()
    results = invert_grouped(teachers, metagen.generator, [phi] * len(teachers), zs, ys,
                             steps=metagen.inner_steps, lr=metagen.inner_lr, z_lr=metagen.z_lr,
                             betas=metagen.betas, lambda_adv=lambda_adv, student=student,
                             student_model=student_model, subsets=subsets,
                             lambda_bn=metagen.lambda_bn, shifts=shifts, max_batch=max_batch, engine=engine)
    metagen.optimizer.zero_grad(set_to_none=True)
    for name, p in metagen.generator.named_parameters():
        p.grad = torch.stack([r.last_grads[name] for r in results]).sum(0)
    metagen.optimizer.step()
    return results


def scratch_inversions(teachers: Sequence[Teacher], *, nz: int, ngf: int, image_size: int, channels: int,
                       steps: int, per_class: int, rng: torch.Generator, device: torch.device | str = "cpu",
                       lr: float = 1e-3, z_lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999),
                       lambda_adv: float = 0.0, student: Student | None = None,
                       student_model: nn.Module | None = None,
                       subsets: Sequence[Sequence[int] | None] | None = None, lambda_bn: float = 0.0,
                       jitter: int = 0, max_batch: int | None = None, engine: str = "auto"
                       ) -> list[InversionResult]:
    """``[invert_from_scratch(t, ...) for t in teachers]`` (the trainer's scratch branch), batched:
    fresh generators and latents drawn from ``rng`` in the same order, inner loops stacked."""
    gens, ys, zs, shifts = [], [], [], []
    for t in teachers:     # same draws, same order as invert_from_scratch in a loop
        gen, y, z, s = scratch_draws(t, nz=nz, ngf=ngf, image_size=image_size, channels=channels, steps=steps,
                                     per_class=per_class, jitter=jitter, rng=rng, device=device)
        gens.append({k: v.detach() for k, v in gen.named_parameters()})
        ys.append(y)
        zs.append(z)
        shifts.append(s)
    skeleton = Generator(nz=nz, ngf=ngf, image_size=image_size, channels=channels).to(device)
    return invert_grouped(teachers, skeleton, gens, zs, ys, steps=steps, lr=lr, z_lr=z_lr, betas=betas,
                          lambda_adv=lambda_adv, student=student, student_model=student_model,
                          subsets=subsets, lambda_bn=lambda_bn, shifts=shifts, max_batch=max_batch,
                          engine=engine)


# ------------------------------------------------------------------------------ trainer hook

def install(trainer, *, max_batch: int | None = None) -> None:
    """Make ``trainer`` (a :class:`~free_dfml.server.trainer.FreeTrainer`) run its FIVE steps batched.

    The trainer calls ``self.metagen.step(teachers, lambda_adv=, student=, subsets=)``; this binds
    an instance-level replacement that vmaps the learner itself (its parameters are what
    ``student`` snapshots: nothing changes the learner during inversion)."""
    metagen = trainer.metagen
    learner = trainer.learner

    def step(self, teachers, *, lambda_adv=0.0, student=None, subsets=None):
        return five_step(self, teachers, lambda_adv=lambda_adv,
                         student_model=learner if student is not None else None,
                         student=None, subsets=subsets, max_batch=max_batch)

    metagen.step = types.MethodType(step, metagen)


def uninstall(trainer) -> None:
    trainer.metagen.__dict__.pop("step", None)
