"""Never train on poison numerics: a copy of the trainer's state before every step; after the step,
a check that its metrics and the learner's and generator's weights are finite. On a non-finite step
the teachers that caused it are found, quarantined (reason :data:`NONFINITE_REASON`, with their
scores), their images dropped from the memory bank, and the state before the step restored, so the
next iteration trains without them.

A teacher is held responsible when its inversion in the step gave a non-finite cross-entropy or
images, or when its outputs are non-finite on a fixed uniform probe batch or on the step's finite
recovered images of the other teachers. A non-finite step with no teacher found is an error
(:class:`NonFiniteStep`): training stops on the restored state rather than loop.

The copy holds the learner, the generator, both optimizers, the random streams, the iteration and
the history length; the memory bank is not copied (it can be large): the culprits' keys are removed
from it instead (images stored as uint8 are clamped, never non-finite).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from free_dfml.server.quarantine import NONFINITE_REASON, Quarantine


class NonFiniteStep(RuntimeError):
    """A training step went non-finite and no teacher could be blamed."""


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(v).all() for v in tensors if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _json_number(x: float) -> float | str:
    return round(float(x), 5) if _finite(x) else str(float(x))


class StepGuard:
    def __init__(self, trainer, quarantine: Quarantine):
        self.trainer, self.quarantine = trainer, quarantine
        self._snap: dict[str, Any] | None = None
        self.recovered: list[dict[str, Any]] = []     # one entry per non-finite step survived

    # ------------------------------------------------------------------------------ state
    def before(self) -> None:
        """Copy the state the next step starts from."""
        t = self.trainer
        self._snap = {
            "learner": {k: v.detach().clone() for k, v in t.learner.state_dict().items()},
            "generator": {k: v.detach().clone() for k, v in t.metagen.generator.state_dict().items()},
            "opt_generator": copy.deepcopy(t.metagen.optimizer.state_dict()),
            "opt_learner": copy.deepcopy(t.meta.optimizer.state_dict()),
            "rng": t.rng.get_state(), "gen_rng": t.gen_rng.get_state(),
            "iteration": t.iteration, "history": len(t.history)}

    def restore(self) -> None:
        s, t = self._snap, self.trainer
        if s is None:
            raise RuntimeError("no state to restore (before() was not called)")
        t.learner.load_state_dict(s["learner"])
        t.metagen.generator.load_state_dict(s["generator"])
        t.metagen.optimizer.load_state_dict(s["opt_generator"])
        t.meta.optimizer.load_state_dict(s["opt_learner"])
        t.rng.set_state(s["rng"])
        t.gen_rng.set_state(s["gen_rng"])
        t.iteration = s["iteration"]
        del t.history[s["history"]:]

    # ------------------------------------------------------------------------------ checks
    def problems(self, metrics: dict[str, Any]) -> list[str]:
        """What is non-finite after a step (empty: all finite)."""
        t = self.trainer
        bad = [f"metric {k}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if not _all_finite(t.learner.state_dict().values()):
            bad.append("learner weights")
        if not _all_finite(t.metagen.generator.state_dict().values()):
            bad.append("generator weights")
        return bad

    def culprits(self) -> dict[str, dict[str, Any]]:
        """The step's teachers held responsible, with their scores."""
        t = self.trainer
        steps = list(t.last_inversions)
        lrn = t.cfg.learner
        gen = torch.Generator().manual_seed(0)
        probe = torch.rand((4, lrn.channels, lrn.image_size, lrn.image_size), generator=gen).to(t.device)
        finite_images = {mid: bool(torch.isfinite(x).all()) for mid, _, x in steps}
        found: dict[str, dict[str, Any]] = {}
        for mid, ce, _images in steps:
            others = [x for m, _, x in steps if m != mid and finite_images[m]]
            with torch.no_grad():
                teacher = t._teacher(mid)
                out_probe = _all_finite([teacher.logits(probe)])
                out_images = _all_finite([teacher.logits(x) for x in others[:2]])
            scores = {"inversion_ce": _json_number(ce), "images_finite": finite_images[mid],
                      "probe_outputs_finite": out_probe, "recovered_image_outputs_finite": out_images}
            if not (_finite(ce) and finite_images[mid] and out_probe and out_images):
                found[mid] = scores
        return found

    def recover(self, problems: list[str]) -> list[str]:
        """Find the culprits, restore the state before the step, quarantine them; their ids."""
        t = self.trainer
        iteration = t.iteration            # the failed step's number (before restoring)
        found = self.culprits()
        self.restore()
        if not found:
            raise NonFiniteStep(f"training step {iteration} went non-finite ({', '.join(problems[:4])}) "
                                "and no teacher was found responsible; state before it restored")
        for mid, scores in found.items():
            self.quarantine.add(mid, NONFINITE_REASON,
                                {**scores, "iteration": iteration, "problems": ", ".join(problems[:4])},
                                source="training")
            t.bank.drop_model(mid)
        self.recovered.append({"iteration": iteration, "quarantined": sorted(found), "problems": problems[:4]})
        return sorted(found)
