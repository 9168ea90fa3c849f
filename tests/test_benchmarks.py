"""The benchmark harness: batched inversion equals the sequential loop; the tiny preset runs end to end.

No wall-clock assertions: speed-ups are measured and reported by the harness, never asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO))

from free_dfml.common.models import Normalized, build_model  # noqa: E402
from free_dfml.server import batched_inversion as bi  # noqa: E402
from free_dfml.server.meta_generator import MetaGenerator, Teacher, invert_from_scratch  # noqa: E402
from free_dfml.server.meta_learner import MetaLearner, build_learner  # noqa: E402


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _teacher(seed: int, *, arch: str = "conv4", num_classes: int = 5, width: int = 8, size: int = 32,
             channels: int = 3, norm: str = "bn") -> Teacher:
    torch.manual_seed(seed)
    net = build_model(arch, num_classes=num_classes, image_size=size, width=width, in_channels=channels, norm=norm)
    for m in net.modules():        # non-trivial BN statistics, so the BN term and eval-mode BN matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model = Normalized(net, (0.5, 0.4, 0.3)[:channels], (0.25, 0.3, 0.2)[:channels]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, (channels, size, size), num_classes, f"m{seed}")


def _zoo():
    """Same-structure teachers stacked in groups: three Conv4s, two ResNet-10s (the vmap engine under
    "auto"), two 40-px Conv4s (resized input), two grey Conv4s (channel mapping), two GroupNorm Conv4s
    (DP-style, no BN term); and alone (the plain loop): a 7-class Conv4."""
    return ([_teacher(i) for i in range(3)] + [_teacher(9, arch="resnet10", width=4)]
            + [_teacher(11, num_classes=7), _teacher(12, size=40), _teacher(13),
               _teacher(14, arch="resnet10", width=4), _teacher(15, size=40),
               _teacher(16, channels=1), _teacher(17, channels=1),
               _teacher(18, norm="gn"), _teacher(19, norm="gn")])


def _close(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x.images, y.images, atol=tol, rtol=0)
        assert torch.allclose(x.z, y.z, atol=tol, rtol=0)
        assert torch.equal(x.labels, y.labels)
        assert abs(x.final_ce - y.final_ce) < tol
        for k in x.last_grads:
            assert torch.allclose(x.last_grads[k], y.last_grads[k], atol=tol, rtol=0), k
            assert torch.allclose(x.params[k], y.params[k], atol=tol, rtol=0), k
        assert len(x.losses) == len(y.losses)
        for p, q in zip(x.losses, y.losses):
            assert p.keys() == q.keys()
            for k in p:
                assert abs(p[k] - q[k]) < tol


@pytest.mark.parametrize("lambda_bn,jitter,engine,lr", [(0.0, 0, "auto", 1e-3), (0.1, 0, "auto", 1e-3),
                                                        (0.1, 3, "auto", 1e-3), (0.1, 3, "vmap", 1e-3),
                                                        (0.0, 0, "auto", 1e-2)])    # 1e-2: the quick preset's
def test_batched_five_step_equals_sequential(float64, lambda_bn, jitter, engine, lr, monkeypatch):
    teachers = _zoo()
    learner = build_learner(5, width=8, rng=torch.Generator().manual_seed(3))
    meta = MetaLearner(learner)
    subsets = [None, None, None, None, [0, 2, 3, 5, 6], None, None, None, None, None, None, None, None]
    assert sorted(map(len, bi.group_teachers(teachers, lambda_bn))) == [1, 2, 2, 2, 2, 4]
    used = []                                    # which engine ran each stacked group
    for kind in (bi._GroupedConvEngine, bi._VmapEngine):
        monkeypatch.setattr(kind, "images", lambda self, p, z, _f=kind.images: used.append(type(self)) or _f(self, p, z))
    seq, bat = (MetaGenerator(nz=16, ngf=8, samples_per_class=3, inner_steps=3, lambda_bn=lambda_bn,
                              jitter=jitter, inner_lr=lr, rng=torch.Generator().manual_seed(1)) for _ in range(2))
    for it in range(2):   # two FIVE steps: the meta-update and the RNG streams stay in lockstep
        adv = 0.0 if it == 0 else 1.0
        a = seq.step(teachers, lambda_adv=adv, student=meta.student(), subsets=subsets)
        b = bi.five_step(bat, teachers, lambda_adv=adv, student_model=learner, subsets=subsets, engine=engine)
        _close(a, b, 1e-9)
        for p, q in zip(seq.generator.parameters(), bat.generator.parameters()):
            assert torch.allclose(p, q, atol=1e-9, rtol=0)
    # auto: the four Conv4 groups as grouped convolutions, the ResNet pair through vmap
    assert set(used) == ({bi._GroupedConvEngine, bi._VmapEngine} if engine == "auto" else {bi._VmapEngine})
    # the opaque student callable (per-teacher fallback) gives the same too
    c = bi.five_step(bat, teachers, lambda_adv=1.0, student=meta.student(), subsets=subsets, engine=engine)
    d = seq.step(teachers, lambda_adv=1.0, student=meta.student(), subsets=subsets)
    _close(d, c, 1e-9)


def test_grouped_conv_engine_takes_conv4_and_generator_only(float64):
    from free_dfml.server import grouped_nets
    from free_dfml.server.generator import Generator

    assert grouped_nets.supports(Generator(nz=8, ngf=4))
    assert grouped_nets.supports(_teacher(0).model) and grouped_nets.supports(_teacher(0, norm="gn").model.model)
    assert not grouped_nets.supports(_teacher(1, arch="resnet10", width=4).model)
    resnets = [_teacher(i, arch="resnet10", width=4) for i in (1, 2)]
    mg = MetaGenerator(nz=16, ngf=8, samples_per_class=2, inner_steps=1, rng=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="grouped-conv engine runs Conv4"):
        bi.five_step(mg, resnets, engine="grouped-conv")
    with pytest.raises(ValueError, match="engine must be one of"):
        bi.five_step(mg, resnets[:1], engine="fast")      # refused even where no group is stacked
    assert bi.engine_for(resnets, mg.generator) == "vmap"
    assert bi.engine_for([_teacher(3), _teacher(4)], mg.generator) == "grouped-conv"
    # the layout helpers invert each other, and roll() shifts each network's images by its own offset
    x = torch.randn(3, 2, 4, 5, 6)
    g = grouped_nets.to_grouped(x)
    assert g.shape == (2, 12, 5, 6) and torch.equal(grouped_nets.from_grouped(g, 3), x)
    shifts = torch.tensor([[0, 0], [1, -2], [4, 3]])
    rolled = grouped_nets.from_grouped(grouped_nets.roll(g, 3, shifts), 3)
    for t in range(3):
        assert torch.equal(rolled[t], torch.roll(x[t], tuple(shifts[t].tolist()), dims=(-2, -1)))


@pytest.mark.parametrize("jitter", [0, 2])
def test_batched_scratch_equals_sequential(float64, jitter):
    teachers = _zoo()[:5]
    kw = dict(nz=16, ngf=8, image_size=32, channels=3, steps=4, per_class=2, jitter=jitter)
    g = torch.Generator().manual_seed(5)
    a = [invert_from_scratch(t, rng=g, **kw) for t in teachers]
    b = bi.scratch_inversions(teachers, rng=torch.Generator().manual_seed(5), **kw)
    _close(a, b, 1e-9)


def test_install_hook_routes_trainer_steps_through_batched(float64, monkeypatch):
    """``install`` makes a trainer's ``metagen.step(...)`` call the batched step (same results)."""
    teachers = [_teacher(i) for i in range(4)]
    learner = build_learner(5, width=8, rng=torch.Generator().manual_seed(4))
    meta = MetaLearner(learner)
    seq, bat = (MetaGenerator(nz=16, ngf=8, samples_per_class=3, inner_steps=2,
                              rng=torch.Generator().manual_seed(2)) for _ in range(2))
    a = seq.step(teachers, lambda_adv=1.0, student=meta.student())

    class _Trainer:   # the two attributes install() uses
        metagen = bat

    _Trainer.learner = learner
    calls = []
    real = bi.five_step
    monkeypatch.setattr(bi, "five_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    bi.install(_Trainer)
    b = bat.step(teachers, lambda_adv=1.0, student=meta.student(), subsets=None)
    assert calls == [1]
    _close(a, b, 1e-9)
    bi.uninstall(_Trainer)
    assert "step" not in bat.__dict__


def test_tiny_preset_end_to_end(tmp_path):
    from benchmarks.report import PLOTS
    from benchmarks.run import SECTIONS, main

    out = tmp_path / "tiny"
    rc = main(["--preset", "tiny", "--dataset", "synthetic", "--out", str(out)])
    doc = json.loads((out / "results.json").read_text())
    assert rc == 0, doc["job_errors"]
    assert doc["preset"] == "tiny" and doc["seed"] == 0
    assert doc["overrides"] == {"dataset": "synthetic"} and doc["complete_preset"] is False
    m = doc["machine"]
    assert m["torch"] == torch.__version__ and m["cpu"] and "gpu" in m
    assert set(doc["sections"]) == set(SECTIONS)
    acc = doc["sections"]["accuracy"]["methods"]
    assert set(acc) == {"random", "average", "scratch", "free-noalign", "free", "oracle"}
    for r in acc.values():
        assert set(r["results"]) == {"1shot", "5shot"}
        assert 0.0 <= r["results"]["1shot"]["mean"] <= 1.0
        assert r["curve"]
    rec = doc["sections"]["recovery"]
    assert rec["models"] == 2 and set(rec["targets"]) == {"0.5", "0.8", "0.9"}
    assert len(rec["curves"]["five"]) == 5 and len(rec["curves"]["scratch"]) == 9
    assert [r["T"] for r in doc["sections"]["batched"]["rows"]] == [2, 4]
    assert all(r["speedup"] > 0 for r in doc["sections"]["batched"]["rows"])
    het = doc["sections"]["hetero"]
    assert set(het) == {"arch", "domain"}
    assert set(het["arch"]["zoo"]["mix"]) == {"conv4-w8@32px", "resnet10-w4@32px", "resnet18-w4@32px"}
    assert set(het["domain"]["zoo"]["mix"]) == {"conv4-w8@32px", "conv4-w8@64px"}
    for plan in het.values():
        assert set(plan["methods"]) == {"random", "average", "free"}
    sc = doc["sections"]["scaling"]
    assert [r["size"] for r in sc["rows"]] == [4, 8, 16]
    assert all(r["zoo_models"] == r["size"] and r["peak_rss_mb"] > 0 for r in sc["rows"])
    assert all(r["bank_mb"] <= r["bank_bound_mb"] == 0.5 for r in sc["rows"])     # the bank's bound holds
    assert doc["targets"]
    md = (out / "results.md").read_text()
    for needle in ("## 1. Accuracy", "## 2. Recovery speed", "## 3. Batched", "## 4. Heterogeneous",
                   "## 5. Scaling", "free-noalign", "oracle", "scratch", "average", "random"):
        assert needle in md
    for name in PLOTS.values():
        assert (out / name).stat().st_size > 1000, name
    assert not (out / "work").exists()


def test_trainer_with_batched_inversion_matches_plain_trainer(float64, tmp_path, monkeypatch):
    """A FreeTrainer with ``batched_inversion=True`` (FIVE steps through ``install``) trains to the same state (float64; the
    bank's uint8 images decode to float32, patched here to the default dtype)."""
    from free_dfml.common.package import make_package
    from free_dfml.server.memory_bank import MemoryBank
    from free_dfml.server.trainer import FreeConfig, FreeTrainer
    from free_dfml.server.zoo import Zoo

    zoo = Zoo(tmp_path / "zoo")
    for i in range(3):
        torch.manual_seed(100 + i)
        net = build_model("conv4", num_classes=5, width=4)
        zoo.add(make_package(net, arch="conv4", arch_kwargs={"width": 4}, num_classes=5,
                             input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.3,) * 3))
    monkeypatch.setattr(MemoryBank, "_decode", lambda self, x: x.to(torch.get_default_dtype())
                        / (255 if x.dtype == torch.uint8 else 1))
    cfg = FreeConfig.preset("tiny", warmup=1, iterations=3)
    plain = FreeTrainer(zoo, cfg, device="cpu")
    batched = FreeTrainer(zoo, FreeConfig.preset("tiny", warmup=1, iterations=3, batched_inversion=True),
                          device="cpu")
    assert "step" in batched.metagen.__dict__ and "step" not in plain.metagen.__dict__  # the switch installs it
    plain.run(3, progress=False)
    batched.run(3, progress=False)
    assert any(h.get("replay_batches", 0) > 0 and "bell_kl" in h for h in plain.history)  # L_adv, BELL, replay ran
    for a, b in ((plain.learner, batched.learner), (plain.metagen.generator, batched.metagen.generator)):
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-8, rtol=0), k
    assert [h["inversion_ce"] for h in plain.history] == pytest.approx(
        [h["inversion_ce"] for h in batched.history], abs=1e-8)


def test_set_overrides_preset_fields_and_refuses_bad_ones(capsys):
    from benchmarks.presets import get_preset, parse_setting
    from benchmarks.run import main

    over = dict(parse_setting(s) for s in ("iterations=1000", 'methods=["random", "free"]',
                                           'free={"inversion_jitter": 2}', "dataset=synthetic"))
    p = get_preset("quick", **over)
    assert (p.iterations, p.methods, p.dataset) == (1000, ("random", "free"), "synthetic")
    assert p.free_overrides()["inversion_jitter"] == 2
    for bad, msg in (("iterations=abc", "must be int"), ("nope=1", "unknown preset field"),
                     ('methods=["magic"]', "methods must be"), ('free={"inversion_jitter": -1}', "inversion_jitter"),
                     ("oops", "FIELD=VALUE"), ('methods=["random"]', "recovery section")):
        with pytest.raises(SystemExit) as e:
            main(["--preset", "tiny", "--set", bad, "--out", "/nonexistent/never-written"])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_full_preset_clients_get_the_papers_images_per_class():
    """480 training and 120 held-out images a class (the paper's split), never the glyph
    renderer's 40-image default, and a real data set with fewer can say ``null``."""
    from benchmarks.presets import get_preset, parse_setting
    from free_dfml.client.train import TrainConfig

    p = get_preset("full")
    held = round(p.images_per_class * TrainConfig().holdout)
    assert (p.images_per_class - held, held) == (480, 120)
    assert p.images_per_class > get_preset("quick").images_per_class
    assert get_preset("full", **dict([parse_setting("images_per_class=null")])).images_per_class is None


def test_meta_val_sweep_scores_every_variant_and_seed_on_meta_val(tmp_path, capsys):
    from benchmarks.meta_val_sweep import main

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
    from benchmarks.meta_val_sweep import table      # a variant whose runs all failed: dashes, no crash
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

    from benchmarks.bank_diversity import key_stats, main

    # the statistic itself: 3 visits of 4 copies of one image each -> zero distance within a visit only
    teacher = tiny_zoo.teacher(tiny_zoo.ids()[0])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 3, 32, 32, generator=g).expand(3, 4, 3, 32, 32).reshape(12, 3, 32, 32)
    st = key_stats(x, teacher, (3, 32, 32), cls=0, m=4)
    assert st["visits"] == 3 and 0 <= st["agree"] <= 1
    assert st["pix_within"] == pytest.approx(0, abs=1e-6) and st["feat_within"] == pytest.approx(0, abs=1e-5)
    assert st["pix_across"] > 0.1 and st["feat_across"] > 0

    from benchmarks.bank_diversity import bank_stats     # one palette for every teacher -> no spread
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
    from benchmarks.recovery_curve import main, summarize

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
    from benchmarks.recovery_curve import main
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


def test_harness_workers_exit_when_the_harness_is_killed(tmp_path):
    """A harness killed outright (SIGKILL: no cleanup runs) takes its worker processes with it."""
    import os
    import signal
    import subprocess
    import time

    (tmp_path / "hangjob.py").write_text(
        "import os, time\n"
        "def hang(ctx, deps):\n"
        f"    open({str(tmp_path / 'worker.pid')!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n")
    script = ("from benchmarks.jobs import Ctx, Job, run_jobs\n"
              "run_jobs([Job('hang', 'hangjob:hang')], Ctx(None, '.', '.', 'cpu'), workers=1, threads=1)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    harness = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    pid_file = tmp_path / "worker.pid"
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert harness.poll() is None and time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert _alive(worker)
    finally:
        harness.send_signal(signal.SIGKILL)
        harness.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(worker):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived the killed harness")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state
