"""Stop after iteration n, resume, continue to n+m: the same state as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from free_dfml.server.checkpoint import CheckpointError, load_checkpoint
from free_dfml.server.trainer import FreeConfig, FreeTrainer


def _state(tr: FreeTrainer) -> dict[str, torch.Tensor]:
    out = {f"l.{k}": v for k, v in tr.learner.state_dict().items()}
    out.update({f"g.{k}": v for k, v in tr.metagen.generator.state_dict().items()})
    bank, _ = tr.bank.state_dict()
    out.update(bank)
    return out


@pytest.mark.parametrize("inversion", ["five", "scratch"])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_zoo, inversion):
    cfg = FreeConfig.preset("tiny", schedule={"warmup": 1}, generator={"scratch_steps": 3, "inversion": inversion})
    full = FreeTrainer(tiny_zoo, cfg, state_dir=tmp_path / "a", device="cpu")
    full.run(4, progress=False)

    part = FreeTrainer(tiny_zoo, cfg, state_dir=tmp_path / "b", device="cpu")
    part.run(2, progress=False)                    # checkpoints at the end
    del part
    resumed = FreeTrainer(tiny_zoo, cfg, state_dir=tmp_path / "b", device="cpu")
    assert resumed.resume() and resumed.iteration == 2
    resumed.run(4, progress=False)

    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda h: [{k: v for k, v in m.items() if not k.endswith("_s")} for m in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)


def test_checkpoint_is_plain_safetensors_with_json(tmp_path, tiny_zoo):
    tr = FreeTrainer(tiny_zoo, FreeConfig.preset("tiny"), state_dir=tmp_path, device="cpu")
    tr.step()
    path = tr.checkpoint()
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        doc = json.loads(f.metadata()["free_dfml_checkpoint"])
    assert doc["iteration"] == 1 and doc["config"]["generator"]["ngf"] == 8
    assert any(k.startswith("opt.generator.") for k in keys)
    assert "rng.trainer" in keys and any(k.startswith("bank.") for k in keys)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_resume_refuses_a_different_config(tmp_path, tiny_zoo):
    FreeTrainer(tiny_zoo, FreeConfig.preset("tiny"), state_dir=tmp_path, device="cpu").checkpoint()
    other = FreeTrainer(tiny_zoo, FreeConfig.preset("tiny", generator={"ngf": 4}), state_dir=tmp_path,
                        device="cpu")
    with pytest.raises(ValueError, match=r"differs in generator\.ngf"):
        other.resume()
    assert not FreeTrainer(tiny_zoo, FreeConfig.preset("tiny"), state_dir=tmp_path / "none",
                           device="cpu").resume()


def test_resume_ignores_scratch_steps_only_when_both_runs_invert_with_five(tmp_path, tiny_zoo):
    FreeTrainer(tiny_zoo, FreeConfig.preset("tiny"), state_dir=tmp_path, device="cpu").checkpoint()
    assert FreeTrainer(tiny_zoo, FreeConfig.preset("tiny", generator={"scratch_steps": 7}), state_dir=tmp_path,
                       device="cpu").resume()
    FreeTrainer(tiny_zoo, FreeConfig.preset("tiny", generator={"inversion": "scratch"}), state_dir=tmp_path / "s",
                device="cpu").checkpoint()
    other = FreeTrainer(tiny_zoo, FreeConfig.preset("tiny", generator={"inversion": "scratch", "scratch_steps": 7}),
                        state_dir=tmp_path / "s", device="cpu")
    with pytest.raises(ValueError, match=r"differs in generator\.scratch_steps"):
        other.resume()


def test_server_preset_is_the_registry_studys_free_settings(tmp_path, tiny_zoo):
    from free_dfml.common.presets import study
    from free_dfml.server.settings import ServerSettings, free_config_for
    for name in ("tiny", "demo", "quick", "paper"):
        cfg = free_config_for(ServerSettings(preset=name, free_config={"replay.patience": 3}), tiny_zoo)
        assert cfg.replace(replay={"patience": study(name).free.replay.patience}, learner={
            "image_size": 32, "channels": 3}) == study(name).free.replace(learner={"image_size": 32, "channels": 3})
        assert cfg.replay.patience == 3


def test_resume_reads_a_checkpoint_written_with_the_flat_config(tmp_path, tiny_zoo):
    """Checkpoints of the single-level config (``{"gen_lr": ..., "bank_capacity": ...}``) still resume,
    and a schedule change (more iterations, a checkpoint cadence) is still allowed."""
    from free_dfml.common.config import FLAT_KEYS
    from free_dfml.server.checkpoint import save_checkpoint
    cfg = FreeConfig.preset("tiny")
    tr = FreeTrainer(tiny_zoo, cfg, state_dir=tmp_path, device="cpu")
    tr.step()
    path = tr.checkpoint()
    tensors, meta = load_checkpoint(path)
    nested = cfg.flat()
    flat = {old: nested[f"{s}.{f}"] for old, (s, f) in FLAT_KEYS.items()}
    flat["batched_inversion"] = "auto"
    meta["config"] = flat
    save_checkpoint(path, tensors, meta)
    later = FreeTrainer(tiny_zoo, cfg.replace(iterations=9, checkpoint_every=3), state_dir=tmp_path, device="cpu")
    assert later.resume() and later.iteration == 1
    assert all(torch.equal(v, tr.learner.state_dict()[k]) for k, v in later.learner.state_dict().items())
    flat["gen_lr"] = 0.5
    save_checkpoint(path, tensors, meta)
    with pytest.raises(ValueError, match=r"differs in generator\.lr"):
        FreeTrainer(tiny_zoo, cfg, state_dir=tmp_path, device="cpu").resume()


def test_resumed_runner_does_not_repeat_metric_rows(tmp_path, tiny_zoo):
    """kill -9 after the checkpoint of iteration 1 but after row 2 (and a torn line) reached
    metrics.jsonl: the resumed runner redoes iteration 2 and the file holds each iteration once,
    the redone row replacing the lost run's."""
    from free_dfml.server.settings import ServerSettings
    from free_dfml.server.state import StateDir
    from free_dfml.server.training_runner import TrainerRunner
    state = StateDir(tmp_path / "state").create()
    settings = ServerSettings(state_dir=str(state.root), device="cpu", preset="tiny", checkpoint_every=1,
                              max_iterations=1, free_config={"generator": {"engine": "loop"}})
    first = TrainerRunner(tiny_zoo, settings, state)
    first.maybe_start()
    first.thread.join(300)
    assert first.done and first.error is None and first.iteration == 1
    metrics = state.logs_dir / "metrics.jsonl"
    with open(metrics, "a") as f:                 # what the killed run wrote after its checkpoint
        f.write(json.dumps({"iteration": 2, "lost": True}) + "\n")
        f.write('{"iteration": 3, "lo')
    settings.max_iterations = 2
    second = TrainerRunner(tiny_zoo, settings, state)
    second.maybe_start()
    second.thread.join(300)
    assert second.resumed and second.done and second.error is None and second.iteration == 2
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert not any(r.get("lost") for r in rows) and all("step_s" in r for r in rows)
