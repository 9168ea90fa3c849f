"""The data-free screen (server/screen.py): harmful tiny models are quarantined before training uses
them, honest ones pass, verdicts and quarantine survive a restart, a release is used from then on."""

from __future__ import annotations

import json

import pytest

from free_dfml.common.cli import run_cli
from free_dfml.server.cli import app as server_cli
from free_dfml.server.quarantine import Quarantine
from free_dfml.server.screen import FILE_NAME, REASON_PREFIX, Screen, ScreenConfig, screen_config
from free_dfml.server.settings import ServerSettings
from free_dfml.server.state import StateDir
from free_dfml.server.zoo import Zoo
from harmful import SCREENED, tiny


@pytest.fixture(scope="module")
def harmful_packages(fake_dataset, tiny_packages):
    edited = {"constant", "lying_norm", "head_permuted"}      # edits of an honest model
    return {kind: tiny(kind, fake_dataset, range(8, 12), seed=1,
                       **({"base": tiny_packages[4]} if kind in edited else {})) for kind in SCREENED}


@pytest.mark.parametrize("kind", SCREENED)
def test_each_screened_harmful_type_is_quarantined(tmp_path, harmful_packages, kind):
    zoo = Zoo(tmp_path / "zoo")
    mid, _ = zoo.add(harmful_packages[kind])
    screen = Screen(zoo)
    assert screen.usable([mid]) == [] and mid in zoo.quarantine.ids() and mid not in zoo.usable_ids()
    entry = zoo.quarantine.entries()[0]
    assert entry["source"] == "screen" and entry["reason"].startswith(REASON_PREFIX)
    assert {"inversion_ce", "bn_mismatch", "noise_match", "threshold_max_inversion_ce"} <= set(entry["scores"])


def test_honest_tiny_models_pass(tmp_path, tiny_packages):
    zoo = Zoo(tmp_path / "zoo")
    ids = [zoo.add(p)[0] for p in tiny_packages[:3]]
    screen = Screen(zoo)
    assert screen.usable(ids) == ids and not zoo.quarantine.ids()
    v = screen.verdicts()
    assert all(v[m]["passed"] and v[m]["reasons"] == [] for m in ids)
    assert all(v[m]["scores"]["seconds"] < 10 for m in ids)


def test_verdicts_and_quarantine_survive_restart_and_release_counts(tmp_path, tiny_packages, harmful_packages,
                                                                   monkeypatch, capsys):
    from free_dfml.server import screen as screen_mod
    from free_dfml.server.state import build_status
    state = StateDir(tmp_path / "state").create()
    zoo = Zoo(state.zoo_dir)
    good = zoo.add(tiny_packages[0])[0]
    bad = zoo.add(harmful_packages["random"])[0]
    assert Screen(zoo).usable(sorted(zoo.usable_ids())) == [good]
    # restart: new objects on the same folder; nothing is screened again
    monkeypatch.setattr(screen_mod, "signals", lambda *a, **k: pytest.fail("screened twice"))
    zoo2 = Zoo(state.zoo_dir)
    assert Screen(zoo2).usable(zoo2.usable_ids()) == [good]
    doc = json.loads((state.zoo_dir / FILE_NAME).read_text())
    assert doc["models"][bad]["passed"] is False and doc["models"][good]["passed"] is True
    st = build_status(state, phase="training", started_at=0.0, zoo_size=len(zoo2), training={})
    assert st["quarantined"][0]["id"] == bad and st["quarantined"][0]["source"] == "screen"
    assert run_cli(server_cli, "free-server", ["quarantine", "list", "--state", str(state.root)]) == 0
    assert REASON_PREFIX in capsys.readouterr().out
    Quarantine.of_zoo(state.zoo_dir).release(bad[:12])         # the operator, another process
    zoo3 = Zoo(state.zoo_dir)
    assert sorted(Screen(zoo3).usable(zoo3.usable_ids())) == sorted([good, bad])


def test_trainer_never_uses_a_screened_out_model(tmp_path, tiny_packages, harmful_packages):
    from free_dfml.common.presets import free_config
    from free_dfml.server.trainer import FreeTrainer
    zoo = Zoo(tmp_path / "zoo")
    good = sorted(zoo.add(p)[0] for p in tiny_packages[:2])
    bad = zoo.add(harmful_packages["lying_norm"])[0]
    cfg = free_config("tiny", schedule={"teachers_per_iter": 3})
    t = FreeTrainer(zoo, cfg, device="cpu", screen=Screen(zoo, screen_config(None, cfg.learner)))
    t.step()
    assert sorted(m for m, _, _ in t.last_inversions) == good and bad not in t.bank.models()
    assert t.norm[0] != (0.0, 0.0, 0.0)        # the liar's claimed normalisation is not averaged in


def test_settings_carry_the_thresholds():
    s = ServerSettings()
    d = ScreenConfig()
    assert s.screen is False
    assert (s.screen_max_inversion_ce, s.screen_max_bn_mismatch, s.screen_min_noise_match) == \
        (d.max_inversion_ce, d.max_bn_mismatch, d.min_noise_match)
    rc = ServerSettings(screen=True, screen_max_inversion_ce=0.5).to_run_config()
    back = ServerSettings.from_run_config(rc)
    assert back.screen is True and screen_config(back).max_inversion_ce == 0.5


def test_start_options_and_config_keys_turn_it_on(tmp_path):
    from free_dfml.server.settings import settings_from
    state = StateDir(tmp_path / "state")
    assert settings_from(state, {}, screen=True).screen is True       # free-server start --screen
    s = settings_from(state, {"screen": True, "screen-min-noise-match": 0.2})
    assert s.screen is True and screen_config(s).min_noise_match == 0.2


def test_groupnorm_models_are_screened_by_inversion_alone(tmp_path, fake_dataset):
    from free_dfml.client.train import TrainConfig, train_client
    honest, _ = train_client(fake_dataset, [0, 1, 2, 3], TrainConfig(epochs=4, arch_kwargs={"width": 8, "norm": "gn"}))
    const = tiny("constant", fake_dataset, range(4), base=honest)
    zoo = Zoo(tmp_path / "zoo")
    good, bad = zoo.add(honest)[0], zoo.add(const)[0]
    screen = Screen(zoo)
    assert screen.usable([good, bad]) == [good]
    v = screen.verdicts()
    assert v[good]["scores"]["bn_mismatch"] == "nan" and v[good]["scores"]["noise_match"] == "nan"
    assert len(v[bad]["reasons"]) == 1 and v[bad]["reasons"][0].startswith("inversion CE")


def test_every_generator_gives_a_distinct_valid_package(fake_dataset, tiny_packages):
    from free_dfml.common.package import package_from_bytes
    from harmful import GENERATORS, HARMFUL_TYPES
    assert set(HARMFUL_TYPES) | {"honest", "weak"} == set(GENERATORS)
    pkgs = {kind: tiny(kind, fake_dataset, range(12, 16), seed=2,
                       **({"base": tiny_packages[3]} if kind in ("constant", "lying_norm", "head_permuted") else {}))
            for kind in GENERATORS}
    ids = {kind: package_from_bytes(p.to_bytes()).model_id for kind, p in pkgs.items()}
    assert len(set(ids.values())) == len(ids) and tiny_packages[3].model_id not in ids.values()
    assert all(p.meta.num_classes == 4 for p in pkgs.values())
    assert pkgs["lying_norm"].meta.mean == (0.0, 0.0, 0.0) and pkgs["lying_norm"].meta.std == (1.0, 1.0, 1.0)
