"""The client's privacy audit (client/audit.py, client/audit_report.py, free-client audit / submit --audit)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fake_data import FakeFewShotDataset
from free_dfml.client.audit import (AuditConfig, AuditError, RandomConvNet, _perm_p, nearest, roc_auc,
                                    run_audit, split_private, tpr_at_fpr)
from free_dfml.client.audit_report import verdicts_for, write_report
from free_dfml.client.cli import app
from free_dfml.client.train import TrainConfig, train_client
from free_dfml.common.cli import run_cli
from free_dfml.common.package import save_package

TINY = AuditConfig(preset="tiny", five_iterations=2, scratch_steps=4, scratch_per_class=4, bootstrap=20, pairs=3)


@pytest.fixture(scope="module")
def noisy():
    """3 hard classes (strong per-image noise) of 16 images: a model can only memorise them."""
    return FakeFewShotDataset(classes=(3, 2, 2), images_per_class=16, noise=0.6, shift=1)


@pytest.fixture(scope="module")
def models(noisy):
    """A Conv4 overfitted to 8 images a class, and a DP one (epsilon 1) on the same split."""
    over, _ = train_client(noisy, [0, 1, 2], TrainConfig(epochs=40, batch_size=4, holdout=0.5, seed=0,
                                                          arch_kwargs={"width": 8}))
    dp, _ = train_client(noisy, [0, 1, 2], TrainConfig(epochs=3, batch_size=4, holdout=0.5, seed=0,
                                                        arch_kwargs={"width": 8}, dp_epsilon=1.0))
    return over, dp


def test_auc_and_tpr_at_low_fpr():
    pos, neg = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert roc_auc(pos, neg) == 1.0 and roc_auc(neg, pos) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5               # ties count half
    assert roc_auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert tpr_at_fpr(pos, neg, 0.01) == 1.0
    assert tpr_at_fpr(np.array([1.0, 5.0]), np.array([2.0, 6.0]), 0.01) == 0.0   # nothing above the top non-member


def test_permutation_p_value_counts_hubs_once():
    """Ten recovered images whose nearest image is the same training image (a hub) are one piece of
    evidence, not ten: p about the chance share; ten distinct training images: p tiny."""
    g = torch.Generator().manual_seed(0)
    hub = torch.zeros(10, dtype=torch.long)
    assert _perm_p([hub], [8], [10], 10, g, 2000) == pytest.approx(0.8, abs=0.05)
    spread = torch.arange(10).repeat(2)              # 10 distinct images of 40 private, 20 of them training
    assert _perm_p([spread], [20], [40], 20, g, 2000) < 0.01


def test_nearest_neighbour_share_detects_copies_and_not_fresh_draws(noisy):
    """Recovered images that are near-copies of training images: training share 1 and a LEAK verdict;
    fresh images of the same classes: about chance and no leak."""
    data = noisy.subset("train", [0, 1, 2])
    x = data.images.float() / 255
    y = data.labels
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)
    tr, ho, fresh = idx[:24], idx[24:36], idx[36:]
    model = torch.nn.Identity()
    model.model = torch.nn.Module()
    model.model.features = torch.nn.Flatten()
    model.mean, model.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    net = RandomConvNet(3)
    copies = {"images": (x[tr] + 0.02 * torch.randn(x[tr].shape, generator=g)).clamp(0, 1), "labels": y[tr],
              "final_ce": 0.0, "settings": {}}
    res, match = nearest(copies, x[tr], y[tr], x[ho], y[ho], model, net, data.classes, pairs=4)
    assert res["spaces"]["pixel"]["train_share"] == 1.0
    assert set(res["leaks_in"]) == {"pixel", "random"}
    assert len(res["closest_pairs"]) == 4 and res["closest_pairs"][0]["pixel_l2"] < 1.0
    assert bool(match["is_train"].all())
    draws = {"images": x[fresh], "labels": y[fresh], "final_ce": 0.0, "settings": {}}
    res, _ = nearest(draws, x[tr], y[tr], x[ho], y[ho], model, net, data.classes, pairs=4)
    assert res["leaks_in"] == []
    assert res["spaces"]["pixel"]["chance"] == pytest.approx(24 / 36, abs=0.05)


def test_overfitted_model_leaks_membership_far_more_than_dp(noisy, models, tmp_path):
    data = noisy.subset("train", [0, 1, 2])
    over, dp = models
    a = run_audit(over, data, holdout=0.5, seed=0, cfg=TINY)
    b = run_audit(dp, data, holdout=0.5, seed=0, cfg=TINY)
    auc_a = max(a["membership"]["loss"]["auc"], a["membership"]["confidence"]["auc"])
    auc_b = max(b["membership"]["loss"]["auc"], b["membership"]["confidence"]["auc"])
    assert auc_a >= 0.85 and auc_b <= 0.7 and auc_a - auc_b >= 0.25
    assert a["membership"]["level"] == "HIGH" and a["dp_epsilon"] is None
    assert b["dp_epsilon"] is not None and b["dp_epsilon"] <= 1.0 + 1e-6
    assert any("epsilon" in v for v in b["verdicts"])
    for attack in ("five", "scratch"):
        sp = a["inversion"][attack]["spaces"]
        assert set(sp) == {"pixel", "model", "random"}
        assert all(0 <= v["train_share"] <= 1 and v["chance"] == pytest.approx(0.5) for v in sp.values())
    files = write_report(a, tmp_path / "audit", command="free-client audit ...")
    assert all(f.is_file() for f in files)
    doc = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert doc["model_id"] == over.model_id and "_images" not in doc
    assert doc["verdicts"] == a["verdicts"]
    md = (tmp_path / "audit" / "report.md").read_text()
    assert "## Membership inference" in md and "grid_five.png" in md
    from PIL import Image
    with Image.open(tmp_path / "audit" / "grid_scratch.png") as im:
        assert im.size[0] > 30 and im.size[1] > 30
    assert verdicts_for(tmp_path / "audit", over.model_id) == a["verdicts"]
    with pytest.raises(ValueError, match="not of this package"):
        verdicts_for(tmp_path / "audit", dp.model_id)
    with pytest.raises(ValueError, match="no audit report"):
        verdicts_for(tmp_path, over.model_id)


def test_split_must_match_the_models_training(noisy, models):
    over, _ = models
    data = noisy.subset("train", [0, 1, 2])
    with pytest.raises(AuditError, match="trained on 24 / 24"):
        split_private(over, data, 0.2, 0)               # trained with holdout 0.5
    with pytest.raises(AuditError, match="3 classes but 2"):
        split_private(over, noisy.subset("train", [0, 1]), 0.5, 0)
    x_tr, y_tr, x_ho, y_ho = split_private(over, data, 0.5, 0)
    assert len(y_tr) == len(y_ho) == 24
    import copy
    other = copy.deepcopy(over)       # as if trained on other images with the same counts
    other.meta.training["holdout_accuracy"] = over.meta.training["holdout_accuracy"] - 0.3
    with pytest.raises(AuditError, match="not the images it was trained on"):
        run_audit(other, data, holdout=0.5, seed=0, cfg=TINY)


class SpyDataset:
    """Records every access to the data set it wraps."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.image_shape = inner.name, inner.image_shape

    def subset(self, split, classes):
        self.calls.append(("subset", split, tuple(classes)))
        return self.inner.subset(split, classes)

    def split(self, name):
        self.calls.append(("split", name))
        return self.inner.split(name)

    @property
    def mean(self):
        self.calls.append(("mean",))
        return self.inner.mean

    @property
    def std(self):
        return self.inner.std


def _write_folder(root, dataset, classes, corrupt_class=None):
    """A folder data set (split.json: train = ``classes``) from ``dataset``'s images."""
    from PIL import Image
    names = []
    for c in classes:
        d = root / f"c{c}"
        d.mkdir(parents=True)
        data = dataset.subset("train", [c])
        for i, img in enumerate(data.images):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
        if c == corrupt_class:
            (d / "zzz.png").write_bytes(b"not an image")
        names.append(f"c{c}")
    for extra in ("val0", "test0"):         # the split file needs non-empty val and test splits
        (root / extra).mkdir()
        Image.fromarray(dataset.subset("train", [0]).images[0].permute(1, 2, 0).numpy()).save(root / extra / "a.png")
    (root / "split.json").write_text(json.dumps({"train": names, "val": ["val0"], "test": ["test0"]}))


def test_audit_reads_only_the_given_classes(noisy, tmp_path, capsys):
    """The audit reads the given classes of the train split and nothing else: in-process through a
    spy, and through the CLI on a folder data set whose other class holds an unreadable file."""
    spy = SpyDataset(noisy)
    pkg, _ = train_client(noisy, [0, 1], TrainConfig(epochs=1, holdout=0.5, arch_kwargs={"width": 8}))
    spy.calls.clear()
    run_audit(pkg, spy.subset("train", [0, 1]), holdout=0.5, seed=0, cfg=TINY)
    assert spy.calls == [("subset", "train", (0, 1))]

    root = tmp_path / "data"
    _write_folder(root, noisy, [0, 1, 2], corrupt_class=2)
    model = tmp_path / "m.safetensors"
    pkg.meta.training["dataset"] = "folder"     # the same images, written as a folder data set
    save_package(pkg, model)
    args = ["audit", "--model", str(model), "--data", f"folder:{root}", "--classes", "0,1", "--holdout", "0.5",
            "--out", str(tmp_path / "out"), "--preset", "tiny", "--five-iterations", "2", "--scratch-steps", "3"]
    assert run_cli(app, "free-client", args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "membership inference:" in out and "inversion (five)" in out
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["data"]["class_indices"] == [0, 1] and doc["data"]["train_images"] == 16
    # the same data set is unreadable as a whole (the corrupt file): proof the audit never opened class 2
    from free_dfml.common.datasets import DataError, open_dataset
    with pytest.raises(DataError):
        open_dataset(f"folder:{root}").split("train")


@pytest.mark.parametrize("args, msg", [
    (["--model", "{missing}"], "invalid package"),
    (["--classes", "0"], "at least 2 classes"),
    (["--classes", "0-2"], "model has 2 classes but 3"),
    (["--holdout", "0.3"], "trained on"),
    (["--holdout", "1.5"], "--holdout must be in"),
    (["--data", "nope:x"], "unknown data set spec"),
    (["--out", "{file}"], "--out is a file"),
    (["--preset", "bogus"], "unknown preset"),
    (["--classes", "0,1"], "trained on the 'fake'"),
])
def test_audit_bad_input_is_one_line(noisy, tmp_path, capsys, args, msg):
    pkg, _ = train_client(noisy, [0, 1], TrainConfig(epochs=1, holdout=0.5, arch_kwargs={"width": 8}))
    pkg.meta.training["dataset"] = "folder" if msg != "trained on the 'fake'" else "fake"
    model = tmp_path / "m.safetensors"
    save_package(pkg, model)
    root = tmp_path / "data"
    _write_folder(root, noisy, [0, 1, 2])
    (tmp_path / "file").write_text("x")
    base = {"--model": str(model), "--data": f"folder:{root}", "--classes": "0,1", "--holdout": "0.5",
            "--out": str(tmp_path / "out"), "--preset": "tiny", "--five-iterations": "1", "--scratch-steps": "1"}
    base[args[0]] = args[1].format(missing=tmp_path / "none.safetensors", file=tmp_path / "file")
    rc = run_cli(app, "free-client", ["audit", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_submit_prints_the_audit_or_refuses_a_foreign_one(noisy, models, tmp_path, capsys):
    over, dp = models
    doc = run_audit(over, noisy.subset("train", [0, 1, 2]), holdout=0.5, seed=0, cfg=TINY)
    write_report(doc, tmp_path / "audit")
    other = tmp_path / "dp.safetensors"
    save_package(dp, other)
    # refused after the local validation, before anything starts or is sent (the validation counts
    # against --timeout, so a short one would fail first on a loaded machine)
    rc = run_cli(app, "free-client", ["submit", "--model", str(other), "--server", "127.0.0.1:9",
                                      "--audit", str(tmp_path / "audit"), "--timeout", "120"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not of this package" in err and len(err.splitlines()) == 1
    rc = run_cli(app, "free-client", ["submit", "--model", str(other), "--server", "127.0.0.1:9", "--no-verify",
                                      "--audit", str(tmp_path / "audit")])
    assert rc == 2 and "--no-verify" in capsys.readouterr().err


def test_dp_recipe_study_trains_with_calibrated_noise(noisy):
    """experiments/dp_recipes.py's written-out DP-SGD: the noise multiplier is the accountant's for
    the target epsilon, and a run returns a working classifier."""
    from experiments.dp_recipes import BASE, train
    data = noisy.subset("train", [0, 1, 2])
    x, y = data.images.float() / 255, data.labels
    r = {**BASE, "dp_epsilon": 8.0, "width": 4, "batch_size": 16, "epochs": 2, "optimizer": "sgd", "lr": 0.5}
    model = train(r, x, y, 3, noisy.mean, noisy.std)
    loose = train({**r, "dp_epsilon": 20.0}, x, y, 3, noisy.mean, noisy.std)
    assert model.steps == int(2 / (16 / len(y))) and model.sigma > loose.sigma > 0
    assert model(x[:4]).shape == (4, 3)
