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
from free_dfml.server.inversion_engine import get_engine  # noqa: E402
from free_dfml.server.meta_generator import MetaGenerator, Teacher  # noqa: E402
from free_dfml.server.meta_learner import MetaLearner, build_learner  # noqa: E402
from free_dfml.server.stacked_inversion import group_teachers  # noqa: E402
from free_dfml.server.stacked_nets import GroupedNets, VmapNets, nets_for  # noqa: E402


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


# each knob at both of its values over three cases: BN loss off/on, jitter off/on, both engines, and
# 1e-2 (the quick preset's inner lr) as well as 1e-3
@pytest.mark.parametrize("lambda_bn,jitter,engine,lr", [(0.1, 3, "grouped", 1e-3), (0.1, 3, "vmap", 1e-3),
                                                        (0.0, 0, "grouped", 1e-2)])
def test_batched_engine_five_step_equals_sequential(float64, lambda_bn, jitter, engine, lr, monkeypatch):
    teachers = _zoo()
    learner = build_learner(5, width=8, rng=torch.Generator().manual_seed(3))
    meta = MetaLearner(learner)
    subsets = [None, None, None, None, [0, 2, 3, 5, 6], None, None, None, None, None, None, None, None]
    assert sorted(map(len, group_teachers(teachers, lambda_bn))) == [1, 2, 2, 2, 2, 4]
    used = []                                    # which networks ran each stacked group
    for kind in (GroupedNets, VmapNets):
        monkeypatch.setattr(kind, "images", lambda self, p, z, _f=kind.images: used.append(type(self)) or _f(self, p, z))
    seq, bat = (MetaGenerator(nz=16, ngf=8, samples_per_class=3, inner_steps=3, lambda_bn=lambda_bn,
                              jitter=jitter, inner_lr=lr, rng=torch.Generator().manual_seed(1)) for _ in range(2))
    eng = get_engine(engine)
    for it in range(2):   # two FIVE steps: the meta-update and the RNG streams stay in lockstep
        adv = 0.0 if it == 0 else 1.0
        a = seq.step(teachers, lambda_adv=adv, student=meta.student(), subsets=subsets)
        b = eng.five_step(bat, teachers, lambda_adv=adv, student_model=learner, subsets=subsets)
        _close(a, b, 1e-9)
        for p, q in zip(seq.generator.parameters(), bat.generator.parameters()):
            assert torch.allclose(p, q, atol=1e-9, rtol=0)
    # grouped: the four Conv4 groups as grouped convolutions, the ResNet pair through vmap
    assert set(used) == ({GroupedNets, VmapNets} if engine == "grouped" else {VmapNets})
    assert "step" not in bat.__dict__ and "step" not in seq.__dict__       # nothing rebound


def test_grouped_nets_take_conv4_and_generator_only_and_engines_are_named(float64):
    from free_dfml.server import grouped_nets
    from free_dfml.server.generator import Generator

    assert grouped_nets.supports(Generator(nz=8, ngf=4))
    assert grouped_nets.supports(_teacher(0).model) and grouped_nets.supports(_teacher(0, norm="gn").model.model)
    assert not grouped_nets.supports(_teacher(1, arch="resnet10", width=4).model)
    resnets = [_teacher(i, arch="resnet10", width=4) for i in (1, 2)]
    convs = [_teacher(3), _teacher(4)]
    gen = Generator(nz=16, ngf=8)
    learner = build_learner(5, width=8)
    assert nets_for(resnets, gen, None, prefer_grouped=True) is VmapNets
    assert nets_for(convs, gen, learner, prefer_grouped=True) is GroupedNets
    assert nets_for(convs, gen, build_learner(5, arch="resnet10", width=4), prefer_grouped=True) is VmapNets
    assert nets_for(convs, gen, learner, prefer_grouped=False) is VmapNets
    with pytest.raises(ValueError, match="inversion engine must be one of auto, loop, vmap, grouped"):
        get_engine("fast")
    # the layout helpers invert each other, and roll() shifts each network's images by its own offset
    x = torch.randn(3, 2, 4, 5, 6)
    g = grouped_nets.to_grouped(x)
    assert g.shape == (2, 12, 5, 6) and torch.equal(grouped_nets.from_grouped(g, 3), x)
    shifts = torch.tensor([[0, 0], [1, -2], [4, 3]])
    rolled = grouped_nets.from_grouped(grouped_nets.roll(g, 3, shifts), 3)
    for t in range(3):
        assert torch.equal(rolled[t], torch.roll(x[t], tuple(shifts[t].tolist()), dims=(-2, -1)))


def test_engine_is_chosen_from_config_and_device_or_passed_in(tmp_path, tiny_zoo):
    """``generator.engine``: "auto" is the loop on CPU and grouped on CUDA; the old on/off switch
    maps to grouped / loop; a trainer takes the engine it is given."""
    from free_dfml.common.config import FreeConfig
    from free_dfml.server.inversion_engine import BatchedEngine, LoopEngine, engine_name, inversion_engine
    from free_dfml.server.trainer import FreeTrainer

    assert engine_name("auto", "cpu") == "loop" and engine_name("auto", "cuda") == "grouped"
    assert engine_name("auto", torch.device("cuda", 0)) == "grouped"
    assert [engine_name(e, "cpu") for e in ("loop", "vmap", "grouped")] == ["loop", "vmap", "grouped"]
    assert type(inversion_engine("auto", "cpu")) is LoopEngine
    assert type(inversion_engine("vmap", "cpu")) is BatchedEngine and inversion_engine("vmap", "cpu").name == "vmap"
    with pytest.raises(ValueError, match="inversion engine must be one of"):
        engine_name("batched", "cpu")
    assert FreeConfig.preset("tiny", batched_inversion=True).generator.engine == "grouped"
    assert FreeConfig.preset("tiny", batched_inversion=False).generator.engine == "loop"
    for value in ("vmap", "grouped", "loop", "auto"):
        assert FreeConfig.preset("tiny", generator={"engine": value}).generator.engine == value
    with pytest.raises(ValueError, match="engine"):
        FreeConfig.preset("tiny", generator={"engine": "batched"})
    # the loop engine is MetaGenerator.step with the learner frozen as MetaLearner.student() freezes it
    teachers = [_teacher(i) for i in range(3)]
    learner = build_learner(5, width=8, rng=torch.Generator().manual_seed(4))
    seq, loop = (MetaGenerator(nz=16, ngf=8, samples_per_class=2, inner_steps=2,
                               rng=torch.Generator().manual_seed(2)) for _ in range(2))
    a = seq.step(teachers, lambda_adv=1.0, student=MetaLearner(learner).student(), subsets=[[0, 1, 2, 3, 4]] * 3)
    b = get_engine("loop").five_step(loop, teachers, lambda_adv=1.0, student_model=learner,
                                     subsets=[[0, 1, 2, 3, 4]] * 3)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.losses == y.losses and "adv" in x.losses[0]
    assert all(torch.equal(p, q) for p, q in zip(seq.generator.parameters(), loop.generator.parameters()))
    cfg = FreeConfig.preset("tiny")
    assert FreeTrainer(tiny_zoo, cfg, device="cpu").engine.name == "loop"
    assert FreeTrainer(tiny_zoo, FreeConfig.preset("tiny", generator={"engine": "vmap"}),
                       device="cpu").engine.name == "vmap"
    given = get_engine("grouped")
    assert FreeTrainer(tiny_zoo, cfg, device="cpu", engine=given).engine is given


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
    assert [r["size"] for r in sc["rows"]] == [4, 8]
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


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
def test_trainer_with_batched_engine_matches_plain_trainer(float64, tmp_path, monkeypatch, engine):
    """A FreeTrainer with a batched engine (``generator.engine``) trains to the same state as one with the
    loop (float64; the bank's uint8 images decode to float32, patched here to the default dtype)."""
    from free_dfml.common.config import FreeConfig
    from free_dfml.common.package import make_package
    from free_dfml.server.inversion_engine import BatchedEngine
    from free_dfml.server.memory_bank import MemoryBank
    from free_dfml.server.trainer import FreeTrainer
    from free_dfml.server.zoo import Zoo

    zoo = Zoo(tmp_path / "zoo")
    for i in range(3):
        torch.manual_seed(100 + i)
        net = build_model("conv4", num_classes=5, width=4)
        zoo.add(make_package(net, arch="conv4", arch_kwargs={"width": 4}, num_classes=5,
                             input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.3,) * 3))
    monkeypatch.setattr(MemoryBank, "_decode", lambda self, x: x.to(torch.get_default_dtype())
                        / (255 if x.dtype == torch.uint8 else 1))
    calls = []                                           # the batched engine really runs the FIVE steps
    real = BatchedEngine.five_step
    monkeypatch.setattr(BatchedEngine, "five_step", lambda self, *a, **k: calls.append(self.name) or real(self, *a, **k))
    plain = FreeTrainer(zoo, FreeConfig.preset("tiny", warmup=1, iterations=3), device="cpu")
    batched = FreeTrainer(zoo, FreeConfig.preset("tiny", warmup=1, iterations=3, generator={"engine": engine}),
                          device="cpu")
    assert plain.engine.name == "loop" and batched.engine.name == engine
    plain.run(3, progress=False)
    assert calls == []
    batched.run(3, progress=False)
    assert calls == [engine] * 3
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
    s = p.study
    assert (s.free.schedule.iterations, p.methods, s.data.dataset) == (1000, ("random", "free"), "synthetic")
    assert s.free.generator.jitter == 2
    # the study's fields by section, the flat names of earlier versions, and the coupled ones
    q = get_preset("quick", **dict(parse_setting(x) for x in (
        "clients.count=3", "free.generator.lr=0.5", "client_width=16", "track_every=5", "seed=4")))
    assert (q.study.clients.count, q.study.free.generator.lr, q.study.clients.width, q.study.free.learner.width,
            q.study.evaluation.track_every, q.study.seed, q.study.free.schedule.seed) == (3, 0.5, 16, 16, 5, 4, 4)
    assert get_preset("full").study == get_preset("paper").study
    from benchmarks.presets import Preset
    assert Preset.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    for bad, msg in (("iterations=abc", "must be int"), ("nope=1", "unknown preset field"),
                     ("clients.nope=1", "unknown preset field clients.nope"),
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
    ipc = p.study.data.images_per_class
    held = round(ipc * TrainConfig().holdout)
    assert (ipc - held, held) == (480, 120)
    assert ipc > get_preset("quick").study.data.images_per_class
    assert get_preset("full", **dict([parse_setting("images_per_class=null")])).study.data.images_per_class is None


def test_harness_modules_import_at_top_level_without_a_cycle():
    """benchmarks/ imports its own modules at the top of each file (none inside a function, where a
    cycle could hide), the graph they form is acyclic, and every section's jobs carry functions,
    not "module:function" strings."""
    import ast
    import graphlib

    from benchmarks.jobs import Job
    from benchmarks.presets import get_preset
    from benchmarks.run import MODULES

    graph = {}
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchmarks":
                assert node in top, f"{path.name}:{node.lineno} imports {node.module} inside a function"
                deps |= ({a.name for a in node.names} if node.module == "benchmarks"
                         else {node.module.split(".")[1]})
        graph[path.stem] = deps
    order = list(graphlib.TopologicalSorter(graph).static_order())      # CycleError on a cycle
    assert order.index("zoos") < order.index("accuracy") < order.index("hetero") < order.index("run")
    p = get_preset("tiny")
    for mod in MODULES.values():
        for job in mod.jobs(p):
            assert isinstance(job, Job) and callable(job.fn) and "." not in job.fn.__qualname__, job.name


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
              "from hangjob import hang\n"
              "run_jobs([Job('hang', hang)], Ctx(None, '.', '.', 'cpu'), workers=1, threads=1)\n")
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
