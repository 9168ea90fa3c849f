"""FREE's configuration tree: :class:`FreeConfig`, one section per part of the method.

======================  ===================================================================
section                 what it configures
======================  ===================================================================
``cfg.generator``       FIVE: the meta-generator, its ``k`` inner steps per teacher, the
                        inversion loss, the scratch baseline and the inversion engine
``cfg.bank``            the memory bank of recovered images
``cfg.bell``            BELL, the sequential distillation + Reptile-style alignment step
``cfg.replay``          MAML replay of episodes drawn from the bank
``cfg.learner``         the meta-learner: task (``way``), input, architecture, and the
                        adaptation (inner lr, steps) used by replay and evaluation alike
``cfg.schedule``        teachers per iteration, iterations, warm-up, evaluation and
                        checkpoint cadence, seed
======================  ===================================================================

``to_dict()`` gives the nested form (``{"generator": {"nz": 256, ...}, ...}``); ``from_dict()``
takes it, dotted keys (``"generator.lr"``) and the flat keys of the single-level config this tree
replaced (``"gen_lr"``, ``"bank_capacity"``, ...: old checkpoints, ``--set 'free={...}'``, old
``[free]`` tables), each mapped to its section by :data:`FLAT_KEYS`. An unknown key is a
``ValueError`` naming it. Pure dataclasses: no torch import (the ClientApp and the CLIs import this
module cheaply). Docs: docs/algorithm.md, "Configuration".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ENGINES = ("auto", "loop", "grouped", "vmap")
INVERSIONS = ("five", "scratch")
AUGMENTS = ("none", "color")


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of range: ``key = value: expected ...``, with
    the key as the user gave it (``way``, ``learner.way``), so the caller can prefix where it came
    from (``[free] way = "five": expected an integer``)."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key} = {show_value(value)}: expected {expected}")


def show_value(value: Any, limit: int = 60) -> str:
    """A value as it would be written in a TOML/JSON file, cut to ``limit`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and (not isinstance(v, float) or v == v and abs(v) != float("inf")))


def type_problem(default: Any, value: Any) -> str | None:
    """What ``value`` should be, given the field's default (None: it is of the right type):
    bool, integer, finite number, string, a list of numbers (the normalisation, None too) or a
    pair of numbers (``betas``)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if _is_int(value) else "an integer"
    if isinstance(default, float):
        return None if _is_number(value) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(_is_number, value))
        return None if ok else f"a list of {len(default)} numbers"
    if default is None:
        ok = value is None or (isinstance(value, (list, tuple)) and value and all(map(_is_number, value)))
        return None if ok else "a list of numbers (or null)"
    return None


def _field_default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default


@dataclass
class GeneratorConfig:
    """FIVE: one meta-generator ``phi`` adapted to each teacher in ``inner_steps`` Adam steps."""

    nz: int = 256                       # latent size
    ngf: int = 64                       # generator width
    inner_steps: int = 5                # k: Adam steps on (phi_t, z) per teacher
    samples_per_class: int = 20         # m: images per teacher class per FIVE step
    lr: float = 1e-3                    # inner Adam on phi_t
    z_lr: float = 1e-3                  # inner Adam on the latents z
    meta_lr: float = 1e-3               # outer Adam on phi
    betas: tuple[float, float] = (0.5, 0.999)   # of every generator Adam (inner, outer, scratch)
    lambda_adv: float = 1.0             # weight of L_adv (after the warm-up)
    lambda_bn: float = 0.0              # weight of DeepInversion's BN-statistics term (BN teachers only)
    # DeepInversion jitter: the teacher (and L_adv's meta-learner) sees the generated images
    # circularly shifted by a random offset of up to this many pixels at every inner step; 0: off
    jitter: int = 0
    inversion: str = "five"             # "five" | "scratch" (a fresh generator per teacher, the baseline)
    scratch_steps: int = 200            # steps of a fresh generator (inversion = "scratch")
    # how a FIVE step runs its T teachers (server/inversion_engine.py; the same results to float
    # rounding): "loop" one after another; "vmap" same-architecture teachers together through
    # torch.func.vmap; "grouped" the same with Conv4s and the generator as grouped convolutions
    # (else vmap); "auto": grouped on CUDA, the loop on CPU
    engine: str = "auto"


@dataclass
class BankConfig:
    """The memory bank: a ring of recovered images per (model, class) key, bounded as a whole."""

    capacity: int = 400                 # images per key's ring
    dtype: str = "uint8"                # "uint8" | "float16"
    max_mb: float = 1024.0              # whole-bank bound; the longest-unwritten keys go first (0: none)
    global_classes: bool = True         # key by class label when packages share labels


@dataclass
class BellConfig:
    """BELL: sequential distillation from the iteration's teachers, then ``theta += beta (theta' - theta)``."""

    enabled: bool = True                # False: the "free-noalign" ablation
    # lr 1e-4 with adam: chosen on glyph meta-val over seeds (docs/findings.md); at 1e-3 the
    # learner's head norm can keep growing and leave it at chance
    lr: float = 1e-4
    optimizer: str = "adam"             # "adam" (a fresh state every iteration) | "sgd"
    beta: float = 0.5                   # Reptile step size
    head: bool = True                   # False: the interpolation leaves the linear head as it was


@dataclass
class ReplayConfig:
    """MAML on episodes from the bank, until the meta-batch accuracy stalls (or the cap)."""

    meta_batch: int = 10                # episodes per outer step
    inner_steps: int = 5                # SGD steps on the support set (at learner.inner_lr)
    shot: int = 1
    query: int = 15
    outer_lr: float = 1e-3              # outer Adam on theta
    second_order: bool = False
    patience: int = 10                  # meta-batches without a better accuracy before stopping
    max_batches: int = 100              # hard cap per iteration
    augment: str = "none"               # "none" | "color": per-image random channel order + inversion


@dataclass
class LearnerConfig:
    """The meta-learner, and the adaptation every method gets at replay and at evaluation."""

    way: int = 5
    image_size: int = 32
    channels: int = 3
    arch: str = "conv4"
    width: int = 64
    norm: str = "bn"
    norm_mean: list[float] | None = None   # None: mean of the zoo teachers' normalisations
    norm_std: list[float] | None = None
    inner_lr: float = 0.01              # adaptation lr: replay and evaluation, every method
    adapt_steps: int = 10               # adaptation steps at evaluation (and in exported packages)


@dataclass
class ScheduleConfig:
    """What one iteration takes, how many there are, and what happens between them."""

    teachers_per_iter: int = 4          # T
    iterations: int = 1000
    warmup: int = 20                    # iterations of inversion only (no L_adv, BELL, replay)
    eval_every: int = 0                 # few-shot evaluation every so many iterations (0: never)
    eval_shot: int = 1
    checkpoint_every: int = 50
    seed: int = 0


SECTIONS: dict[str, type] = {"generator": GeneratorConfig, "bank": BankConfig, "bell": BellConfig,
                             "replay": ReplayConfig, "learner": LearnerConfig, "schedule": ScheduleConfig}

# the flat keys of the single-level config, mapped to (section, field)
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "nz": ("generator", "nz"), "ngf": ("generator", "ngf"), "inner_steps": ("generator", "inner_steps"),
    "samples_per_class": ("generator", "samples_per_class"), "gen_lr": ("generator", "lr"),
    "z_lr": ("generator", "z_lr"), "gen_meta_lr": ("generator", "meta_lr"), "gen_betas": ("generator", "betas"),
    "lambda_adv": ("generator", "lambda_adv"), "lambda_bn": ("generator", "lambda_bn"),
    "inversion_jitter": ("generator", "jitter"), "inversion": ("generator", "inversion"),
    "scratch_steps": ("generator", "scratch_steps"), "batched_inversion": ("generator", "engine"),
    "bank_capacity": ("bank", "capacity"), "bank_dtype": ("bank", "dtype"), "bank_max_mb": ("bank", "max_mb"),
    "global_classes": ("bank", "global_classes"),
    "align": ("bell", "enabled"), "bell_lr": ("bell", "lr"), "bell_optimizer": ("bell", "optimizer"),
    "beta": ("bell", "beta"), "bell_head": ("bell", "head"),
    "meta_batch": ("replay", "meta_batch"), "replay_steps": ("replay", "inner_steps"),
    "replay_shot": ("replay", "shot"), "replay_query": ("replay", "query"), "outer_lr": ("replay", "outer_lr"),
    "second_order": ("replay", "second_order"), "patience": ("replay", "patience"),
    "max_replay_batches": ("replay", "max_batches"), "replay_augment": ("replay", "augment"),
    "way": ("learner", "way"), "image_size": ("learner", "image_size"), "channels": ("learner", "channels"),
    "learner_arch": ("learner", "arch"), "learner_width": ("learner", "width"),
    "learner_norm": ("learner", "norm"), "norm_mean": ("learner", "norm_mean"),
    "norm_std": ("learner", "norm_std"), "inner_lr": ("learner", "inner_lr"),
    "eval_steps": ("learner", "adapt_steps"),
    "teachers_per_iter": ("schedule", "teachers_per_iter"), "iterations": ("schedule", "iterations"),
    "warmup": ("schedule", "warmup"), "eval_every": ("schedule", "eval_every"),
    "eval_shot": ("schedule", "eval_shot"), "checkpoint_every": ("schedule", "checkpoint_every"),
    "seed": ("schedule", "seed"),
}

# the flat ``batched_inversion`` values, as ``generator.engine``
_FLAT_ENGINE = {True: "grouped", False: "loop", "auto": "auto"}

# FreeConfig's presets: section -> field -> value over the defaults (the defaults are the paper's)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    # a CPU run of minutes. learner.inner_lr 0.1 and generator.lr 1e-2: chosen on glyph meta-val
    # (docs/findings.md)
    "quick": {"generator": dict(ngf=16, nz=64, samples_per_class=10, lr=1e-2),
              "bank": dict(capacity=100),
              "replay": dict(max_batches=10, patience=5, meta_batch=4, query=5, augment="color"),
              "learner": dict(width=32, inner_lr=0.1),
              "schedule": dict(warmup=5, iterations=60, checkpoint_every=20)},
    # tests: seconds
    "tiny": {"generator": dict(ngf=8, nz=16, samples_per_class=4, inner_steps=2),
             "bank": dict(capacity=16),
             "replay": dict(max_batches=2, patience=2, meta_batch=2, query=2),
             "learner": dict(width=8),
             "schedule": dict(teachers_per_iter=2, warmup=1, iterations=4, checkpoint_every=2)},
}


def _as_dict(v: Any) -> Any:
    return asdict(v) if hasattr(v, "__dataclass_fields__") else v


def nest(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``d`` (nested sections, dotted ``"section.field"`` keys and/or old flat keys, also inside
    their own section: ``{"generator": {"gen_lr": 0.01}}``) as ``{section: {field: value}}``;
    ``ValueError`` naming the first unknown key. A field given twice (e.g. flat and nested) is an
    error."""
    out: dict[str, dict[str, Any]] = {}

    def put(section: str, name: str, value: Any, key: str) -> None:
        known = SECTIONS[section].__dataclass_fields__
        if name not in known and FLAT_KEYS.get(name, ("",))[0] == section:
            if name == "batched_inversion" and isinstance(value, (bool, str)):
                value = _FLAT_ENGINE.get(value, value)
            name = FLAT_KEYS[name][1]       # an old flat name in its own section: [free.generator] gen_lr
        if name not in known:
            raise ValueError(f"unknown FreeConfig key {section}.{name} (section {section} has: "
                             f"{', '.join(known)})")
        if name in out.setdefault(section, {}):
            raise ValueError(f"FreeConfig key {section}.{name} given twice (as {key!r} too)")
        problem = type_problem(_field_default(SECTIONS[section], name), value)
        if problem:     # named as given; an old flat name with its field's (inversion_jitter)
            flat = key.rsplit(".", 1)[-1]
            raise ConfigError(f"{section}.{name} ({flat})" if flat != name else key, value, problem)
        out[section][name] = value

    for key, value in d.items():
        if key in SECTIONS:
            value = _as_dict(value)
            if not isinstance(value, dict):
                raise ValueError(f"FreeConfig section {key} must be a table of fields, got {value!r}")
            for name, v in value.items():
                put(key, name, v, f"{key}.{name}")
        elif "." in key and key.split(".", 1)[0] in SECTIONS:
            section, name = key.split(".", 1)
            put(section, name, value, key)
        elif key in FLAT_KEYS:
            put(FLAT_KEYS[key][0], key, value, key)
        else:
            raise ValueError(f"unknown FreeConfig key {key!r} (sections: {', '.join(SECTIONS)})")
    return out


def merge(base: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Nested ``over`` on top of nested ``base`` (field by field)."""
    out = {s: dict(v) for s, v in base.items()}
    for s, v in over.items():
        out.setdefault(s, {}).update(v)
    return out


@dataclass
class FreeConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    bell: BellConfig = field(default_factory=BellConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    # ------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, dict[str, Any]]:
        d = {s: asdict(getattr(self, s)) for s in SECTIONS}
        d["generator"]["betas"] = list(self.generator.betas)
        return d

    def flat(self) -> dict[str, Any]:
        """``{"section.field": value}`` (for diffs and one-line listings)."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FreeConfig":
        """From the nested form, dotted keys or the old flat keys (see the module docstring); validated."""
        nested = nest(d)
        gen = nested.get("generator", {})
        if "betas" in gen:
            gen["betas"] = tuple(gen["betas"])
        cfg = cls(**{s: SECTIONS[s](**nested.get(s, {})) for s in SECTIONS})
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FreeConfig":
        """``paper``: the published settings. ``quick``: a CPU run of minutes. ``tiny``: tests (seconds).
        ``overrides`` in any form :meth:`from_dict` takes (``learner_width=8``, ``learner={"width": 8}``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return cls.from_dict(merge(nest(PRESETS[name]), nest(overrides)))

    def replace(self, **overrides: Any) -> "FreeConfig":
        """A copy with ``overrides`` (any form :meth:`from_dict` takes) applied; validated."""
        return FreeConfig.from_dict(merge(self.to_dict(), nest(overrides)))

    # ---------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Every field's type, then its range: a :class:`ConfigError` naming the first bad one
        (``section.field``, with the old flat name where the message has long used it)."""
        for section, cls in SECTIONS.items():
            sec = getattr(self, section)
            for name in cls.__dataclass_fields__:
                problem = type_problem(_field_default(cls, name), getattr(sec, name))
                if problem:
                    raise ConfigError(f"{section}.{name}", getattr(sec, name), problem)
        g, b, r, lrn, s = self.generator, self.bank, self.replay, self.learner, self.schedule
        if g.inversion not in INVERSIONS:
            raise ConfigError("generator.inversion", g.inversion, "'five' or 'scratch'")
        if lrn.way < 2:
            raise ConfigError("learner.way", lrn.way, "an integer >= 2")
        if r.augment not in AUGMENTS:
            raise ConfigError("replay.augment", r.augment, "'none' or 'color'")
        if self.bell.optimizer not in ("adam", "sgd"):
            raise ConfigError("bell.optimizer", self.bell.optimizer, "'adam' or 'sgd'")
        if g.engine not in ENGINES:
            raise ConfigError("generator.engine (batched_inversion)", g.engine,
                              f"one of {', '.join(ENGINES)} (true, false or 'auto')")
        if not 0 <= g.jitter < lrn.image_size:
            raise ConfigError("generator.jitter (inversion_jitter)", g.jitter,
                              "an integer between 0 and image_size - 1")
        if b.dtype not in ("uint8", "float16"):
            raise ConfigError("bank.dtype", b.dtype, "'uint8' or 'float16'")
        if b.max_mb < 0:
            raise ConfigError("bank.max_mb", b.max_mb, "a number >= 0 (0: unbounded)")
        if lrn.channels not in (1, 3):
            raise ConfigError("learner.channels", lrn.channels, "1 or 3")
        if lrn.norm_std is not None and min(lrn.norm_std) <= 0:
            raise ConfigError("learner.norm_std", lrn.norm_std, "numbers > 0")
        for name, v in (("schedule.teachers_per_iter", s.teachers_per_iter),
                        ("generator.inner_steps", g.inner_steps),
                        ("generator.samples_per_class", g.samples_per_class),
                        ("generator.nz", g.nz), ("generator.ngf", g.ngf),
                        ("generator.scratch_steps", g.scratch_steps),
                        ("replay.meta_batch", r.meta_batch), ("replay.shot", r.shot),
                        ("replay.query", r.query), ("replay.patience", r.patience),
                        ("replay.max_batches", r.max_batches), ("bank.capacity", b.capacity),
                        ("learner.width", lrn.width), ("learner.image_size", lrn.image_size),
                        ("schedule.eval_shot", s.eval_shot)):
            if v < 1:
                raise ConfigError(name, v, "an integer >= 1")
        for name, v in (("replay.inner_steps", r.inner_steps), ("learner.adapt_steps", lrn.adapt_steps),
                        ("schedule.iterations", s.iterations), ("schedule.warmup", s.warmup),
                        ("schedule.eval_every", s.eval_every), ("schedule.checkpoint_every", s.checkpoint_every),
                        ("schedule.seed", s.seed)):
            if v < 0:
                raise ConfigError(name, v, "an integer >= 0")
        for name, v in (("generator.lr", g.lr), ("generator.z_lr", g.z_lr), ("generator.meta_lr", g.meta_lr),
                        ("bell.lr", self.bell.lr), ("bell.beta", self.bell.beta), ("replay.outer_lr", r.outer_lr),
                        ("learner.inner_lr", lrn.inner_lr)):
            if not v > 0:
                raise ConfigError(name, v, "a number > 0")
        for name, v in (("generator.lambda_adv", g.lambda_adv), ("generator.lambda_bn", g.lambda_bn)):
            if v < 0:
                raise ConfigError(name, v, "a number >= 0")
        if not all(0 <= x < 1 for x in g.betas):
            raise ConfigError("generator.betas", list(g.betas), "two numbers in [0, 1)")
        if b.max_mb:
            ring = self.bank_ring_bytes()
            if b.max_mb * 2 ** 20 < 2 * lrn.way * ring:
                raise ValueError(f"bank.max_mb (bank_max_mb) {b.max_mb} holds fewer than {2 * lrn.way} "
                                 f"classes of {b.capacity} images ({ring / 2 ** 20:.2f} MB each)")

    def bank_ring_bytes(self) -> int:
        """Bytes one bank key's ring takes (as ``MemoryBank.ring_bytes``)."""
        lrn = self.learner
        return (self.bank.capacity * lrn.channels * lrn.image_size * lrn.image_size
                * (1 if self.bank.dtype == "uint8" else 2))
