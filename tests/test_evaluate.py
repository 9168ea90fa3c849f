"""``free-server evaluate`` and server/evaluation.py: the data used reaches the output, every class of
a folder by default, a split file with only a test part, baselines on the same episodes with paired
differences, separate seeds for the data and the episodes, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from free_dfml.common.cli import run_cli
from free_dfml.common.datasets import open_dataset
from free_dfml.common.evaluation import episode_fingerprint, evaluate


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from free_dfml.server.cli import app
    code = run_cli(app, "free-server", [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("free-server: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def state(tmp_path_factory, tiny_packages):
    """A server state folder with a 3-iteration checkpoint of the tiny preset on four tiny teachers."""
    from free_dfml.server.state import StateDir
    from free_dfml.server.trainer import FreeConfig, FreeTrainer
    from free_dfml.server.zoo import Zoo
    st = StateDir(tmp_path_factory.mktemp("eval") / "state").create()
    zoo = Zoo(st.zoo_dir)
    for p in tiny_packages[:4]:
        zoo.add(p)
    trainer = FreeTrainer(zoo, FreeConfig.preset("tiny", warmup=1), state_dir=st.checkpoint_dir, device="cpu")
    trainer.run(3, progress=False)
    trainer.checkpoint()
    return st


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fake_dataset):
    """12 new classes (the fake meta-val and meta-test classes) as a folder of class folders, no split file."""
    from PIL import Image
    root = tmp_path_factory.mktemp("eval") / "newclasses"
    for split in ("val", "test"):
        data = fake_dataset.split(split)
        for c in range(6):
            d = root / f"{split}{c}"
            d.mkdir(parents=True)
            for i, x in enumerate(data.images[data.labels == c][:20]):
                Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i:02d}.png")
    return root


def test_plain_folder_uses_every_class_and_says_so(capsys, state, folder, tmp_path):
    out_file = tmp_path / "ev.json"
    code, out, err = _cli(capsys, "evaluate", "--state", state.root, "--data", folder, "--episodes", 6,
                          "--device", "cpu", "--out", out_file, "--threads", 1)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("data: folder") and "split all" in first and "12 classes" in first \
        and "240 images" in first and "(20 a class)" in first
    doc = json.loads(out_file.read_text())
    assert doc["data"]["classes"] == 12 and doc["data"]["images"] == 240 and doc["data"]["split"] == "all"
    assert doc["iteration"] == 3 and doc["episodes"] == 6 and doc["torch_threads"] == 1
    assert not (state.root / "last_evaluation.json").exists()        # --out, not the state folder
    # the same as scoring the checkpointed learner directly on every class of the folder
    from free_dfml.server.trainer import FreeTrainer
    trainer = FreeTrainer.from_state(state, "cpu")
    direct = evaluate(trainer.learner, open_dataset(str(folder)).all_classes(), way=5, shot=1, episodes=6,
                      steps=trainer.cfg.learner.adapt_steps, lr=trainer.cfg.learner.inner_lr, seed=0)
    assert doc["eval_1shot"] == pytest.approx(direct.mean, abs=1e-9)
    assert doc["episodes_sha"] == direct.episodes_sha


def test_baselines_on_the_same_episodes_with_paired_differences(capsys, state, folder):
    code, out, err = _cli(capsys, "evaluate", "--state", state.root, "--data", folder, "--episodes", 8,
                          "--device", "cpu", "--baselines", "--json", "--seed", 3)
    assert code == 0, err
    doc = json.loads(out)                                              # --json: the document only
    assert set(doc["results"]) == {"free", "random", "average"} and set(doc["paired"]) == {"random", "average"}
    shas = {r["1shot"]["episodes_sha"] for r in doc["results"].values()}
    data = open_dataset(str(folder)).all_classes()
    assert shas == {episode_fingerprint(data, way=5, shot=1, episodes=8, seed=3)}     # learner-independent
    assert episode_fingerprint(data, way=5, shot=1, episodes=8, seed=4) not in shas
    for m in ("random", "average"):
        d = doc["paired"][m]["1shot"]
        diff = doc["results"]["free"]["1shot"]["mean"] - doc["results"][m]["1shot"]["mean"]
        assert d["mean"] == pytest.approx(diff, abs=1e-9) and d["ci95"] >= 0
    assert (state.root / "last_evaluation.json").exists()             # the default --out
    # the text form: the data line first, then FREE's line and the table with the paired column
    code, out, err = _cli(capsys, "evaluate", "--state", state.root, "--data", folder, "--episodes", 4,
                          "--device", "cpu", "--baselines")
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]     # (a progress bar off a terminal: blank lines)
    assert lines[0].startswith("data: folder") and lines[1].startswith("FREE meta-learner (iteration 3)"), out
    assert "paired" in out and "average" in out and "random" in out


def test_split_file_with_only_a_test_part(capsys, state, folder, tmp_path):
    names = sorted(p.name for p in folder.iterdir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": [], "test": names}))
    spec = f"folder:{folder}?split={split}"
    code, out, err = _cli(capsys, "evaluate", "--state", state.root, "--data", spec, "--episodes", 3,
                          "--device", "cpu", "--out", tmp_path / "a.json")
    assert code == 0, err
    assert "split test (split file" in out.splitlines()[0] and "12 classes" in out.splitlines()[0]
    code, _, err = _cli(capsys, "evaluate", "--state", state.root, "--data", spec, "--split", "train",
                        "--out", tmp_path / "b.json")
    assert code != 0
    _one_line_error(err, "split 'train' is empty")
    # a split file listing only some classes: the test part by default, every class folder with --split all
    split.write_text(json.dumps({"test": names[:7]}))
    from free_dfml.server.evaluation import EvalSpec, open_eval_data
    data, info = open_eval_data(EvalSpec(spec), image_size=32, channels=3)
    assert info["split"] == "test" and data.num_classes == 7 and info["folder_classes"] == 12
    data, info = open_eval_data(EvalSpec(spec, split="all"), image_size=32, channels=3)
    assert info["split"] == "all" and data.num_classes == 12


def test_data_seed_and_episode_seed_are_separate(folder, monkeypatch):
    from free_dfml.server import evaluation
    from free_dfml.server.evaluation import EvalSpec, open_eval_data
    base, _ = open_eval_data(EvalSpec(str(folder), split="test"), image_size=32, channels=3)
    same, _ = open_eval_data(EvalSpec(str(folder), split="test", seed=5), image_size=32, channels=3)
    other, _ = open_eval_data(EvalSpec(str(folder), split="test", split_seed=5), image_size=32, channels=3)
    assert same.classes == base.classes and torch.equal(same.images, base.images)
    assert other.classes != base.classes                 # the seeded class split follows --split-seed only
    # glyphs: the rendering seed is the split seed, never the episode seed
    seen = {}

    def fake_open(spec, **kw):
        seen.update(kw)
        raise evaluation.DataError("stop here")
    monkeypatch.setattr(evaluation, "open_dataset", fake_open)
    with pytest.raises(evaluation.EvaluationError, match="stop here"):
        open_eval_data(EvalSpec("glyphs", seed=9, split_seed=2, images_per_class=100), image_size=32, channels=3)
    assert seen["seed"] == 2 and seen["images_per_class"] == 100


@pytest.mark.parametrize("argv, needle", [
    (["--split", "bogus"], "--split"),
    (["--way", 3], "--way 3"),
    (["--images-per-class", 25], "images_per_class=25"),
    (["--shot", 19], "shot+query"),
    (["--out", "/nonexistent/dir/x.json"], "--out"),
])
def test_bad_input_is_one_line(capsys, state, folder, argv, needle):
    code, _, err = _cli(capsys, "evaluate", "--state", state.root, "--data", folder, "--device", "cpu",
                        "--episodes", 2, *argv)
    assert code != 0
    _one_line_error(err, needle)


def test_missing_data_is_one_line(capsys, state, tmp_path):
    code, _, err = _cli(capsys, "evaluate", "--state", state.root, "--data", tmp_path / "nope")
    assert code != 0
    _one_line_error(err)


def test_adapt_example_reports_its_data(state, folder, tmp_path):
    """examples/adapt.py on an exported meta-learner: the first line names the data, --json/--out the document."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from free_dfml.common.package import save_package
    from free_dfml.server.trainer import FreeTrainer
    model = tmp_path / "meta.safetensors"
    save_package(FreeTrainer.from_state(state, "cpu").export(), model)
    task = tmp_path / "task"
    for d in sorted(folder.iterdir())[:5]:
        shutil.copytree(d, task / d.name)
    script = Path(__file__).resolve().parents[1] / "examples" / "adapt.py"
    r = subprocess.run([sys.executable, str(script), "--model", str(model), "--images", str(task), "--shot", "2",
                        "--out", str(tmp_path / "a.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"data: {task}: 5 classes, 10 support images (2 a class") and "90 query images" in first
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["data"]["classes"] == 5 and doc["data"]["query_images"] == 90 and len(doc["predictions"]) == 90
    assert f"{doc['correct']}/90 correct" in r.stdout.splitlines()[-1]
