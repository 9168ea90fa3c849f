"""The one-off studies in experiments/ still run: the meta-val sweep, the memory-bank diversity
probe and the recovery curve, each on the tiny preset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # `experiments` and `benchmarks` are top-level folders, not installed
    sys.path.insert(0, str(REPO))


def test_meta_val_sweep_scores_every_variant_and_seed_on_meta_val(tmp_path, capsys):
    from experiments.meta_val_sweep import main

    out = tmp_path / "sweep"
    rc = main(["--out", str(out), "--preset", "tiny", "--dataset", "synthetic", "--iterations", "2",
               "--every", "1", "--episodes", "4", "--seeds", "0,1", "--workers", "0",
               "--variant", "base={}", "--variant", 'j1={"inversion_jitter": 1}'])
    assert rc == 0
    runs = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("base", 0), ("base", 1), ("j1", 0), ("j1", 1)]
    assert all([c["iteration"] for c in r["curve"]] == [1, 2] for r in runs)
    assert all(0 <= c["acc"] <= 100 for r in runs for c in r["curve"])
    md = (out / "sweep.md").read_text()
    assert "| iteration | seed | base | j1 | j1 - base |" in md and "**mean**" in md
    from experiments.meta_val_sweep import table      # a variant whose runs all failed: dashes, no crash
    assert "| **2** | **mean** | " in table([r for r in runs if r["variant"] == "base"], ["base", "j1"])
    capsys.readouterr()
    for bad, msg in (("j=oops", "not JSON"), ('j={"inversion_jitter": -3}', "inversion_jitter"),
                     ('j={"nope": 1}', "unknown FreeConfig key")):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "never"), "--preset", "tiny", "--variant", bad])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_bank_diversity_measures_within_and_across_visits(tmp_path, tiny_zoo, capsys):
    import torch

    from experiments.bank_diversity import key_stats, main

    # the statistic itself: 3 visits of 4 copies of one image each -> zero distance within a visit only
    teacher = tiny_zoo.teacher(tiny_zoo.ids()[0])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 3, 32, 32, generator=g).expand(3, 4, 3, 32, 32).reshape(12, 3, 32, 32)
    st = key_stats(x, teacher, (3, 32, 32), cls=0, m=4)
    assert st["visits"] == 3 and 0 <= st["agree"] <= 1
    assert st["pix_within"] == pytest.approx(0, abs=1e-6) and st["feat_within"] == pytest.approx(0, abs=1e-5)
    assert st["pix_across"] > 0.1 and st["feat_across"] > 0

    from experiments.bank_diversity import bank_stats     # one palette for every teacher -> no spread
    grey = [torch.full((4, 3, 8, 8), 0.5), torch.full((4, 3, 8, 8), 0.5)]
    assert bank_stats(grey, ["a", "b"]) == {"pix_between": pytest.approx(0), "colour_spread": pytest.approx(0)}
    red, blue = torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)
    red[:, 0], blue[:, 2] = 1, 1
    st = bank_stats([red, red, blue], ["a", "a", "b"])          # two keys of teacher a, one of b
    assert st["pix_between"] == pytest.approx((2 / 3) ** 0.5) and st["colour_spread"] > 0.4

    out = tmp_path / "div"
    main(["--zoo", str(tiny_zoo.root), "--out", str(out), "--preset", "tiny", "--iterations", "6",
          "--workers", "0", "--variant", "base={}", "--variant", 's2={"inversion": "scratch", "scratch_steps": 2}'])
    rows = [json.loads(x) for x in (out / "diversity.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["base", "s2"]
    for r in rows:
        assert r["keys"] > 0 and r["visits"] >= 2 and 0 <= r["agree"] <= 1
        assert all(r[k] >= 0 for k in ("feat_within", "feat_across", "pix_within", "pix_across", "pix_between",
                                       "colour_spread"))
        assert (out / f"grid_{r['variant']}.png").stat().st_size > 0
    assert "| base |" in (out / "diversity.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--zoo", str(tiny_zoo.root), "--out", str(tmp_path / "never"), "--variant", 'j={"nope": 1}'])
    assert e.value.code == 2 and "unknown FreeConfig key" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_recovery_curve_probes_held_out_models_along_training(tmp_path, tiny_zoo, capsys):
    from experiments.recovery_curve import main, summarize

    # the summary: steps to 0.9 per model, a FIVE already there at step 0 counts as 1 step
    five = [[0.95, 1.0, 1.0], [0.1, 0.5, 0.92]]
    scratch = [[0.0, 0.2, 0.95], [0.0, 0.1, 0.3]]
    s = summarize(five, scratch, k=1)
    assert s["five_agree_k"] == pytest.approx(0.75) and s["scratch_agree_k"] == pytest.approx(0.15)
    assert s["five_reached"] == 2 and s["five_steps"] == 0 and s["scratch_steps"] == 2
    assert s["steps_ratio"] == pytest.approx(2.0)         # only model 0: scratch reached 0.9 there
    assert summarize([[0.1]], [[0.2]], k=0)["steps_ratio"] is None

    out = tmp_path / "curve"
    main(["--zoo", str(tiny_zoo.root), "--out", str(out), "--preset", "tiny", "--heldout", "1",
          "--iterations", "4", "--every", "2", "--workers", "0"])
    (r,) = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    held = tiny_zoo.ids()[-1]
    assert r["heldout"] == [held]
    from free_dfml.server.zoo import Zoo
    trained_on = Zoo(out / "work" / "zoo-base-0").ids()
    assert held not in trained_on and sorted(trained_on) == sorted(tiny_zoo.ids()[:-1])
    pts = r["points"]
    assert [pt["iteration"] for pt in pts] == [0, 2, 4]
    assert all(0 <= pt["five_agree_k"] <= 1 and 0 <= pt["saturated"] <= 1 and pt["five_ce0"] > 0 for pt in pts)
    assert len({pt["scratch_agree_k"] for pt in pts}) == 1      # scratch does not depend on training
    assert (out / "curve.png").stat().st_size > 0 and "| base | 0 | 4 |" in (out / "curve.md").read_text()
    reach = r["scratch_reach"]
    for i, final in enumerate(r["scratch_final"]):     # a higher agreement is never reached sooner
        steps = [reach[t][i] for t in ("0.5", "0.8", "0.9")]
        assert all(a is not None and (b is None or a <= b) for a, b in zip(steps, steps[1:]) if b is not None)
        assert final < 0.9 or steps[2] is not None     # ended at 0.9 or above: it reached 0.9 on the way
    md = (out / "curve.md").read_text()
    assert "## A fresh generator alone" in md and f"| base | {held[:12]} |" in md
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--zoo", str(tiny_zoo.root), "--out", str(tmp_path / "never"), "--heldout", "4"])
    assert e.value.code == 2 and "--heldout must be between 1 and 3" in capsys.readouterr().err


def test_recovery_curve_trains_the_presets_zoo_when_none_is_given(tmp_path, capsys):
    """Without --zoo the preset's main plan is trained into OUT/work/zoo-main (clients, then the
    held-out ones), its last heldout_clients models are held out, and a second run reuses it."""
    from benchmarks.presets import get_preset
    from experiments.recovery_curve import main
    from benchmarks.zoos import main_plan
    from free_dfml.server.zoo import Zoo

    out = tmp_path / "curve"
    args = ["--out", str(out), "--preset", "tiny", "--set", "dataset=synthetic", "--set", "clients=3",
            "--iterations", "1", "--every", "1", "--workers", "0"]
    main(args)
    zoo = Zoo(out / "work" / "zoo-main")
    ids = zoo.ids()
    assert len(ids) == 3 + 2
    plan = main_plan(get_preset("tiny", dataset="synthetic", clients=3))
    assert [zoo.meta(m).training["seed"] for m in ids] == [s.seed for s in plan]    # plan order
    (r,) = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert r["heldout"] == ids[-2:] and r["device"] == "cpu"
    assert set(r["scratch_reach"]) == {"0.5", "0.8", "0.9"} and all(len(v) == 2 for v in r["scratch_reach"].values())
    capsys.readouterr()
    main(args)
    assert "reusing the 5-model zoo" in capsys.readouterr().out
    assert Zoo(out / "work" / "zoo-main").ids() == ids
    assert len((out / "curve.jsonl").read_text().splitlines()) == 2
