"""The data-free screen: every model is scored before training first uses it; a failing one is
quarantined (server/quarantine.py) with its reason and scores, never deleted.

Signals (no data needed; chosen by measurement, see docs/security.md "The data-free screen"):

* ``inversion_ce``: a fresh, seeded generator (the FREE generator, small) and its latents get
  ``steps`` Adam steps to make the model predict each of its classes on ``per_class`` images; the
  cross-entropy left. A trained classifier is driven to every class in a few steps (CE near 0);
  random weights and near-constant classifiers are not (CE near log(classes)).
* ``bn_mismatch``: the distance between the first BatchNorm layer's running statistics and the
  statistics of smooth random images seen through the model's CLAIMED normalisation (mean distance
  in units of the running std, plus mean absolute log-variance ratio). A model whose metadata lies
  about its normalisation sees inputs far from anything it was trained on.
* ``noise_match``: the same distance for uniform-noise images. Near 0 means the first layer was
  trained on uniform noise.

A model fails when ``inversion_ce > max_inversion_ce``, ``bn_mismatch > max_bn_mismatch`` or
``noise_match < min_noise_match`` (the BatchNorm signals only for models with BatchNorm; a DP model
uses GroupNorm). Every signal is a pure function of the package (fixed seeds, own random streams):
the verdict does not depend on arrival order or on the training state, and screening never touches
the trainer's random streams.

Verdicts are kept in ``STATE/zoo/screen.json`` (``{"version": 1, "models": {id: {"passed",
"scores", "reasons", "time"}}}``, atomically replaced): a model is screened once, also across
restarts. A failed model the operator released (``free-server quarantine release``) has a verdict
and is no longer quarantined, so it is used from then on.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from free_dfml.common.files import atomic_write_bytes
from free_dfml.server.generator import to_teacher_input
from free_dfml.server.meta_generator import Teacher, class_targets, invert, new_generator

FILE_NAME = "screen.json"
VERSION = 1
REASON_PREFIX = "failed the data-free screen"


@dataclass
class ScreenConfig:
    # thresholds: between the honest and the harmful ranges of docs/security.md, with a margin
    max_inversion_ce: float = 0.8
    max_bn_mismatch: float = 2.0
    min_noise_match: float = 0.1
    steps: int = 10                   # inversion steps
    per_class: int = 4                # inverted images a class
    ngf: int = 16
    nz: int = 64
    lr: float = 1e-2
    image_size: int = 32              # probe / inversion image side and channels (the meta-learner's)
    channels: int = 3
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.per_class < 1:
            raise ValueError("screen steps and per_class must be >= 1")


# ------------------------------------------------------------------------------------ signals

def probe_images(kind: str, n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Fixed probe images in [0, 1]: ``uniform`` noise or ``smooth`` low-frequency colour fields."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    if kind == "uniform":
        return torch.rand((n, c, h, w), generator=g)
    return F.interpolate(torch.rand((n, c, 4, 4), generator=g), size=(h, w), mode="bilinear",
                         align_corners=False)


def first_bn_distance(model: nn.Module, x: torch.Tensor) -> float:
    """How far ``x``'s statistics at the first BatchNorm layer are from that layer's running ones
    (mean distance / norm of the running std + mean |log variance ratio|); NaN without BatchNorm."""
    bn = next((m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if bn is None or bn.running_mean is None:
        return float("nan")
    seen: list[float] = []

    def hook(m, inp, _out):
        a = inp[0]
        mean = a.mean(dim=(0, 2, 3))
        var = a.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
        d_mean = (mean - m.running_mean).norm() / (m.running_var.clamp_min(0).sqrt().norm() + 1e-6)
        d_var = (var.clamp_min(1e-8).log() - m.running_var.clamp_min(1e-8).log()).abs().mean()
        seen.append(float(d_mean + d_var))
        raise _Stop

    h = bn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return seen[0] if seen else float("nan")


class _Stop(Exception):
    """Raised by the BatchNorm hook: nothing after the first BatchNorm layer is needed."""


def signals(teacher: Teacher, cfg: ScreenConfig | None = None) -> dict[str, float]:
    """The screen's signals for one model (floats; NaN where a signal does not apply), and its cost."""
    cfg = cfg or ScreenConfig()
    t0 = time.perf_counter()
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    out: dict[str, float] = {}
    for name, kind in (("bn_mismatch", "smooth"), ("noise_match", "uniform")):
        x = to_teacher_input(probe_images(kind, 64, shape, cfg.seed), teacher.input_shape)
        out[name] = first_bn_distance(teacher.model, x)
    rng = torch.Generator().manual_seed(cfg.seed)
    gen = new_generator(cfg.nz, cfg.ngf, cfg.image_size, cfg.channels, rng)
    y = class_targets(teacher.num_classes, cfg.per_class)
    z = torch.randn(len(y), cfg.nz, generator=rng)
    res = invert(teacher, gen, dict(gen.named_parameters()), z, y, steps=cfg.steps, lr=cfg.lr, z_lr=cfg.lr)
    out["inversion_ce"] = res.final_ce
    with torch.no_grad():
        p = teacher.logits(res.images).softmax(1)
        out["inversion_confidence"] = float(p.gather(1, y[:, None]).mean())
    out["seconds"] = time.perf_counter() - t0
    return out


def failures(scores: dict[str, float], cfg: ScreenConfig) -> list[str]:
    """Why ``scores`` fail the screen (empty: it passes)."""
    out = []
    ce = scores.get("inversion_ce", float("nan"))
    if not math.isfinite(ce) or ce > cfg.max_inversion_ce:
        out.append(f"inversion CE {ce:.2f} > {cfg.max_inversion_ce:g}: not driven to its classes "
                   "(random or near-constant)")
    bn = scores.get("bn_mismatch", float("nan"))
    if math.isfinite(bn) and bn > cfg.max_bn_mismatch:
        out.append(f"first-layer statistics {bn:.2f} from natural-looking inputs under its normalisation "
                   f"(> {cfg.max_bn_mismatch:g}): the normalisation metadata does not fit the weights")
    nm = scores.get("noise_match", float("nan"))
    if math.isfinite(nm) and nm < cfg.min_noise_match:
        out.append(f"first-layer statistics match uniform noise ({nm:.3f} < {cfg.min_noise_match:g}): "
                   "trained on noise")
    return out


# ------------------------------------------------------------------------------------ screen

class Screen:
    """Screens a zoo's models once each; quarantines the failing ones. Thread-safe."""

    def __init__(self, zoo, cfg: ScreenConfig | None = None, *, log: Callable[[str], None] | None = None):
        self.zoo, self.cfg = zoo, cfg or ScreenConfig()
        self.cfg.check()
        self.path = Path(zoo.root) / FILE_NAME
        self.log = log
        self._mutex = threading.Lock()
        self._doc = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            models = doc.get("models") if isinstance(doc, dict) else None
            if isinstance(models, dict):
                return {"version": VERSION, "models": {k: v for k, v in models.items() if isinstance(v, dict)}}
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            pass
        return {"version": VERSION, "models": {}}

    def _write(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self._doc, indent=1, sort_keys=True) + "\n").encode())

    def verdicts(self) -> dict[str, dict[str, Any]]:
        with self._mutex:
            return dict(self._doc["models"])

    def score(self, model_id: str) -> dict[str, Any]:
        """Score one model now (not recorded): passed, scores, reasons."""
        meta = self.zoo.meta(model_id)
        teacher = Teacher(self.zoo.teacher(model_id, "cpu"), tuple(meta.input_shape), meta.num_classes,
                          model_id, meta.is_dp)
        with torch.random.fork_rng(devices=[]):
            scores = signals(teacher, self.cfg)
        reasons = failures(scores, self.cfg)
        return {"passed": not reasons, "scores": {k: _num(v) for k, v in scores.items()}, "reasons": reasons}

    def check(self, model_id: str) -> bool:
        """Screen ``model_id`` unless it has a verdict; quarantine it if it fails. True: it passed
        (or has been screened before: the quarantine decides whether it is used)."""
        with self._mutex:
            known = self._doc["models"].get(model_id)
            if known is not None:
                return bool(known.get("passed"))
            v = self.score(model_id)
            if not v["passed"]:
                self.zoo.quarantine.add(model_id, f"{REASON_PREFIX}: " + "; ".join(v["reasons"]),
                                        {**v["scores"], **{"threshold_" + k: x for k, x in _limits(self.cfg).items()}},
                                        source="screen")
            self._doc["models"][model_id] = {**v, "time": round(time.time(), 3)}
            self._write()
        if self.log is not None:
            self.log(f"screen: model {model_id[:12]} {'passed' if v['passed'] else 'QUARANTINED'} "
                     f"({', '.join(f'{k} {x}' for k, x in v['scores'].items())})")
        return v["passed"]

    def usable(self, ids: list[str]) -> list[str]:
        """``ids`` (already without quarantined ones) minus those that fail the screen now."""
        return [m for m in ids if self.check(m) or m not in self.zoo.quarantine.ids()]


def _num(v: float) -> float | str:
    return round(float(v), 4) if math.isfinite(v) else str(float(v))


def _limits(cfg: ScreenConfig) -> dict[str, float]:
    return {"max_inversion_ce": cfg.max_inversion_ce, "max_bn_mismatch": cfg.max_bn_mismatch,
            "min_noise_match": cfg.min_noise_match}


def screen_config(settings=None, learner=None) -> ScreenConfig:
    """The screen's config: the server settings' ``screen_*`` thresholds (defaults otherwise), probes
    at the meta-learner's image size and channels (a FreeConfig ``learner`` section)."""
    cfg = ScreenConfig()
    if learner is not None:
        cfg.image_size, cfg.channels = int(learner.image_size), int(learner.channels)
    for k in ("max_inversion_ce", "max_bn_mismatch", "min_noise_match"):
        v = getattr(settings, f"screen_{k}", None)
        if v is not None:
            setattr(cfg, k, float(v))
    return cfg
