"""Few-shot evaluation, the field's protocol.

For each of ``episodes`` N-way K-shot episodes (15 queries a class by default) drawn from meta-test
classes, a copy of the learner is adapted with ``steps`` SGD steps on the support set, then scores
the query set. Reported: mean accuracy and the 95% interval ``1.96 * std / sqrt(episodes)``.

The same seed gives the same episodes, so every method is scored on identical tasks; each result
carries ``episodes_sha``, a fingerprint of its episodes (classes, images, labels: independent of the
learner), so two results can be checked to come from the same tasks. :func:`paired` compares two
methods episode by episode. BatchNorm uses batch statistics during adaptation and scoring (transductive, as in MAML).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from free_dfml.common.adaptation import adapt, buffers_of, forward, parameters_of
from free_dfml.common.datasets import SplitData, to_float
from free_dfml.common.episodes import EpisodeSampler

EPISODES = 600
QUERY = 15
STEPS = 10


@dataclass
class EvalResult:
    way: int
    shot: int
    episodes: int
    mean: float          # accuracy in [0, 1]
    ci95: float          # half-width of the 95% interval
    accuracies: list[float] = field(repr=False, default_factory=list)
    episodes_sha: str = field(repr=False, default="")    # fingerprint of the episodes scored

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.ci95:.2f}%"

    def to_dict(self, with_episodes: bool = False) -> dict:
        d = asdict(self)
        if not with_episodes:
            d.pop("accuracies")
        return d

    def above(self, other: "EvalResult") -> bool:
        """True when this interval lies wholly above ``other``'s."""
        return self.mean - self.ci95 > other.mean + other.ci95


def _mean_ci95(values: list[float]) -> tuple[float, float]:
    n = len(values)
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std(unbiased=True)) if n > 1 else 0.0
    return float(t.mean()), 1.96 * std / math.sqrt(n)


def summarize(accs: list[float], way: int, shot: int, episodes_sha: str = "") -> EvalResult:
    mean, ci95 = _mean_ci95(accs)
    return EvalResult(way, shot, len(accs), mean, ci95, list(accs), episodes_sha)


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Episode-by-episode difference ``a - b`` of two methods scored on the same episodes:
    ``{"mean", "ci95"}`` (95% interval of the mean difference), both in [−1, 1]."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs the same non-zero number of episodes, got {len(a)} and {len(b)}")
    mean, ci95 = _mean_ci95([x - y for x, y in zip(a, b)])
    return {"mean": mean, "ci95": ci95}


def episode_fingerprint(data: SplitData, *, way: int, shot: int, query: int = QUERY, episodes: int = EPISODES,
                        seed: int = 0) -> str:
    """The fingerprint :func:`evaluate` reports for these episodes, without any learner."""
    sampler = EpisodeSampler(data, way=way, shot=shot, query=query, seed=seed)
    h = hashlib.sha256()
    for _ in range(episodes):
        _hash_episode(h, sampler.sample())
    return h.hexdigest()


def _hash_episode(h, ep) -> None:
    h.update(repr(ep.classes).encode())
    for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y):
        h.update(t.contiguous().numpy().tobytes())


def adapt_and_score(learner: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                    query_x: torch.Tensor, query_y: torch.Tensor, *, steps: int, lr: float) -> float:
    """Adapt a detached copy of the learner's parameters on the support set, return query accuracy."""
    params = parameters_of(learner, detach=True)
    buffers = buffers_of(learner)
    with torch.enable_grad():
        params = adapt(learner, support_x, support_y, steps=steps, lr=lr, params=params, buffers=buffers)
    with torch.no_grad():
        logits = forward(learner, params, query_x, buffers)
    return float((logits.argmax(1) == query_y).float().mean())


def evaluate(learner: nn.Module, data: SplitData, *, way: int = 5, shot: int = 1, query: int = QUERY,
             episodes: int = EPISODES, steps: int = STEPS, lr: float = 0.01, seed: int = 0,
             device: torch.device | str = "cpu", progress: bool | str = False) -> EvalResult:
    """Score ``learner`` (images in [0,1] -> ``way`` logits) on ``episodes`` episodes of ``data``.

    ``progress`` may be a label, shown on a rich progress bar.
    """
    device = torch.device(device)
    sampler = EpisodeSampler(data, way=way, shot=shot, query=query, seed=seed)
    was_training = learner.training
    learner.train()   # batch statistics (transductive BN), as in MAML
    accs: list[float] = []
    h = hashlib.sha256()
    bar = _progress(progress)
    with bar if bar is not None else nullcontext():
        task = bar.add_task(str(progress) if progress is not True else "evaluating",
                            total=episodes) if bar is not None else None
        for _ in range(episodes):
            ep = sampler.sample()
            _hash_episode(h, ep)
            accs.append(adapt_and_score(
                learner, to_float(ep.support_x).to(device), ep.support_y.to(device),
                to_float(ep.query_x).to(device), ep.query_y.to(device), steps=steps, lr=lr))
            if bar is not None:
                bar.advance(task)
    learner.train(was_training)
    return summarize(accs, way, shot, h.hexdigest())


def _progress(progress: bool | str):
    if not progress:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True)
