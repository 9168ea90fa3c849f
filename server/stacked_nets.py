"""The networks of one stacked inversion: T teachers, T generator copies and the meta-learner, run as
one batch for :func:`~free_dfml.server.stacked_inversion.invert_stacked`.

Two implementations with one interface (``images``, ``roll``, ``teachers``, ``student``,
``stacked``, ``close``):

* :class:`VmapNets`: any module. The teachers' weights and buffers (BatchNorm running statistics,
  input normalisation) are stacked with :func:`torch.func.stack_module_state` and called through
  ``vmap`` + ``functional_call`` (eval mode: nothing is written in place), the T generator copies
  ``phi_t`` the same way, and the meta-learner with per-teacher cloned buffers (BatchNorm in train
  mode, so running statistics never leak between teachers). Images travel as ``[T, n, C, H, W]``.
* :class:`GroupedNets`: Conv4 teachers, a Conv4 meta-learner and the
  :class:`~free_dfml.server.generator.Generator` as grouped convolutions
  (:mod:`~free_dfml.server.grouped_nets`): no per-operator batching rules and no layout copies
  around each layer. Images travel in the grouped layout ``[n, T*C, H, W]``.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from free_dfml.server import grouped_nets
from free_dfml.server.generator import Generator, to_teacher_input
from free_dfml.server.meta_generator import BNStatLoss, Params, Teacher, roll_images


class StackedTeachers:
    """Same-structure teachers as one vmapped function ``x [T, n, C, H, W] -> logits [T, n, K]``
    (and, with ``bn_hooks``, the DeepInversion BN statistic loss of each teacher)."""

    def __init__(self, teachers: Sequence[Teacher], *, bn_hooks: bool = False):
        if not teachers:
            raise ValueError("no teachers to stack")
        self.input_shape = tuple(teachers[0].input_shape)
        models = [t.model for t in teachers]
        self.params, self.buffers = stack_module_state(models)
        self.params = {k: v.detach() for k, v in self.params.items()}
        # the skeleton whose tensors functional_call swaps out; never run with its own tensors
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base.eval()
        self.hook = BNStatLoss(self.base) if bn_hooks else None

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


def _stacked_student(student_model: nn.Module, T: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen meta-learner on T image batches at once: frozen parameters, per-teacher cloned buffers."""
    params = {k: v.detach() for k, v in student_model.named_parameters()}
    bufs = {k: v.detach().unsqueeze(0).expand(T, *v.shape).clone()
            for k, v in student_model.named_buffers()}

    def one(b: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(student_model, ({**params, **b},), (x,))

    return lambda x: vmap(one)(bufs, x)


class VmapNets:
    """Any module: teachers, generator copies and the learner through ``vmap`` + ``functional_call``."""

    name = "vmap"

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
        """The meta-learner's logits ``[T, n, way]`` on each teacher's images."""
        return self.s_fn(x)

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Images as ``[T, n, C, H, W]``."""
        return x

    def close(self) -> None:
        self.stack.close()


class GroupedNets:
    """Conv4 teachers and learner and the Generator as grouped convolutions."""

    name = "grouped-conv"

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


def nets_for(teachers: Sequence[Teacher], generator: Generator, student_model: nn.Module | None,
             prefer_grouped: bool) -> type[VmapNets] | type[GroupedNets]:
    """:class:`GroupedNets` when preferred and it can run these networks, else :class:`VmapNets`."""
    if prefer_grouped and GroupedNets.usable(teachers, generator, student_model):
        return GroupedNets
    return VmapNets
