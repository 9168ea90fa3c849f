"""The public stroke prior and the DP recipe built on it (client/prior.py, client/train.py)."""

from __future__ import annotations

import pytest
import torch

from free_dfml.client import prior as prior_mod
from free_dfml.client.prior import StrokePrior, prior_features, render_strokes
from free_dfml.client.train import DP_RECIPE, TrainConfig, dp_config, train_client

SMALL = StrokePrior(classes=6, images_per_class=8, epochs=1, batch_size=16)
CLASSES = [0, 1, 2, 3]


@pytest.fixture
def small_prior(monkeypatch, tmp_path):
    """A small prior, cached in a fresh folder, so that tests pretrain in well under a second."""
    monkeypatch.setattr(prior_mod, "DEFAULT_PRIOR", SMALL)
    monkeypatch.setenv("FREE_DFML_CACHE", str(tmp_path))
    return tmp_path


def test_render_is_deterministic_shaped_and_class_dependent():
    x, y = render_strokes(SMALL, 3, 32)
    x2, _ = render_strokes(SMALL, 3, 32)
    assert x.dtype == torch.uint8 and x.shape == (48, 3, 32, 32) and torch.equal(x, x2)
    assert y.tolist() == [c for c in range(6) for _ in range(8)]
    g, _ = render_strokes(SMALL, 1, 28)
    assert g.shape == (48, 1, 28, 28)
    assert not torch.equal(render_strokes(StrokePrior(classes=6, images_per_class=8, seed=1), 3, 32)[0], x)
    # the shape is drawn on top of a smooth field: images are not flat, and classes differ on average
    f = x.float() / 255
    assert f.std((1, 2, 3)).min() > 0.02
    means = torch.stack([f[y == c].mean(0) for c in range(6)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 0.5
    with pytest.raises(ValueError, match="1 or 3 channels"):
        render_strokes(SMALL, 2, 32)


def test_features_are_cached_once_and_a_damaged_cache_is_rebuilt(small_prior, monkeypatch):
    args = ("conv4", {"width": 8, "norm": "gn"}, (3, 32, 32), (0.5,) * 3, (0.3,) * 3)
    first = prior_features(*args)
    assert not any(".head." in f".{k}" for k in first)           # the features only
    files = list((small_prior / "prior").glob("*.safetensors"))
    assert len(files) == 1

    def no_pretraining(*a, **k):
        raise AssertionError("pretrained again although cached")
    monkeypatch.setattr(prior_mod, "pretrain", no_pretraining)
    again = prior_features(*args)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    files[0].write_bytes(b"not a safetensors file")
    monkeypatch.undo()
    monkeypatch.setattr(prior_mod, "DEFAULT_PRIOR", SMALL)
    monkeypatch.setenv("FREE_DFML_CACHE", str(small_prior))
    rebuilt = prior_features(*args)
    assert all(torch.equal(rebuilt[k], first[k]) for k in first)  # pretraining is deterministic
    # another input normalisation is another prior
    prior_features("conv4", {"width": 8, "norm": "gn"}, (3, 32, 32), (0.4,) * 3, (0.3,) * 3)
    assert len(list((small_prior / "prior").glob("*.safetensors"))) == 2


def test_head_only_training_from_the_prior_keeps_the_features(small_prior, fake_dataset):
    cfg = TrainConfig(arch_kwargs={"width": 8}, epochs=2, prior="strokes", train_layers="head", seed=0)
    pkg, rep = train_client(fake_dataset, CLASSES, cfg)
    feats = prior_features("conv4", {"width": 8, "norm": "gn"}, fake_dataset.image_shape, fake_dataset.mean,
                           fake_dataset.std)
    sd = pkg.build().state_dict()
    assert pkg.meta.arch_kwargs["norm"] == "gn" and rep["prior"] == "strokes" and rep["train_layers"] == "head"
    assert all(torch.equal(sd[k], feats[k]) for k in feats)      # every layer but the head as pretrained
    head = [k for k in sd if ".head." in f".{k}"]
    assert head and rep["train_accuracy"] > 0.25                 # the head learned (4 classes)
    # all layers from the prior: the features move
    moved, _ = train_client(fake_dataset, CLASSES, TrainConfig(arch_kwargs={"width": 8}, epochs=2,
                                                                prior="strokes", seed=0))
    msd = moved.build().state_dict()
    assert any(not torch.equal(msd[k], feats[k]) for k in feats)


def test_dp_recipe_trains_the_head_on_full_batches(small_prior, fake_dataset):
    cfg = dp_config(4.0, arch_kwargs={"width": 8}, epochs=3)
    assert (cfg.prior, cfg.train_layers, cfg.batch_size, cfg.optimizer) == ("strokes", "head", 0, "sgd")
    assert cfg.lr == DP_RECIPE["lr"] and cfg.epochs == 3         # fields override the recipe
    pkg, rep = train_client(fake_dataset, CLASSES, cfg)
    dp = pkg.meta.dp
    assert dp["sample_rate"] == 1.0 and dp["steps"] == 3 and 0 < dp["epsilon"] <= 4.0
    feats = prior_features("conv4", {"width": 8, "norm": "gn"}, fake_dataset.image_shape, fake_dataset.mean,
                           fake_dataset.std)
    sd = pkg.build().state_dict()
    assert all(torch.equal(sd[k], feats[k]) for k in feats)      # DP noise touched only the head
    # augmentation multiplicity changes the gradients, not the accounting
    single, _ = train_client(fake_dataset, CLASSES, dp_config(4.0, arch_kwargs={"width": 8}, epochs=3, aug_mult=1))
    assert single.meta.dp["noise_multiplier"] == dp["noise_multiplier"] and single.model_id != pkg.model_id
    for bad, match in [({"prior": "imagenet"}, "prior"), ({"train_layers": "last"}, "train_layers"),
                       ({"batch_size": 1}, "batch_size"), ({"aug_mult": 2}, "aug_mult"), ({"aug_mult": 0}, "aug_mult")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).check()


def _folder(root, dataset, classes):
    """``classes`` of ``dataset``'s train split written as a folder-per-class tree with a split file."""
    import json

    from PIL import Image
    names = []
    for c in classes:
        (root / f"c{c}").mkdir(parents=True)
        for i, img in enumerate(dataset.subset("train", [c]).images[:10]):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"c{c}" / f"{i}.png")
        names.append(f"c{c}")
    (root / "split.json").write_text(json.dumps({"train": names[:-2], "val": [names[-2]], "test": [names[-1]]}))


def test_free_client_train_uses_the_dp_recipe_unless_told_otherwise(small_prior, fake_dataset, tmp_path, capsys):
    from free_dfml.client.cli import app
    from free_dfml.common.cli import run_cli
    from free_dfml.common.package import load_package
    _folder(tmp_path / "data", fake_dataset, range(6))
    base = ["train", "--data", f"folder:{tmp_path / 'data'}", "--classes", "0-3", "--width", "8"]
    assert run_cli(app, "free-client", base + ["--dp-epsilon", "4", "--out", str(tmp_path / "dp.safetensors")]) == 0
    assert "DP epsilon=" in capsys.readouterr().out
    dp = load_package(tmp_path / "dp.safetensors")
    assert dp.meta.training["prior"] == "strokes" and dp.meta.training["train_layers"] == "head"
    assert dp.meta.dp["sample_rate"] == 1.0 and dp.meta.dp["epochs"] == DP_RECIPE["epochs"]
    # --augment none under DP drops the copies; copies without an augmentation are refused
    assert run_cli(app, "free-client", base + ["--dp-epsilon", "4", "--augment", "none", "--epochs", "1",
                                               "--out", str(tmp_path / "none.safetensors")]) == 0
    assert run_cli(app, "free-client", base + ["--aug-mult", "2", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--aug-mult" in capsys.readouterr().err
    # a flag given on the command line wins over the recipe; without DP the plain recipe is the default
    args = base + ["--dp-epsilon", "4", "--prior", "none", "--train-layers", "all", "--batch-size", "8",
                   "--epochs", "2", "--out", str(tmp_path / "dp2.safetensors")]
    assert run_cli(app, "free-client", args) == 0
    dp2 = load_package(tmp_path / "dp2.safetensors")
    assert "prior" not in dp2.meta.training and dp2.meta.dp["epochs"] == 2 and dp2.meta.dp["sample_rate"] < 1
    assert run_cli(app, "free-client", base + ["--epochs", "1", "--out", str(tmp_path / "plain.safetensors")]) == 0
    plain = load_package(tmp_path / "plain.safetensors")
    assert plain.meta.dp is None and "prior" not in plain.meta.training and plain.meta.arch_kwargs["norm"] == "bn"


def test_each_image_s_gradient_is_the_mean_over_its_copies():
    from free_dfml.client.train import _average_over_augmentations
    p = torch.nn.Parameter(torch.zeros(2, 3))
    copies = torch.stack([torch.full((2, 3), float(10 * c + i)) for c in range(4) for i in range(5)])  # [copy, image]
    p.grad_sample = copies
    _average_over_augmentations([p], 4)
    assert p.grad_sample.shape == (5, 2, 3)
    assert torch.equal(p.grad_sample[:, 0, 0], torch.tensor([15.0, 16.0, 17.0, 18.0, 19.0]))


def test_simulated_dp_clients_use_the_dp_recipe(small_prior, fake_dataset):
    from free_dfml.client.virtual_client import VirtualClients, train_partition
    dp_pkg, dp_rep = train_partition(VirtualClients(width=8, classes_per_client=4, dp_epsilon=4.0,
                                                    extra={"epochs": 2}), 0, 5, dataset=fake_dataset)
    assert dp_rep["prior"] == "strokes" and dp_pkg.meta.dp["sample_rate"] == 1.0 and dp_pkg.meta.dp["epochs"] == 2
    plain, rep = train_partition(VirtualClients(width=8, classes_per_client=4, epochs=1), 0, 5, dataset=fake_dataset)
    assert plain.meta.dp is None and "prior" not in rep and rep["epochs"] == 1
