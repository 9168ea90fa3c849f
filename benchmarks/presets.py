"""Benchmark presets: ``tiny`` (the harness's smoke test, seconds), ``quick`` (2 CPU cores, under 30
minutes), ``full`` (paper-size settings, for a GPU).

What never changes between methods or presets (the field's evaluation protocol): 600 meta-test
episodes for the accuracy table (``tiny`` alone uses fewer: it only checks the plumbing), 15 queries
a class, 10 adaptation steps, the same inner learning rate and the same episode seed for every
method. The presets scale the zoo, the models, the number of training iterations and the sizes of
the performance probes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from free_dfml.server.trainer import FreeConfig

# the accuracy section's methods (benchmarks/accuracy.py), in table order
METHODS = ("random", "average", "scratch", "free-noalign", "free", "oracle")


@dataclass
class Preset:
    name: str = "quick"
    seed: int = 0
    workers: int = 2                   # parallel worker processes (1 torch thread each on CPU)
    threads_per_worker: int = 1
    # data ------------------------------------------------------------------------------------
    dataset: str = "glyphs"
    image_size: int = 32
    images_per_class: int | None = 100   # training images a class (None: the data set's all)
    # main zoo --------------------------------------------------------------------------------
    clients: int = 20                  # models FREE learns from
    heldout_clients: int = 4           # extra models, never seen in training (recovery benchmark)
    classes_per_client: int = 5
    client_width: int = 32             # also FREE's meta-learner width
    client_epochs: int = 20
    # FREE and every method trained on the zoo --------------------------------------------------
    free_preset: str = "quick"         # FreeConfig.preset name, then the overrides below
    free: dict[str, Any] = field(default_factory=dict)
    iterations: int = 80
    methods: tuple[str, ...] = METHODS     # the accuracy section's methods (a subset, e.g. with --set)
    # steps of a fresh generator per model (scratch baseline): five times FIVE's k on CPU, and the
    # full preset's 200, the budget of the earlier methods the paper compares with
    scratch_steps: int = 25
    oracle_batches: int | None = None  # MAML meta-batches on real data; None: iterations * max_replay_batches
    batched_inversion: bool | str = "auto"   # FreeConfig.batched_inversion for every FREE-family method
    track_every: int = 20              # meta-val accuracy for the accuracy-vs-iterations plot (0: off)
    track_episodes: int = 50
    # evaluation (identical for every method) ----------------------------------------------------
    eval_episodes: int = 600
    eval_shots: tuple[int, ...] = (1, 5)
    eval_seed: int = 0
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
    scaling_bank_mb: float = 8.0       # FreeConfig.bank_max_mb there: small, so that the bound is exercised

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def free_overrides(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "learner_width": self.client_width,
                "iterations": self.iterations, "seed": self.seed, "scratch_steps": self.scratch_steps,
                "batched_inversion": self.batched_inversion, **self.free}

    def oracle_meta_batches(self, max_replay_batches: int) -> int:
        return self.oracle_batches if self.oracle_batches is not None else self.iterations * max_replay_batches


PRESETS: dict[str, dict[str, Any]] = {
    # the harness's own smoke test: synthetic-size everything, seconds
    "tiny": dict(workers=0, dataset="glyphs", images_per_class=20, clients=4, heldout_clients=2,
                 client_width=8, client_epochs=2, free_preset="tiny", iterations=3, scratch_steps=4,
                 oracle_batches=4, track_every=2, track_episodes=4, eval_episodes=10,
                 recovery_models=2, recovery_five_steps=4, recovery_scratch_steps=8,
                 batched_T=(2, 4), batched_width=4, batched_repeats=1,
                 hetero_clients=3, hetero_widths=(8, 4, 4), hetero_iterations=2, hetero_methods=("random", "average", "free"),
                 scaling_sizes=(4, 8, 16), scaling_iterations=1, scaling_width=4, scaling_cache=2,
                 scaling_bank_mb=0.5),
    # 2 CPU cores, under 30 minutes
    "quick": dict(),
    # paper-size: 100 models, Conv4-64 learner and teachers, 1000 iterations, 200 scratch steps (GPU)
    # 600 images a class: the paper's 480 to train and 120 held out (the client's 20% hold-out). The
    # data set's "all" (None) would be the glyph renderer's default 40; for a real data set with fewer
    # than 600 a class (e.g. CUB), --set images_per_class=null. On the glyphs this renders 4.4 GB (32 px)
    # and 17.4 GB (64 px, the hetero domain zoo) into the cache (docs/benchmarks.md, "Presets")
    "full": dict(workers=1, threads_per_worker=0, images_per_class=600, clients=100, heldout_clients=10, client_width=64,
                 client_epochs=60, free_preset="paper", iterations=1000, scratch_steps=200, oracle_batches=10000,
                 track_every=100, track_episodes=200, recovery_models=10, recovery_five_steps=50,
                 recovery_scratch_steps=1000, batched_width=64, batched_repeats=3,
                 batched_samples_per_class=None,
                 hetero_clients=30, hetero_widths=(64, 64, 64), hetero_iterations=1000,
                 hetero_eval_shots=(1, 5), scaling_width=32, scaling_iterations=10,
                 scaling_cache=32, scaling_bank_mb=64.0),
}


def get_preset(name: str, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    known = {f.name: f for f in fields(Preset)}
    bad = sorted(set(overrides) - set(known))
    if bad:
        raise ValueError(f"unknown preset field(s): {', '.join(bad)}")
    base = Preset(name=name, **PRESETS[name])
    for k, v in overrides.items():
        default = getattr(base, k)
        if isinstance(default, tuple) and isinstance(v, list):      # JSON lists for tuple fields
            v = overrides[k] = tuple(v)
        typed = "|" not in str(known[k].type) and default is not None
        if typed and not (isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))):
            raise ValueError(f"preset field {k} must be {type(default).__name__}, got {v!r}")
    p = replace(base, **overrides)
    unknown = sorted(set(p.methods) - set(METHODS))
    if unknown or not p.methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {list(p.methods)}")
    FreeConfig.preset(p.free_preset, **p.free_overrides())     # a bad `free` key or value: refused now
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
