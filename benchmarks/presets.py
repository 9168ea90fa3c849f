"""Benchmark presets: a study of the one registry plus the harness's own probe settings.

``tiny`` (the harness's smoke test, seconds), ``quick`` (2 CPU cores, under 30 minutes), ``paper``
(alias ``full``: paper-size settings, for a GPU). ``p.study`` is
:func:`free_dfml.common.presets.study` of the same name: the data, the clients of the main zoo,
FREE's :class:`~free_dfml.common.config.FreeConfig` (every FREE-family method starts from
``p.study.free``) and the evaluation protocol. The fields of :class:`Preset` are what only the
harness has: worker processes, the held-out models, the methods of the accuracy table and the
sizes of the recovery, batched-inversion, heterogeneity and scaling probes.

What never changes between methods or presets (the field's evaluation protocol): 600 meta-test
episodes for the accuracy table (``tiny`` alone uses fewer: it only checks the plumbing), 15 queries
a class, 10 adaptation steps, the same inner learning rate and the same episode seed for every
method.

``--set`` (:func:`get_preset`) takes a probe field (``workers=1``), a study field as
``section.field`` (``clients.count=8``, ``free.generator.lr=0.01``, ``evaluation.episodes=100``),
a section as a JSON object (``free={"generator": {"lr": 0.01}}``; FREE's old flat keys work there
too), or one of the flat names of earlier versions (:data:`STUDY_KEYS`: ``clients=8``,
``iterations=1000``, ``client_width=16`` (the clients' and the meta-learner's), ...), and
``free_preset=paper`` (FREE from another FreeConfig preset, the study's own FREE fields kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

from free_dfml.common.config import FreeConfig
from free_dfml.common.presets import Study, canonical, study

# the accuracy section's methods (benchmarks/accuracy.py), in table order
METHODS = ("random", "average", "scratch", "free-noalign", "free", "oracle")


@dataclass
class Preset:
    name: str = "quick"
    study: Study = field(default_factory=lambda: study("quick"))
    workers: int = 2                   # parallel worker processes (1 torch thread each on CPU)
    threads_per_worker: int = 1
    heldout_clients: int = 4           # extra models, never seen in training (recovery benchmark)
    methods: tuple[str, ...] = METHODS     # the accuracy section's methods (a subset, e.g. with --set)
    oracle_batches: int | None = None  # MAML meta-batches on real data; None: iterations * replay.max_batches
    main_zoo: str | None = None        # an earlier run's work folder (--keep-work) whose main zoo to reuse
    # recovery speed ----------------------------------------------------------------------------
    recovery_models: int = 4           # held-out models probed
    recovery_five_steps: int = 30      # FIVE (meta-initialised) steps recorded
    recovery_scratch_steps: int = 200  # scratch steps recorded
    recovery_confidence: float = 0.9   # an image "agrees" when the teacher gives its target >= this
    recovery_targets: tuple[float, ...] = (0.5, 0.8, 0.9)
    # batched inversion ---------------------------------------------------------------------------
    batched_T: tuple[int, ...] = (4, 16, 64)
    batched_width: int = 16
    batched_repeats: int = 2
    batched_samples_per_class: int | None = 4   # None: the FreeConfig's m (memory grows with T * m)
    # heterogeneity -------------------------------------------------------------------------------
    hetero_clients: int = 9
    hetero_archs: tuple[str, ...] = ("conv4", "resnet10", "resnet18")
    hetero_widths: tuple[int, ...] = (32, 16, 16)
    hetero_image_sizes: tuple[int, ...] = (32, 64)   # the domain zoo mixes these input sizes
    hetero_iterations: int = 60
    hetero_eval_shots: tuple[int, ...] = (1,)
    hetero_methods: tuple[str, ...] = ("random", "average", "free-noalign", "free")
    # scaling -------------------------------------------------------------------------------------
    scaling_sizes: tuple[int, ...] = (100, 300, 1000)
    scaling_iterations: int = 5
    scaling_width: int = 8
    scaling_cache: int = 16            # Zoo teacher LRU cache size
    scaling_bank_mb: float = 8.0       # FreeConfig bank.max_mb there: small, so that the bound is exercised
    # trust (harmful models, the data-free screen; benchmarks/trust.py) -------------------------------
    trust_levels: tuple[int, ...] = (0, 20, 40)    # harmful share of the zoo, percent
    trust_honest: int = 8
    trust_weak: int = 3
    trust_client_epochs: int = 10
    trust_iterations: int = 20
    trust_episodes: int = 200
    trust_learner_width: int = 16
    # generation cost, time to accuracy, equal time (benchmarks/cost.py, time_to_accuracy.py, equal_time.py)
    cost_iterations: int = 5           # inversion iterations timed per method (after one untimed)
    cost_scratch_steps: tuple[int, ...] = (25, 200)   # fresh-generator step counts set against FIVE
    budget_s: float = 600.0            # training wall-clock per method and seed (time_to_accuracy, equal_time)
    budget_halvings: int = 7           # meta-val marks at budget / 2^i, i < this (resolves early times) ...
    budget_linear: int = 6             # ... and at budget * i / this
    budget_max_units: int = 100000     # iterations (oracle: meta-batches) at most, whatever the budget
    tta_runs: tuple[str, ...] = ("free", "scratch-25", "scratch-200")   # the first is set against the others
    tta_goals: tuple[float, ...] = (2.0, 10.0)         # "sooner" factor each of tta_runs[1:] is given
    tta_thresholds: tuple[float, ...] = (0.22, 0.24, 0.26)   # meta-val 1-shot accuracies timed
    equal_methods: tuple[str, ...] = ("random", "free", "free-noalign", "scratch-25", "oracle")
    equal_seeds: int = 3               # training seeds study.seed, +1, ...
    equal_pair: tuple[str, str] = ("free", "scratch-25")   # the paired difference (first - second)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "study"}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {**d, "study": self.study.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
        """The inverse of :meth:`to_dict` (a preset handed to a subprocess as JSON)."""
        d = dict(d)
        s = d.pop("study")
        st = study(s["name"], seed=s["seed"], data=s["data"], clients=s["clients"], evaluation=s["evaluation"])
        st.free = FreeConfig.from_dict(s["free"])
        return cls(study=st, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def oracle_meta_batches(self, max_replay_batches: int) -> int:
        iterations = self.study.free.schedule.iterations
        return self.oracle_batches if self.oracle_batches is not None else iterations * max_replay_batches


# the probe settings of each registry preset (over the defaults above, which are quick's)
PROBES: dict[str, dict[str, Any]] = {
    # the harness's own smoke test: synthetic-size everything, seconds
    "tiny": dict(workers=0, heldout_clients=2, oracle_batches=4,
                 recovery_models=2, recovery_five_steps=4, recovery_scratch_steps=8,
                 batched_T=(2, 4), batched_width=4, batched_repeats=1,
                 hetero_clients=3, hetero_widths=(8, 4, 4), hetero_iterations=2, hetero_methods=("random", "average", "free"),
                 scaling_sizes=(4, 8), scaling_iterations=1, scaling_width=4, scaling_cache=2,
                 scaling_bank_mb=0.5, trust_levels=(0, 40), trust_honest=3, trust_weak=1, trust_client_epochs=1,
                 trust_iterations=2, trust_episodes=4, trust_learner_width=8,
                 cost_iterations=2, cost_scratch_steps=(2, 8), budget_s=0.4, budget_halvings=3, budget_linear=2,
                 tta_runs=("free", "scratch-2", "scratch-8"), tta_thresholds=(0.2, 0.3),
                 equal_methods=("random", "free", "scratch-2", "oracle"), equal_seeds=2,
                 equal_pair=("free", "scratch-2")),
    # 2 CPU cores, under 30 minutes
    "quick": dict(),
    # paper-size: 100 models, Conv4-64 learner and teachers, 1000 iterations, 200 scratch steps (GPU).
    # The study's 600 images a class are the paper's 480 to train and 120 held out (the client's 20%
    # hold-out); for a real data set with fewer (e.g. CUB), --set images_per_class=null. On the
    # glyphs this renders 4.4 GB (32 px) and 17.4 GB (64 px, the hetero domain zoo) into the cache
    "paper": dict(workers=1, threads_per_worker=0, heldout_clients=10, oracle_batches=10000,
                  recovery_models=10, recovery_five_steps=50,
                  recovery_scratch_steps=1000, batched_width=64, batched_repeats=3,
                  batched_samples_per_class=None,
                  hetero_clients=30, hetero_widths=(64, 64, 64), hetero_iterations=1000,
                  hetero_eval_shots=(1, 5), scaling_width=32, scaling_iterations=10,
                  scaling_cache=32, scaling_bank_mb=64.0),
}
NAMES = ("tiny", "quick", "paper", "full")     # what --preset takes (full: paper)

# the flat study names of earlier versions of this file -> where they live in the study now (a
# name listed with two places sets both, as it always did)
STUDY_KEYS: dict[str, tuple[str, ...]] = {
    "dataset": ("data.dataset",), "image_size": ("data.image_size", "free.learner.image_size"),
    "images_per_class": ("data.images_per_class",), "clients": ("clients.count",),
    "classes_per_client": ("clients.classes_per_client",),
    "client_width": ("clients.width", "free.learner.width"), "client_epochs": ("clients.epochs",),
    "iterations": ("free.schedule.iterations",), "scratch_steps": ("free.generator.scratch_steps",),
    "batched_inversion": ("free.batched_inversion",),
    "track_every": ("evaluation.track_every", "free.schedule.eval_every"),
    "track_episodes": ("evaluation.track_episodes",), "eval_episodes": ("evaluation.episodes",),
    "eval_shots": ("evaluation.shots",), "eval_seed": ("evaluation.seed",),
}
_SECTIONS = ("data", "clients", "evaluation")
# the FreeConfig fields a study sets itself (kept when free_preset picks another FreeConfig preset)
FREE_STUDY_FIELDS = ("learner.image_size", "learner.channels", "learner.width", "schedule.iterations",
                     "schedule.seed", "schedule.eval_every", "generator.scratch_steps", "generator.engine")


def _typed(where: str, current: Any, annotation: Any, v: Any) -> Any:
    """``v`` for a field whose value is now ``current``: JSON lists as tuples where the field is a
    tuple; a ValueError where the type is plainly wrong (an int for a float is fine)."""
    if isinstance(current, tuple) and isinstance(v, list):
        return tuple(v)
    typed = "|" not in str(annotation) and current is not None
    if typed and not (isinstance(v, type(current)) or (isinstance(current, float) and isinstance(v, int))):
        raise ValueError(f"preset field {where} must be {type(current).__name__}, got {v!r}")
    return v


def _set_study(s: Study, path: str, v: Any, free_over: dict[str, Any]) -> None:
    section, _, name = path.partition(".")
    if section == "free":
        current = s.free.flat().get(name)
        if current is not None:
            v = _typed(path, current, "", v)
        free_over[name] = v             # applied at once, after the other keys (see get_preset)
        return
    obj = getattr(s, section)
    known = {f.name: f for f in fields(obj)}
    if name not in known:
        raise ValueError(f"unknown preset field {path} (section {section} has: {', '.join(known)})")
    setattr(s, section, replace(obj, **{name: _typed(path, getattr(obj, name), known[name].type, v)}))


def get_preset(name: str, **overrides: Any) -> Preset:
    if name not in NAMES:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(NAMES)})")
    reg = canonical(name)
    probe_fields = {f.name: f for f in fields(Preset) if f.name not in ("name", "study")}
    base = Preset(name=name, study=study(reg), **PROBES[reg])
    s = base.study
    probes: dict[str, Any] = {}
    overrides = dict(overrides)
    if "free_preset" in overrides:      # FREE from another FreeConfig preset, the study's own fields kept
        linked = s.free.flat()
        s.free = FreeConfig.preset(overrides.pop("free_preset")).replace(
            **{k: linked[k] for k in FREE_STUDY_FIELDS})
    free_flat: dict[str, Any] = {}      # free.* keys and the flat names' free parts
    free_tables: list[dict] = []        # free={...}: applied last, so they win (as they always did)
    for k, v in overrides.items():
        if k in probe_fields:
            probes[k] = _typed(k, getattr(base, k), probe_fields[k].type, v)
        elif k == "seed":
            s.seed = s.free.schedule.seed = _typed(k, s.seed, int, v)
        elif k == "free":
            if not isinstance(v, dict):
                raise ValueError(f"free takes a JSON object of FreeConfig fields, got {v!r}")
            free_tables.append(v)
        elif k in STUDY_KEYS:
            for path in STUDY_KEYS[k]:
                _set_study(s, path, v, free_flat)
        elif k in _SECTIONS and isinstance(v, dict):
            for name_, v_ in v.items():
                _set_study(s, f"{k}.{name_}", v_, free_flat)
        elif k.split(".", 1)[0] in (*_SECTIONS, "free") and "." in k:
            _set_study(s, k, v, free_flat)
        else:
            raise ValueError(f"unknown preset field(s): {k}")
    if free_flat:
        s.free = s.free.replace(**free_flat)
    for t in free_tables:               # a bad `free` key or value: refused now
        s.free = s.free.replace(**t)
    p = replace(base, **probes)
    unknown = sorted(set(p.methods) - set(METHODS))
    if unknown or not p.methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {list(p.methods)}")
    return p


def parse_setting(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` (``--set``): VALUE as JSON when it parses (numbers, lists, objects), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set takes FIELD=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
