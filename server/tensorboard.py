"""Training metrics and recovered-image grids as TensorBoard event files (watch a run live with
``tensorboard --logdir STATE/tensorboard``).

* :class:`TensorBoardLog`: ``scalars(step, {name: value})``, ``images(step, tag, images)``,
  ``close()``, over ``torch.utils.tensorboard.SummaryWriter``. The writer opens at the first write,
  with ``purge_step`` = that step: a run resumed from a checkpoint at iteration i writes i + 1
  first, and TensorBoard drops what an earlier run wrote from i + 1 on (the iterations after its
  last checkpoint), so no step appears twice.
* :class:`TrainingBoard`: a :class:`MetricsSink` for :class:`~free_dfml.server.trainer.FreeTrainer`
  (``FreeTrainer(..., sink=TrainingBoard(dir))``): each iteration's metrics as scalars, and at each
  checkpoint one grid of recovered images (a row per model, the memory bank's newest images of
  each class).

Metric names become tags by their prefix: ``inversion_ce`` -> ``inversion/ce``, ``replay_acc`` ->
``replay/acc``, ``bell_kl`` -> ``bell/kl``, ``eval_1shot`` -> ``eval/1shot``, timings (``*_s``) ->
``time/...``, anything else -> ``train/...``; booleans and non-numbers are left out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch

if TYPE_CHECKING:
    from free_dfml.server.trainer import FreeTrainer

LOG = logging.getLogger("free_dfml.server")

SECTIONS = ("inversion", "replay", "bell", "eval")


class MetricsSink(Protocol):
    """What a :class:`~free_dfml.server.trainer.FreeTrainer` tells its sink."""

    def on_step(self, trainer: "FreeTrainer", metrics: Mapping[str, Any]) -> None:
        """After each iteration, with that iteration's metrics (``metrics["iteration"]`` = ``trainer.iteration``)."""

    def on_checkpoint(self, trainer: "FreeTrainer") -> None:
        """After each checkpoint is written."""

    def close(self) -> None:
        ...


def metric_tag(name: str) -> str:
    """The TensorBoard tag of a trainer metric (see the module docstring); a name with ``/`` is kept."""
    if "/" in name:
        return name
    if name.endswith("_s"):
        return f"time/{name}"
    head, _, rest = name.partition("_")
    if head in SECTIONS and rest:
        return f"{head}/{rest}"
    return f"train/{name}"


def image_rows(rows: list[torch.Tensor], pad_value: float = 1.0) -> torch.Tensor:
    """One ``[C, H, W]`` grid in [0, 1] with a row per ``[n_i, C, H, W]`` batch (short rows padded)."""
    from torchvision.utils import make_grid
    width = max(len(r) for r in rows)
    padded = [torch.cat([r, torch.full((width - len(r), *r.shape[1:]), pad_value)]) if len(r) < width else r
              for r in rows]
    return make_grid(torch.cat(padded).float(), nrow=width, padding=1, pad_value=pad_value).clamp(0, 1)


class TensorBoardLog:
    """Scalars and images written as TensorBoard events under ``log_dir``."""

    def __init__(self, log_dir: str | os.PathLike, *, flush_secs: int = 30):
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self._writer = None
        self._failed = False

    def _open(self, step: int):
        if self._writer is None and not self._failed:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self._writer = SummaryWriter(str(self.log_dir), purge_step=int(step), flush_secs=self.flush_secs)
            except Exception as e:  # noqa: BLE001 - the event files are a view: training goes on without them
                self._failed = True
                LOG.warning("TensorBoard events are not written (%s: %s)", type(e).__name__, e)
        return self._writer

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Every number in ``values`` (booleans left out) at ``step``, tagged by :func:`metric_tag`."""
        nums = {metric_tag(k): float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        w = self._open(step)
        if w is None:
            return
        for tag, v in nums.items():
            w.add_scalar(tag, v, global_step=int(step))

    def images(self, step: int, tag: str, images: torch.Tensor | list[torch.Tensor]) -> None:
        """``images``: one ``[C, H, W]`` image in [0, 1], an ``[n, C, H, W]`` batch (one row), or a list
        of batches (a row each)."""
        if isinstance(images, (list, tuple)):
            images = image_rows([x.detach().cpu() for x in images])
        elif images.dim() == 4:
            images = image_rows([images.detach().cpu()])
        w = self._open(step)
        if w is not None:
            w.add_image(tag, images.detach().cpu().float().clamp(0, 1), global_step=int(step), dataformats="CHW")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (a later write opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainingBoard(TensorBoardLog):
    """A :class:`MetricsSink`: a trainer's metrics every iteration, a recovered-image grid (tag
    ``recovered``, the first ``max_models`` models of the zoo, ``per_class`` images of each class)
    at every checkpoint that follows new iterations."""

    def __init__(self, log_dir: str | os.PathLike, *, max_models: int = 8, per_class: int = 4,
                 flush_secs: int = 30):
        super().__init__(log_dir, flush_secs=flush_secs)
        self.max_models, self.per_class = max_models, per_class
        self._last_step: int | None = None      # the last iteration logged by this sink
        self._last_grid: int | None = None

    def on_step(self, trainer: "FreeTrainer", metrics: Mapping[str, Any]) -> None:
        step = int(metrics.get("iteration", trainer.iteration))
        self.scalars(step, {k: v for k, v in metrics.items() if k != "iteration"})
        self._last_step = step

    def on_checkpoint(self, trainer: "FreeTrainer") -> None:
        # only after iterations of this run: the checkpoint a run resumes from, or a second checkpoint
        # of the same iteration, had its grid written already
        step = trainer.iteration
        if self._last_step is None or self._last_grid == step:
            return
        rows = []
        for mid in sorted(trainer.zoo.ids())[: self.max_models]:
            x, _ = trainer.bank.model_images(mid, self.per_class)
            if len(x):
                rows.append(x)
        if rows:
            self.images(step, "recovered", rows)
        self._last_grid = step
        self.flush()
