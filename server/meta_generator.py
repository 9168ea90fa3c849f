"""FIVE: Faster Inversion via a meta-generator (and the from-scratch inversion it is compared with).

One generator ``G_phi`` is meta-learned across the zoo's models ("tasks") so that ``k`` inner steps
specialise it to any one model. Per FIVE step, for each of the ``T`` sampled teachers:

1. targets ``y`` = every class of the teacher repeated ``m`` times; ``z ~ N(0, I)``, trainable;
   ``phi_t`` <- copy of ``phi``;
2. ``k`` inner Adam steps (lr 1e-3, betas (0.5, 0.999)) on ``phi_t`` and ``z`` minimising
   ``CE(f_t(x), y) + lambda_adv * L_adv + lambda_bn * L_bn`` with ``x = G_phi_t(z)``
   (:func:`inversion_loss`); with ``jitter`` > 0 the teacher and the meta-learner see ``x``
   circularly shifted by a random offset drawn per inner step (:func:`roll_images`, DeepInversion);
3. first-order meta-gradient: ``phi.grad += grad of phi_t at its last inner step`` (FOMAML),
   summed over the T teachers, then one Adam step on ``phi``;
4. the adapted generator's images and labels are returned for EVERY teacher (all go to the bank).

The per-teacher inner loop is the pure-ish function :func:`invert` (parameters and z in, adapted
parameters, z, images and last-step gradients out; a hand-written functional Adam); :meth:`MetaGenerator.step`
runs it in a loop over the teachers (the ``loop`` engine of :mod:`~free_dfml.server.inversion_engine`,
whose batched engines stack same-structure teachers instead). :func:`invert_from_scratch` is the
``scratch`` baseline (a fresh generator per model, hundreds of steps) on the same loss code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from free_dfml.common.models import has_batchnorm
from free_dfml.server.generator import Generator, to_teacher_input

Params = dict[str, torch.Tensor]
Student = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ teachers

@dataclass
class Teacher:
    """A zoo model as the server uses it: eval mode, images in [0, 1] at its own input shape."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    model_id: str = ""
    is_dp: bool = False

    @property
    def bn_capable(self) -> bool:
        """The DeepInversion BN term applies only to teachers with BatchNorm (never GroupNorm / DP)."""
        return (not self.is_dp) and has_batchnorm(self.model)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(to_teacher_input(x, self.input_shape))


class BNStatLoss:
    """Forward hooks on a teacher's BatchNorm layers: sum over layers of
    ||batch mean - running mean||_2 + ||batch var - running var||_2 of the layer's input (DeepInversion)."""

    def __init__(self, model: nn.Module):
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2)
                           + torch.norm(var - module.running_var, 2))

    def pop(self) -> torch.Tensor | None:
        if not self.losses:
            return None
        out = torch.stack(self.losses).sum()
        self.losses = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def bn_loss_hooks(teacher: Teacher, lambda_bn: float) -> Iterator[BNStatLoss | None]:
    """A :class:`BNStatLoss` when the BN term is on and the teacher has BatchNorm, else ``None``."""
    if lambda_bn <= 0 or not teacher.bn_capable:
        yield None
        return
    hook = BNStatLoss(teacher.model)
    try:
        yield hook
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------- loss

def restrict(t_logits: torch.Tensor, s_logits: torch.Tensor, y: torch.Tensor,
             subset: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student logits on a common label set.

    ``subset`` lists at most ``way`` teacher classes (default: the first ``min(way, n_t)``); teacher
    class ``subset[j]`` is the student's output ``j``. Only samples whose target is in the subset
    are kept. Returns (teacher logits, student logits, kept-sample mask)."""
    way = s_logits.shape[1]
    if subset is None:
        subset = list(range(min(way, t_logits.shape[1])))
    if len(subset) > way:
        raise ValueError(f"a subset of {len(subset)} classes does not fit a {way}-way student")
    idx = torch.as_tensor(list(subset), device=t_logits.device, dtype=torch.long)
    mask = (y.unsqueeze(1) == idx.unsqueeze(0)).any(1)
    return t_logits[mask][:, idx], s_logits[mask][:, : len(subset)], mask


def kl_per_sample(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax t || softmax s) per sample."""
    log_t = F.log_softmax(t_logits, 1)
    return (log_t.exp() * (log_t - F.log_softmax(s_logits, 1))).sum(1)


def adversarial_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, y: torch.Tensor,
                     subset: Sequence[int] | None) -> torch.Tensor:
    """L_adv: minus the mean, over samples where teacher and student agree (argmax), of KL(t || s)."""
    t, s, _ = restrict(t_logits, s_logits, y, subset)
    if t.shape[0] == 0:
        return t_logits.sum() * 0.0
    agree = (t.argmax(1) == s.argmax(1)).float()
    return -(kl_per_sample(t, s) * agree).sum() / agree.sum().clamp_min(1.0)


def inversion_loss(teacher: Teacher, x: torch.Tensor, y: torch.Tensor, *, lambda_adv: float = 0.0,
                   student: Student | None = None, subset: Sequence[int] | None = None,
                   lambda_bn: float = 0.0, bn_hook: BNStatLoss | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(f_t(x), y) + lambda_adv * L_adv + lambda_bn * L_bn`` and its parts (as floats)."""
    t_logits = teacher.logits(x)
    ce = F.cross_entropy(t_logits, y)
    loss = ce
    parts = {"ce": float(ce.detach())}
    if bn_hook is not None:
        bn = bn_hook.pop()
        if bn is not None and lambda_bn > 0:
            loss = loss + lambda_bn * bn
            parts["bn"] = float(bn.detach())
    if lambda_adv > 0 and student is not None:
        adv = adversarial_loss(t_logits, student(x), y, subset)
        loss = loss + lambda_adv * adv
        parts["adv"] = float(adv.detach())
    return loss, parts


# ------------------------------------------------------------------------------ functional Adam

@dataclass
class AdamState:
    step: int = 0
    exp_avg: Params = field(default_factory=dict)
    exp_avg_sq: Params = field(default_factory=dict)


def adam_update(params: Params, grads: Params, state: AdamState, *, lr: float | dict[str, float],
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Params:
    """One Adam step (same arithmetic as ``torch.optim.Adam``) on a dict; returns new leaf tensors."""
    state.step += 1
    b1, b2 = betas
    bc1 = 1 - b1 ** state.step
    bc2 = 1 - b2 ** state.step
    out: Params = {}
    for k, p in params.items():
        g = grads[k]
        m = state.exp_avg.get(k)
        v = state.exp_avg_sq.get(k)
        m = g * (1 - b1) if m is None else m * b1 + g * (1 - b1)
        v = g * g * (1 - b2) if v is None else v * b2 + g * g * (1 - b2)
        state.exp_avg[k], state.exp_avg_sq[k] = m, v
        step_lr = lr[k] if isinstance(lr, dict) else lr
        denom = (v / bc2).sqrt() + eps
        out[k] = (p.detach() - step_lr * (m / bc1) / denom).requires_grad_(True)
    return out


# ----------------------------------------------------------------------------------- inversion

@dataclass
class InversionResult:
    params: Params                 # the adapted generator parameters phi_t (detached)
    z: torch.Tensor                # the adapted latents
    images: torch.Tensor           # float [n, C, H, W] in [0, 1], from the adapted generator
    labels: torch.Tensor           # int64 [n], the teacher's local classes
    last_grads: Params             # gradient w.r.t. phi_t at the last inner step (FOMAML)
    losses: list[dict[str, float]]  # per inner step
    final_ce: float                # teacher CE on ``images``


def class_targets(num_classes: int, per_class: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def sample_shifts(steps: int, jitter: int, rng: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Per inner step, a random (rows, columns) shift in ``[-jitter, jitter]`` (int64 ``[steps, 2]``);
    ``None`` without jitter (then nothing is drawn from ``rng``)."""
    if jitter <= 0:
        return None
    return torch.randint(-jitter, jitter + 1, (steps, 2), generator=rng).to(device)


def roll_images(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``torch.roll(x, shift, dims=(-2, -1))`` written as index gathers, so that ``shift`` may be a
    tensor that differs per vmapped teacher (DeepInversion's jitter: the teacher sees the images
    circularly shifted by a random offset at every inner step)."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) - shift[0]) % h
    cols = (torch.arange(w, device=x.device) - shift[1]) % w
    return x.index_select(-2, rows).index_select(-1, cols)


def invert(teacher: Teacher, generator: Generator, generator_params: Params, z: torch.Tensor,
           y: torch.Tensor, *, steps: int, lr: float = 1e-3, z_lr: float = 1e-3,
           betas: tuple[float, float] = (0.5, 0.999), lambda_adv: float = 0.0,
           student: Student | None = None, subset: Sequence[int] | None = None,
           lambda_bn: float = 0.0, shifts: torch.Tensor | None = None) -> InversionResult:
    """``steps`` Adam steps on (generator parameters, z) minimising :func:`inversion_loss` for one teacher.

    With ``shifts`` (``[steps, 2]``, :func:`sample_shifts`) the teacher and the student see the
    generated images rolled by ``shifts[i]`` at inner step ``i``; the returned images are not rolled.
    ``generator`` only supplies the architecture (``functional_call``); its own parameters are
    neither read nor changed. The inputs are not modified."""
    if steps < 1:
        raise ValueError("inversion needs at least one step")
    if shifts is not None and tuple(shifts.shape) != (steps, 2):
        raise ValueError(f"shifts must be [{steps}, 2], got {list(shifts.shape)}")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in generator_params.items()}
    z = z.detach().clone().requires_grad_(True)
    state = AdamState()
    lrs = {**{k: lr for k in params}, "__z__": z_lr}
    last: Params = {}
    history: list[dict[str, float]] = []
    with torch.enable_grad(), bn_loss_hooks(teacher, lambda_bn) as hook:
        for i in range(steps):
            x = functional_call(generator, params, (z,))
            if shifts is not None:
                x = roll_images(x, shifts[i])
            loss, parts = inversion_loss(teacher, x, y, lambda_adv=lambda_adv, student=student,
                                         subset=subset, lambda_bn=lambda_bn, bn_hook=hook)
            grads = torch.autograd.grad(loss, [*params.values(), z])
            last = {k: g.detach() for k, g in zip(params, grads[:-1])}
            both = adam_update({**params, "__z__": z}, {**last, "__z__": grads[-1].detach()}, state,
                               lr=lrs, betas=betas)
            z = both.pop("__z__")
            params = both
            history.append(parts)
    with torch.no_grad():
        images = functional_call(generator, params, (z,))
        final_ce = float(F.cross_entropy(teacher.logits(images), y))
    return InversionResult({k: v.detach() for k, v in params.items()}, z.detach(), images.detach(),
                           y.detach(), last, history, final_ce)


def sample_latents(n: int, nz: int, rng: torch.Generator, device: torch.device | str) -> torch.Tensor:
    return torch.randn(n, nz, generator=rng).to(device)


def new_generator(nz: int, ngf: int, image_size: int, channels: int, rng: torch.Generator,
                  device: torch.device | str = "cpu") -> Generator:
    """A freshly initialised generator whose initialisation is drawn from ``rng`` (not the global RNG)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = Generator(nz=nz, ngf=ngf, image_size=image_size, channels=channels)
    return gen.to(device)


def scratch_draws(teacher: Teacher, *, nz: int, ngf: int, image_size: int, channels: int, steps: int,
                  per_class: int, jitter: int, rng: torch.Generator, device: torch.device | str = "cpu"
                  ) -> tuple[Generator, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a scratch inversion of ``teacher`` draws from ``rng``, in this order: a fresh generator,
    the latents, the jitter shifts. Returns (generator, targets, latents, shifts)."""
    gen = new_generator(nz, ngf, image_size, channels, rng, device)
    y = class_targets(teacher.num_classes, per_class, device)
    z = sample_latents(len(y), nz, rng, device)
    return gen, y, z, sample_shifts(steps, jitter, rng, device)


def invert_from_scratch(teacher: Teacher, *, nz: int, ngf: int, image_size: int, channels: int,
                        steps: int, per_class: int, rng: torch.Generator,
                        device: torch.device | str = "cpu", lr: float = 1e-3, z_lr: float = 1e-3,
                        betas: tuple[float, float] = (0.5, 0.999), lambda_adv: float = 0.0,
                        student: Student | None = None, subset: Sequence[int] | None = None,
                        lambda_bn: float = 0.0, jitter: int = 0) -> InversionResult:
    """The ``scratch`` baseline: a fresh generator for this model, ``steps`` inversion steps."""
    gen, y, z, shifts = scratch_draws(teacher, nz=nz, ngf=ngf, image_size=image_size, channels=channels,
                                      steps=steps, per_class=per_class, jitter=jitter, rng=rng, device=device)
    return invert(teacher, gen, dict(gen.named_parameters()), z, y, steps=steps, lr=lr, z_lr=z_lr,
                  betas=betas, lambda_adv=lambda_adv, student=student, subset=subset,
                  lambda_bn=lambda_bn, shifts=shifts)


class MetaGenerator:
    """The meta-generator ``phi`` and its Adam optimiser; :meth:`step` is one FIVE step over T teachers."""

    def __init__(self, *, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3,
                 inner_steps: int = 5, inner_lr: float = 1e-3, z_lr: float = 1e-3,
                 meta_lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.999),
                 samples_per_class: int = 20, lambda_bn: float = 0.0, jitter: int = 0,
                 rng: torch.Generator | None = None, device: torch.device | str = "cpu"):
        self.rng = rng if rng is not None else torch.Generator().manual_seed(0)
        self.device = torch.device(device)
        self.generator = new_generator(nz, ngf, image_size, channels, self.rng, self.device)
        self.nz, self.inner_steps, self.inner_lr, self.z_lr = nz, inner_steps, inner_lr, z_lr
        self.betas, self.samples_per_class, self.lambda_bn = betas, samples_per_class, lambda_bn
        self.jitter = jitter
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=meta_lr, betas=betas)

    @classmethod
    def from_config(cls, cfg, *, rng: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> "MetaGenerator":
        """The meta-generator that a :class:`~free_dfml.common.config.FreeConfig` ``cfg`` sets up: its
        ``generator`` section, at the ``learner`` section's image size and channels."""
        g, lrn = cfg.generator, cfg.learner
        return cls(nz=g.nz, ngf=g.ngf, image_size=lrn.image_size, channels=lrn.channels,
                   inner_steps=g.inner_steps, inner_lr=g.lr, z_lr=g.z_lr, meta_lr=g.meta_lr,
                   betas=tuple(g.betas), samples_per_class=g.samples_per_class,
                   lambda_bn=g.lambda_bn, jitter=g.jitter, rng=rng, device=device)

    def params(self) -> Params:
        return {k: v.detach() for k, v in self.generator.named_parameters()}

    def draw(self, teacher: Teacher, steps: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What adapting to ``teacher`` draws from ``self.rng``, in this order: the latents, then the
        jitter shifts. Returns (targets, latents, shifts)."""
        y = class_targets(teacher.num_classes, self.samples_per_class, self.device)
        z = sample_latents(len(y), self.nz, self.rng, self.device)
        shifts = sample_shifts(self.inner_steps if steps is None else steps, self.jitter, self.rng, self.device)
        return y, z, shifts

    def adapt(self, teacher: Teacher, *, steps: int | None = None, lambda_adv: float = 0.0,
              student: Student | None = None, subset: Sequence[int] | None = None) -> InversionResult:
        """Specialise the current meta-generator to one teacher (no meta-update)."""
        steps = self.inner_steps if steps is None else steps
        y, z, shifts = self.draw(teacher, steps)
        return invert(teacher, self.generator, self.params(), z, y, steps=steps, lr=self.inner_lr,
                      z_lr=self.z_lr, betas=self.betas, lambda_adv=lambda_adv, student=student,
                      subset=subset, lambda_bn=self.lambda_bn, shifts=shifts)

    def step(self, teachers: Sequence[Teacher], *, lambda_adv: float = 0.0,
             student: Student | None = None,
             subsets: Sequence[Sequence[int] | None] | None = None) -> list[InversionResult]:
        """One FIVE step: inner loops for every teacher, FOMAML meta-update of phi; all results returned."""
        if not teachers:
            raise ValueError("a FIVE step needs at least one teacher")
        results = [self.adapt(t, lambda_adv=lambda_adv, student=student,
                              subset=None if subsets is None else subsets[i])
                   for i, t in enumerate(teachers)]
        self.meta_update(results)
        return results

    def meta_update(self, results: Sequence[InversionResult]) -> None:
        """FOMAML: ``phi.grad`` = the sum, in teacher order, of each copy's last-step gradient; one Adam step."""
        self.optimizer.zero_grad(set_to_none=True)
        for name, p in self.generator.named_parameters():
            p.grad = torch.stack([r.last_grads[name] for r in results]).sum(0)
        self.optimizer.step()
