"""FREE training in a background thread of the ServerApp process, next to the ingest service."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from typing import Any

from free_dfml.common.files import atomic_write_bytes
from free_dfml.server.settings import ServerSettings, free_config_for
from free_dfml.server.state import StateDir, read_json
from free_dfml.server.step_guard import StepGuard
from free_dfml.server.zoo import Zoo

LOG = logging.getLogger("free_dfml.server")


def trim_metrics(path, iteration: int) -> int:
    """Drop the rows of ``metrics.jsonl`` past ``iteration`` (and a torn or unreadable line): after
    a crash, training resumes from the last checkpoint and redoes the iterations after it, which
    append their rows again. Rewritten atomically, only when something is dropped; returns how many
    rows were dropped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return 0
    keep, dropped = [], 0
    for line in text.splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("iteration", 0)) <= iteration
        except (ValueError, TypeError):
            ok = False
        if ok:
            keep.append(line + "\n")
        else:
            dropped += 1
    if dropped or (text and not text.endswith("\n")):
        atomic_write_bytes(path, "".join(keep).encode("utf-8"))
    if dropped:
        LOG.info("metrics.jsonl: %d row(s) past iteration %d dropped (redone after the checkpoint)",
                 dropped, iteration)
    return dropped


class TrainerRunner:
    """FREE in a background thread; starts once the zoo holds enough models."""

    def __init__(self, zoo: Zoo, settings: ServerSettings, state: StateDir, *, eval_data=None):
        """``eval_data``: an already opened split for in-training evaluation (an in-process study with a
        data set object); by default ``settings.eval_data`` is opened when training starts."""
        self.zoo, self.settings, self.state = zoo, settings, state
        self.eval_data = eval_data
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.trainer = None
        self.error: str | None = None
        self.resumed = False
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_evaluation: dict[str, Any] | None = None
        self.done = False
        self.guard: StepGuard | None = None     # non-finite steps: quarantine the teacher, restore
        self._lock = threading.Lock()
        self._metrics_path = state.logs_dir / "metrics.jsonl"

    @property
    def iteration(self) -> int:
        return int(self.trainer.iteration) if self.trainer is not None else self._checkpoint_iteration()

    def _checkpoint_iteration(self) -> int:
        info = read_json(self.state.checkpoint_dir / "checkpoint.json") or {}
        return int(info.get("iteration", 0))

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def maybe_start(self, force: bool = False) -> None:
        """Start once the zoo holds ``min-models`` models (``force``: as soon as it holds one)."""
        s = self.settings
        need = 1 if force else max(1, s.min_models)
        if not s.train or self.thread is not None or self.error or len(self.zoo.usable_ids()) < need:
            return
        try:
            import torch

            from free_dfml.server.tensorboard import TrainingBoard
            from free_dfml.server.trainer import FreeTrainer
            cfg = free_config_for(s, self.zoo)
            eval_data = self.eval_data
            if eval_data is None and s.eval_data:
                from free_dfml.common.datasets import open_dataset
                eval_data = open_dataset(s.eval_data, image_size=cfg.learner.image_size,
                                         grayscale=cfg.learner.channels == 1).split(s.eval_split)
            if s.threads:
                torch.set_num_threads(int(s.threads))
            screen = None
            if s.screen:            # the data-free screen (server/screen.py), at the meta-learner's size
                from free_dfml.server.screen import Screen, screen_config
                screen = Screen(self.zoo, screen_config(s, cfg.learner), log=LOG.info)
            self.trainer = FreeTrainer(self.zoo, cfg, state_dir=self.state.checkpoint_dir, device=s.device,
                                       sink=TrainingBoard(self.state.tensorboard_dir),
                                       eval_data=eval_data, eval_episodes=s.eval_episodes, screen=screen)
            self.resumed = self.trainer.resume()
            trim_metrics(self._metrics_path, self.trainer.iteration)
            self.guard = StepGuard(self.trainer, self.zoo.quarantine)
            LOG.info("FREE trainer ready (%s, iteration %d)", "resumed from checkpoint" if self.resumed
                     else "fresh", self.trainer.iteration)
        except Exception as e:  # noqa: BLE001 - keep serving; status shows the reason
            self.error = f"{type(e).__name__}: {e}"
            LOG.error("FREE trainer could not start: %s\n%s", self.error, traceback.format_exc())
            return
        self.thread = threading.Thread(target=self._loop, name="free-trainer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        s, t = self.settings, self.trainer
        try:
            while not self.stop_event.is_set():
                if s.max_iterations and t.iteration >= s.max_iterations:
                    break
                if not t.usable_ids():      # every model quarantined (or screened out): wait for a release
                    if s.finish_when_done:         # (a simulation has no operator to release one)
                        break
                    self.stop_event.wait(1.0)
                    continue
                self.guard.before()
                m = t.step()
                bad = self.guard.problems(m)
                if bad:
                    ids = self.guard.recover(bad)
                    LOG.warning("iteration %d went non-finite (%s): quarantined %s, state before it restored",
                                t.iteration + 1, ", ".join(bad[:4]), ", ".join(i[:12] for i in ids))
                    continue
                with self._lock:
                    self.last_metrics = m
                    ev = {k: v for k, v in m.items() if k.startswith("eval_")}
                    if ev:
                        self.last_evaluation = {"iteration": t.iteration, "time": time.time(), **ev}
                with open(self._metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(m, default=str) + "\n")
                if s.checkpoint_every and t.iteration % s.checkpoint_every == 0:
                    self._checkpoint()
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            LOG.error("FREE training stopped on an error: %s\n%s", self.error, traceback.format_exc())
        finally:
            self._checkpoint()
            t.sink.close()
            self.done = True

    def _checkpoint(self) -> None:
        if self.trainer is None:
            return
        try:
            path = self.trainer.checkpoint()
            self.last_checkpoint = {"iteration": self.trainer.iteration, "time": time.time(), "path": str(path)}
            atomic_write_bytes(self.state.checkpoint_dir / "checkpoint.json",
                               json.dumps(self.last_checkpoint).encode())
        except Exception as e:  # noqa: BLE001
            LOG.error("checkpoint failed: %s", e)

    def stop(self, timeout: float = 120.0) -> None:
        """Stop training and checkpoint (the training thread checkpoints on its way out)."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                LOG.warning("trainer did not stop within %.0f s; last periodic checkpoint kept", timeout)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            m = dict(self.last_metrics)
        return {"enabled": self.settings.train, "running": self.running(), "iteration": self.iteration,
                "resumed": self.resumed, "error": self.error, "last_metrics": m,
                "nonfinite_steps": list(self.guard.recovered[-10:]) if self.guard else [],
                "last_checkpoint": self.last_checkpoint or read_json(self.state.checkpoint_dir / "checkpoint.json"),
                "max_iterations": self.settings.max_iterations, "min_models": self.settings.min_models}
