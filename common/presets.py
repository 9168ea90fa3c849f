"""The one preset registry: each name is one whole study, the same wherever it is used.

=========  ============================================================================
name       the study
=========  ============================================================================
``tiny``   the tests and the harness's smoke run: 4 Conv4-8 clients, 3 FREE iterations,
           10 evaluation episodes (seconds). Alias ``smoke``.
``demo``   ``make demo`` / ``free-sim run --preset demo``: 20 Conv4-32 clients on 100
           glyph images a class, FREE ``quick`` for 80 iterations, 300 meta-test
           episodes (about 10 minutes on 2 CPU cores)
``quick``  the benchmark harness on CPU: the demo's data, clients and FREE, 600 meta-test
           episodes (the field's protocol)
``paper``  paper sizes (a GPU): 100 Conv4-64 clients on 600 images a class, FREE ``paper``
           for 1000 iterations. Alias ``full``.
=========  ============================================================================

A :class:`Study` has four sections: ``data`` (what the clients train on), ``clients`` (how many,
which classes, how they train), ``free`` (the server's :class:`~free_dfml.common.config.FreeConfig`,
complete: meta-learner width, iterations, evaluation cadence and seed included) and ``evaluation``
(the meta-test protocol and the meta-val tracking curve), plus ``seed`` (data rendering, the client
plan and client training). Who uses what: the simulation and the in-process study
(:mod:`free_dfml.sim.study`) take the whole study; the benchmark harness takes the whole study plus
its own probe settings (benchmarks/presets.py), keyed by the same names; a server needs only
``.free``. :meth:`FreeConfig.preset <free_dfml.common.config.FreeConfig.preset>` (``paper``,
``quick``, ``tiny``) are FREE's own presets, from which these studies' ``free`` sections start.

    study("demo")                                         # a fresh, independent copy
    study("demo", clients={"count": 8}, free={"generator.lr": 0.01}, evaluation={"episodes": 50})

Pure dataclasses: no torch import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from free_dfml.common.config import FreeConfig


@dataclass
class DataConfig:
    dataset: str = "glyphs"             # glyphs | DIR | cifar-fs:PATH (common/datasets.py)
    image_size: int = 32
    images_per_class: int | None = None   # images rendered / loaded a class (None: the data set's all)


@dataclass
class ClientsConfig:
    count: int = 4
    classes_per_client: int = 5
    arch: str = "conv4"                 # an architecture name, or "mix" (conv4 / resnet10 alternating)
    width: int = 16
    epochs: int = 10
    lr: float = 0.01                    # Adam
    batch_size: int = 32
    augment: str = "none"               # none | flip | crop | crop+flip (free-client train --augment)


@dataclass
class EvaluationConfig:
    episodes: int = 600                 # meta-test episodes per shot setting, every method
    shots: tuple[int, ...] = (1, 5)
    seed: int = 0                       # episode seed: the same episodes for every method
    track_every: int = 20               # meta-val accuracy over training, every so many iterations (0: off)
    track_episodes: int = 50


@dataclass
class Study:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    free: FreeConfig = field(default_factory=FreeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    seed: int = 0                       # data rendering, client plan, client training

    def to_dict(self) -> dict[str, Any]:
        ev = asdict(self.evaluation)
        ev["shots"] = list(self.evaluation.shots)
        return {"name": self.name, "seed": self.seed, "data": asdict(self.data),
                "clients": asdict(self.clients), "free": self.free.to_dict(), "evaluation": ev}


NAMES = ("tiny", "demo", "quick", "paper")
ALIASES = {"full": "paper", "smoke": "tiny"}


def _demo_clients() -> ClientsConfig:
    return ClientsConfig(count=20, classes_per_client=5, arch="conv4", width=32, epochs=20)


def _build(name: str) -> Study:
    if name == "tiny":
        return Study(
            "tiny", DataConfig(images_per_class=20),
            ClientsConfig(count=4, width=8, epochs=2),
            FreeConfig.preset("tiny", learner={"width": 8},
                              schedule={"iterations": 3, "eval_every": 2}, generator={"scratch_steps": 4}),
            EvaluationConfig(episodes=10, track_every=2, track_episodes=4))
    if name == "demo":
        return Study(
            "demo", DataConfig(images_per_class=100), _demo_clients(),
            FreeConfig.preset("quick", learner={"width": 32}, schedule={"iterations": 80, "eval_every": 20}),
            EvaluationConfig(episodes=300, track_every=20, track_episodes=100))
    if name == "quick":
        return Study(
            "quick", DataConfig(images_per_class=100), _demo_clients(),
            FreeConfig.preset("quick", learner={"width": 32}, schedule={"iterations": 80, "eval_every": 20},
                              generator={"scratch_steps": 25}),
            EvaluationConfig(episodes=600, track_every=20, track_episodes=50))
    if name == "paper":
        return Study(
            "paper", DataConfig(images_per_class=600),
            ClientsConfig(count=100, classes_per_client=5, arch="conv4", width=64, epochs=60),
            FreeConfig.preset("paper", learner={"width": 64}, schedule={"iterations": 1000, "eval_every": 100},
                              generator={"scratch_steps": 200}),
            EvaluationConfig(episodes=600, track_every=100, track_episodes=200))
    raise AssertionError(name)


def canonical(name: str) -> str:
    """The registry name for ``name`` (aliases resolved); ``ValueError`` for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(NAMES)}; "
                         f"aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return name


def _section(obj: Any, over: Any, where: str) -> Any:
    if not isinstance(over, dict):
        raise ValueError(f"preset section {where} takes a table of fields, got {over!r}")
    known = {f.name for f in fields(obj)}
    bad = sorted(set(over) - known)
    if bad:
        raise ValueError(f"unknown preset key {where}.{bad[0]} (section {where} has: {', '.join(sorted(known))})")
    if "shots" in over:
        over = {**over, "shots": tuple(over["shots"])}
    return replace(obj, **over)


def study(name: str, **overrides: Any) -> Study:
    """A fresh copy of preset ``name`` (aliases accepted), with ``overrides``: ``seed=N`` (the
    study's and ``free.schedule.seed``; ``evaluation.seed`` stays), or a section name with a dict of
    its fields (``free=`` in any form ``FreeConfig.from_dict`` takes). Unknown keys: ``ValueError``."""
    s = _build(canonical(name))
    for key, over in overrides.items():
        if key == "seed":                   # the study's seed and FREE's (not the evaluation episodes')
            s.seed = int(over)
            s.free.schedule.seed = int(over)
        elif key == "free":
            s.free = s.free.replace(**over)
        elif key in ("data", "clients", "evaluation"):
            setattr(s, key, _section(getattr(s, key), over, key))
        else:
            raise ValueError(f"unknown preset key {key!r} (sections: data, clients, free, evaluation, seed)")
    return s


def free_config(name: str, **overrides: Any) -> FreeConfig:
    """Preset ``name``'s FREE settings (``study(name).free``) with ``overrides`` (any form
    ``FreeConfig.from_dict`` takes): what the server's ``--preset`` means."""
    return study(name).free.replace(**overrides)
