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
    cfg = FreeConfig.preset("tiny", warmup=1, scratch_steps=3, inversion=inversion)
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
    assert doc["iteration"] == 1 and doc["config"]["ngf"] == 8
    assert any(k.startswith("opt.generator.") for k in keys)
    assert "rng.trainer" in keys and any(k.startswith("bank.") for k in keys)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_resume_refuses_a_different_config(tmp_path, tiny_zoo):
    FreeTrainer(tiny_zoo, FreeConfig.preset("tiny"), state_dir=tmp_path, device="cpu").checkpoint()
    other = FreeTrainer(tiny_zoo, FreeConfig.preset("tiny", ngf=4), state_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="ngf"):
        other.resume()
    assert not FreeTrainer(tiny_zoo, FreeConfig.preset("tiny"), state_dir=tmp_path / "none",
                           device="cpu").resume()
