"""Quarantine (server/quarantine.py), the non-finite step guard (server/step_guard.py), the refusal
of non-finite checkpoints, and the DP admission policy (server/policy.py) through the ingest service
with the fake grid of tests/test_service.py. In process, tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from free_dfml.common.cli import run_cli
from free_dfml.common.package import make_package, save_package
from free_dfml.server.cli import app as server_cli
from free_dfml.server.quarantine import NONFINITE_REASON, Quarantine
from free_dfml.server.settings import ServerSettings
from free_dfml.server.state import StateDir
from free_dfml.server.zoo import Zoo
from test_service import FakeGrid, make_server, poll, submissions, supernode, task_identity  # noqa: F401


def cli(*args: str) -> int:
    return run_cli(server_cli, "free-server", list(args))


def tiny_free(**over):
    from free_dfml.common.presets import free_config
    over.setdefault("generator", {}).setdefault("engine", "loop")   # the NaN teacher below is a wrapper module
    return free_config("tiny", **over)


# ---------------------------------------------------------------------------------- the store

def test_quarantined_model_kept_skipped_released_deleted_across_restarts(tmp_path, tiny_packages, capsys):
    state = StateDir(tmp_path / "state").create()
    zoo = Zoo(state.zoo_dir)
    ids = [zoo.add(p)[0] for p in tiny_packages[:3]]
    bad, other = ids[1], ids[2]
    zoo.quarantine.add(bad, "screen says no", {"score": 0.1}, source="screen")
    assert bad not in zoo.usable_ids() and bad in zoo.ids() and len(zoo) == 3
    again = Zoo(state.zoo_dir)                                       # a restart
    assert again.usable_ids() == [m for m in again.ids() if m != bad]
    assert (state.zoo_dir / "models" / f"{bad}.safetensors").is_file()
    assert cli("quarantine", "list", "--state", str(state.root)) == 0
    out = capsys.readouterr().out
    assert bad in out and "screen says no" in out and '"score": 0.1' in out
    # one-line errors: unknown id, no state folder, a model that is not quarantined
    assert cli("quarantine", "release", "ffff", "--state", str(state.root)) == 1
    assert cli("quarantine", "delete", "nope", "--state", str(tmp_path / "missing")) == 2
    assert cli("quarantine", "delete", other[:12], "--state", str(state.root)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("free-server: error: ") for e in err)
    assert "no quarantined model" in err[0] and "no state folder" in err[1]
    # release by prefix: a running server's zoo object sees it at once
    assert cli("quarantine", "release", bad[:12], "--state", str(state.root)) == 0
    assert bad in zoo.usable_ids() and bad in Zoo(state.zoo_dir).usable_ids()
    # delete: the package leaves the zoo, the id stays refused
    zoo.quarantine.add(other, NONFINITE_REASON, {"inversion_ce": "nan"})
    assert cli("quarantine", "delete", other, "--state", str(state.root)) == 0
    assert not (state.zoo_dir / "models" / f"{other}.safetensors").exists()
    assert other not in zoo.usable_ids()                            # the running server's zoo skips it
    fresh = Zoo(state.zoo_dir)
    assert other not in fresh.ids() and len(fresh) == 2 and fresh.quarantine.is_deleted(other)
    assert other not in (state.zoo_dir / "index.jsonl").read_text()
    assert cli("quarantine", "list", "--state", str(state.root)) == 0
    assert "no quarantined models" in capsys.readouterr().out


# --------------------------------------------------------------------------- poison numerics

class NaNOnGenerated(nn.Module):
    """A teacher that looks fine on a constant probe but gives NaN on anything with variance."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        varied = x.flatten(1).std(1) > 1e-3
        return torch.where(varied[:, None], torch.full_like(out, float("nan")), out)


def test_nonfinite_step_quarantines_the_teacher_and_restores(tmp_path, tiny_packages, monkeypatch, capsys):
    from free_dfml.server.service import FreeServer  # noqa: F401 - the service's imports load first
    from free_dfml.server.state import build_status
    from free_dfml.server.training_runner import TrainerRunner
    state = StateDir(tmp_path / "state").create()
    zoo = Zoo(state.zoo_dir)
    ids = sorted(zoo.add(p)[0] for p in tiny_packages[:3])
    poison = ids[1]
    assert torch.isfinite(zoo.teacher(poison)(torch.full((2, 3, 32, 32), 0.5))).all()   # passes a probe
    real = zoo.teacher

    def teacher(model_id, device="cpu"):
        m = real(model_id, device)
        return NaNOnGenerated(m) if model_id == poison else m
    monkeypatch.setattr(zoo, "teacher", teacher)
    settings = ServerSettings(state_dir=str(state.root), device="cpu", preset="tiny", checkpoint_every=1,
                              max_iterations=4, free_config={"generator": {"engine": "loop"},
                                                             "schedule": {"teachers_per_iter": 3}})
    runner = TrainerRunner(zoo, settings, state)
    runner.maybe_start()
    runner.thread.join(300)
    assert runner.done and runner.error is None and runner.iteration == 4
    entries = zoo.quarantine.entries()
    assert [e["id"] for e in entries] == [poison]
    e = entries[0]
    assert e["reason"] == NONFINITE_REASON and e["source"] == "training" and e["scores"]["iteration"] == 1
    assert e["scores"]["inversion_ce"] == "nan" and isinstance(e["scores"]["images_finite"], bool)
    assert poison not in runner.trainer.bank.models() and poison not in zoo.usable_ids()
    rows = [json.loads(line) for line in (state.logs_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]            # the failed step is redone, not logged
    assert all(r["zoo_size"] == 2 and all(not isinstance(v, float) or math.isfinite(v) for v in r.values())
               for r in rows)
    from free_dfml.server import checkpoint as ckpt
    tensors, meta = ckpt.load_checkpoint(runner.trainer.checkpoint_path)
    assert meta["iteration"] == 4 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert runner.summary()["nonfinite_steps"][0]["quarantined"] == [poison]
    st = build_status(state, phase="training", started_at=0.0, zoo_size=len(zoo), training=runner.summary())
    assert st["models"]["quarantined"] == 1 and st["quarantined"][0]["id"] == poison
    state.write_status(st)
    assert cli("status", "--state", str(state.root)) == 0
    out = capsys.readouterr().out
    assert "quarantine 1 model(s)" in out and f"! {poison[:16]}  {NONFINITE_REASON}" in out


def test_released_model_used_from_the_next_iteration(tmp_path, tiny_packages):
    from free_dfml.server.trainer import FreeTrainer
    zoo = Zoo(tmp_path / "zoo")
    ids = sorted(zoo.add(p)[0] for p in tiny_packages[:3])
    zoo.quarantine.add(ids[0], "test")
    t = FreeTrainer(zoo, tiny_free(schedule={"teachers_per_iter": 3}), device="cpu")
    t.step()
    assert sorted(m for m, _, _ in t.last_inversions) == ids[1:] and t.history[-1]["zoo_size"] == 2
    Quarantine.of_zoo(tmp_path / "zoo").release(ids[0][:10])         # another process, e.g. the CLI
    t.step()
    assert sorted(m for m, _, _ in t.last_inversions) == ids and t.history[-1]["zoo_size"] == 3


def test_nonfinite_checkpoint_is_refused(tmp_path, tiny_zoo):
    from free_dfml.server.checkpoint import CheckpointError
    from free_dfml.server.trainer import FreeTrainer
    t = FreeTrainer(tiny_zoo, tiny_free(), state_dir=tmp_path / "ck", device="cpu")
    t.checkpoint()
    before = t.checkpoint_path.read_bytes()
    with torch.no_grad():
        next(t.learner.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite checkpoint"):
        t.checkpoint()
    assert t.checkpoint_path.read_bytes() == before and not list((tmp_path / "ck").glob(".*.tmp"))


# ------------------------------------------------------------------------------ DP admission

@pytest.fixture()
def dp_files(tmp_path):
    """Untrained GroupNorm Conv4-8 packages: m0 without DP, m1 with epsilon 8, m2 with epsilon 2
    (the policy reads the DP metadata only)."""
    from free_dfml.common.models import build_model
    out = {}
    for i, dp in enumerate((None, {"epsilon": 8.0, "delta": 1e-5}, {"epsilon": 2.0, "delta": 1e-5})):
        torch.manual_seed(i)
        kw = {"width": 8, "norm": "gn"}
        pkg = make_package(build_model("conv4", num_classes=4, **kw), arch="conv4", arch_kwargs=kw, num_classes=4,
                           input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, dp=dp)
        save_package(pkg, tmp_path / f"m{i}.safetensors")
        out[i] = tmp_path / f"m{i}.safetensors"
    return out


@pytest.mark.parametrize("require_dp,max_eps,accepted", [(True, 4.0, {2}), (True, 0.0, {1, 2}),
                                                         (False, 4.0, {2}), (False, 0.0, {0, 1, 2})])
def test_dp_policy_over_the_wire(tmp_path, dp_files, require_dp, max_eps, accepted, capsys):
    grid = FakeGrid()
    nodes = {i: supernode(tmp_path, dp_files[i]) for i in range(3)}
    grid.nodes = {i: h for i, (h, _) in nodes.items()}
    srv = make_server(tmp_path, grid, require_dp=require_dp, max_epsilon=max_eps)
    poll(srv)
    acks = {i: json.loads(a.read_text()) for i, (_, a) in nodes.items()}
    assert {i for i, a in acks.items() if a["accepted"]} == accepted and len(srv.zoo) == len(accepted)
    subs = {s["node"]: s for s in submissions(srv)}
    for i in set(range(3)) - accepted:
        assert subs[i]["event"] == "rejected" and subs[i]["category"] == "dp-policy"
        assert acks[i]["reason"] == subs[i]["reason"]
        assert ("has none" if i == 0 else "above the server's maximum 4") in acks[i]["reason"]
    srv.write_status(force=True)
    st = srv.state.read_status()
    n_rejected = 3 - len(accepted)
    assert st["models"]["rejected_by_category"] == ({"dp-policy": n_rejected} if n_rejected else {})
    assert st["settings"]["require_dp"] is require_dp and st["settings"]["max_epsilon"] == max_eps
    if n_rejected:
        assert cli("status", "--state", str(srv.state.root)) == 0
        out = capsys.readouterr().out
        assert f"{n_rejected} rejected (dp-policy {n_rejected})" in out and "- rejected (dp-policy): " in out


def test_deleted_model_refused_when_sent_again(tmp_path, dp_files):
    grid = FakeGrid()
    grid.nodes = {1: supernode(tmp_path, dp_files[0])[0]}
    srv = make_server(tmp_path, grid)
    poll(srv)
    (mid,) = srv.zoo.ids()
    srv.zoo.quarantine.add(mid, "test")
    srv.zoo.quarantine.delete(mid, srv.zoo)
    handler, ack = supernode(tmp_path, dp_files[0])
    grid.nodes[2] = handler
    poll(srv)
    doc = json.loads(ack.read_text())
    assert doc["accepted"] is False and "deleted by the server's operator" in doc["reason"] and len(srv.zoo) == 0


def test_dp_policy_settings_from_the_config_file_and_flags(tmp_path):
    from free_dfml.common.cli import CliError
    from free_dfml.server.settings import settings_from
    state = StateDir(tmp_path / "s")
    s = settings_from(state, {"require-dp": True, "max-epsilon": 4})
    assert s.require_dp is True and s.max_epsilon == 4
    assert ServerSettings.from_run_config(s.to_run_config()).max_epsilon == 4
    s = settings_from(state, {"require-dp": False}, require_dp=True, max_epsilon=2.5)
    assert s.require_dp is True and s.max_epsilon == 2.5
    for bad in ({"max-epsilon": "lots"}, {"max-epsilon": -1}, {"require-dp": "yes"}):
        with pytest.raises(CliError, match="max-epsilon|require-dp"):
            settings_from(state, bad)
