"""The inversion engine: how one FIVE step runs the inner loops of its T teachers.

A FIVE step (:mod:`~free_dfml.server.meta_generator`) adapts a copy of the meta-generator to each
teacher for ``k`` inner steps, then meta-updates ``phi`` with the summed last-step gradients. Three
engines do this with the same arithmetic (their results agree to float rounding,
tests/test_benchmarks.py) at different speeds:

* ``loop``: :meth:`MetaGenerator.step`, a Python loop over the teachers;
* ``vmap``: teachers of one structure stacked and run through ``torch.func.vmap``
  (:mod:`~free_dfml.server.stacked_inversion`, :class:`~free_dfml.server.stacked_nets.VmapNets`);
* ``grouped``: the same, with Conv4 teachers and learner and the Generator as grouped convolutions
  (:class:`~free_dfml.server.stacked_nets.GroupedNets`); groups it cannot run go through ``vmap``.

In the batched engines the latents are drawn in the loop's order (same random streams), a teacher
alone in its structure group runs the plain loop, and the meta-update is the loop's.

The trainer takes its engine when it is built (:func:`inversion_engine`: ``"auto"`` is ``grouped``
on CUDA, where it is faster than the loop, and ``loop`` on CPU, where it is not).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from free_dfml.server.meta_generator import InversionResult, MetaGenerator, Teacher
from free_dfml.server.stacked_inversion import frozen_student, invert_many

ENGINES = ("loop", "vmap", "grouped")
CHOICES = ("auto",) + ENGINES


class InversionEngine:
    """One FIVE step over ``teachers``: inner loops, FOMAML meta-update of ``metagen``; every
    teacher's :class:`~free_dfml.server.meta_generator.InversionResult`, in order.

    ``student_model`` is the meta-learner (frozen during the step) for the adversarial term, used
    when ``lambda_adv`` > 0; ``subsets[i]`` the teacher classes it sees for teacher i."""

    name: str

    def five_step(self, metagen: MetaGenerator, teachers: Sequence[Teacher], *, lambda_adv: float = 0.0,
                  student_model: nn.Module | None = None,
                  subsets: Sequence[Sequence[int] | None] | None = None) -> list[InversionResult]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class LoopEngine(InversionEngine):
    """The sequential loop, :meth:`MetaGenerator.step`."""

    name = "loop"

    def five_step(self, metagen: MetaGenerator, teachers: Sequence[Teacher], *, lambda_adv: float = 0.0,
                  student_model: nn.Module | None = None,
                  subsets: Sequence[Sequence[int] | None] | None = None) -> list[InversionResult]:
        student = None if student_model is None or lambda_adv <= 0 else frozen_student(student_model)
        return metagen.step(teachers, lambda_adv=lambda_adv, student=student, subsets=subsets)


class BatchedEngine(InversionEngine):
    """Same-structure teachers stacked: ``grouped`` (grouped convolutions where they apply, else
    ``vmap``) or ``vmap``."""

    def __init__(self, name: str = "grouped"):
        if name not in ("vmap", "grouped"):
            raise ValueError(f"a batched engine is 'vmap' or 'grouped', got {name!r}")
        self.name = name

    def five_step(self, metagen: MetaGenerator, teachers: Sequence[Teacher], *, lambda_adv: float = 0.0,
                  student_model: nn.Module | None = None,
                  subsets: Sequence[Sequence[int] | None] | None = None) -> list[InversionResult]:
        if not teachers:
            raise ValueError("a FIVE step needs at least one teacher")
        ys, zs, shifts = zip(*[metagen.draw(t) for t in teachers])   # the loop's draws, in its order
        phi = metagen.params()
        results = invert_many(teachers, metagen.generator, [phi] * len(teachers), zs, ys,
                              steps=metagen.inner_steps, lr=metagen.inner_lr, z_lr=metagen.z_lr,
                              betas=metagen.betas, lambda_adv=lambda_adv, student_model=student_model,
                              subsets=subsets, lambda_bn=metagen.lambda_bn, shifts=shifts,
                              grouped_conv=self.name == "grouped")
        metagen.meta_update(results)
        return results


def get_engine(name: str) -> InversionEngine:
    """The engine called ``name`` (one of :data:`ENGINES`)."""
    if name == "loop":
        return LoopEngine()
    if name in ("vmap", "grouped"):
        return BatchedEngine(name)
    raise ValueError(f"inversion engine must be one of {', '.join(CHOICES)}, got {name!r}")


def engine_name(choice: str, device: torch.device | str) -> str:
    """The engine a configured ``choice`` (``generator.engine``) means on ``device``: ``"auto"`` is
    ``grouped`` on CUDA and ``loop`` elsewhere."""
    if choice == "auto":
        return "grouped" if torch.device(device).type == "cuda" else "loop"
    if choice not in ENGINES:
        raise ValueError(f"inversion engine must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def inversion_engine(choice: str, device: torch.device | str) -> InversionEngine:
    """The engine a trainer on ``device`` runs for the configured ``choice`` (see :func:`engine_name`)."""
    return get_engine(engine_name(choice, device))
