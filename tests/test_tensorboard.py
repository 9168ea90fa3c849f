"""TensorBoard event files: a trainer's metrics and recovered-image grids, read back from disk."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

from free_dfml.common.config import FreeConfig  # noqa: E402
from free_dfml.server.tensorboard import TensorBoardLog, TrainingBoard, metric_tag  # noqa: E402
from free_dfml.server.trainer import FreeTrainer  # noqa: E402


def _read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_metric_names_become_tags_by_prefix():
    assert [metric_tag(k) for k in ("inversion_ce", "replay_acc", "replay_loss", "bell_kl", "eval_1shot",
                                    "eval_1shot_ci95", "step_s", "inversion_s", "bank_images", "a/b")] == [
        "inversion/ce", "replay/acc", "replay/loss", "bell/kl", "eval/1shot", "eval/1shot_ci95",
        "time/step_s", "time/inversion_s", "train/bank_images", "a/b"]


def test_log_writes_scalars_and_images_that_read_back(tmp_path):
    with TensorBoardLog(tmp_path / "tb") as log:
        for step in (1, 2, 3):
            log.scalars(step, {"replay_acc": 0.1 * step, "warmup": True, "note": "x", "eval/custom": step})
        log.images(3, "grid", [torch.rand(4, 3, 8, 8), torch.rand(2, 3, 8, 8)])   # two rows, padded
        log.images(3, "one", torch.rand(3, 8, 8))
    acc = _read(tmp_path / "tb")
    assert sorted(acc.Tags()["scalars"]) == ["eval/custom", "replay/acc"]      # the bool and the string left out
    assert _steps(acc, "replay/acc") == [1, 2, 3]
    assert [e.value for e in acc.Scalars("replay/acc")] == pytest.approx([0.1, 0.2, 0.3])
    (grid,) = acc.Images("grid")
    assert grid.step == 3 and (grid.width, grid.height) == (4 * 9 + 1, 2 * 9 + 1)
    assert [e.step for e in acc.Images("one")] == [3]


def test_trainer_sink_logs_every_iteration_and_a_grid_per_checkpoint_without_duplicates_on_resume(
        tmp_path, tiny_zoo, fake_dataset):
    cfg = FreeConfig.preset("tiny", warmup=1, iterations=6, checkpoint_every=2, eval_every=2)
    tb = tmp_path / "state" / "tensorboard"

    def trainer():
        return FreeTrainer(tiny_zoo, cfg, state_dir=tmp_path / "state" / "ckpt", device="cpu",
                           eval_data=fake_dataset.split("val"), eval_episodes=2,
                           sink=TrainingBoard(tb, max_models=3, per_class=2))

    first = trainer()
    first.run(4, progress=False)          # checkpoints at 2 and 4 (and again at 4 on the way out)
    for _ in range(2):                    # iterations 5 and 6, then a crash: no checkpoint after 4
        first.step()
    first.sink.close()
    ran_on = [h["inversion_ce"] for h in first.history]

    second = trainer()
    assert second.resume() and second.iteration == 4
    second.run(6, progress=False)         # 5 and 6 again, a checkpoint at 6
    second.sink.close()

    acc = _read(tb)
    assert _steps(acc, "inversion/ce") == [1, 2, 3, 4, 5, 6]            # each iteration once
    assert [e.value for e in acc.Scalars("inversion/ce")] == pytest.approx(
        [h["inversion_ce"] for h in second.history], abs=1e-5)
    assert ran_on == pytest.approx([h["inversion_ce"] for h in second.history])  # resumed exactly
    assert _steps(acc, "replay/acc") == _steps(acc, "bell/kl") == [2, 3, 4, 5, 6]   # after the warm-up
    assert _steps(acc, "eval/1shot") == [2, 4, 6] and _steps(acc, "time/step_s") == [1, 2, 3, 4, 5, 6]
    assert "train/warmup" not in acc.Tags()["scalars"]
    grids = acc.Images("recovered")
    assert [g.step for g in grids] == [2, 4, 6]             # every checkpoint once, none for the resume point
    # a row per model (3 of the 4, 32 px images, padding 1), 2 images of each of its 4 classes
    assert (grids[-1].height, grids[-1].width) == (3 * 33 + 1, 4 * 2 * 33 + 1)
    # the resumed run's events start with the purge marker at iteration 5: what the crashed run
    # wrote from 5 on is dropped by every TensorBoard reader
    files = sorted(tb.glob("events.out.tfevents.*"))
    assert len(files) == 2
    starts = [e.step for e in EventFileLoader(str(files[1])).Load()
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [5]


def test_server_training_runner_writes_events_into_the_state_folder(tmp_path, tiny_zoo):
    """The ServerApp's training runner (also the in-process study's) logs into STATE/tensorboard."""
    from free_dfml.server.settings import ServerSettings
    from free_dfml.server.state import StateDir
    from free_dfml.server.training_runner import TrainerRunner

    state = StateDir(tmp_path / "state").create()
    settings = ServerSettings(state_dir=str(state.root), device="cpu", preset="tiny", train=True, threads=1,
                              max_iterations=2, checkpoint_every=0, min_models=1)
    runner = TrainerRunner(tiny_zoo, settings, state)
    runner.maybe_start()
    assert runner.error is None
    runner.thread.join(300)
    assert runner.done and runner.iteration == 2
    acc = _read(state.tensorboard_dir)
    assert _steps(acc, "inversion/ce") == [1, 2]
    assert [g.step for g in acc.Images("recovered")] == [2]       # the checkpoint on the way out
