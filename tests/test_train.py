"""Client training: one loop for plain and DP training (client/train.py)."""

from __future__ import annotations

import pytest
import torch

from free_dfml.client.train import TrainConfig, augment_batch, holdout_split, train_client
from free_dfml.common.package import package_from_bytes

CLASSES = [0, 1, 2, 3]


def _train(ds, **kw):
    losses: list[float] = []
    pkg, rep = train_client(ds, CLASSES, TrainConfig(arch_kwargs={"width": 8}, **kw),
                            on_epoch=lambda e, loss: losses.append(loss))
    return pkg, rep, losses


def test_plain_training_is_deterministic_and_reports(fake_dataset):
    a, rep, losses = _train(fake_dataset, epochs=2, seed=3)
    b, _, losses_b = _train(fake_dataset, epochs=2, seed=3)
    assert a.to_bytes() == b.to_bytes() and losses == losses_b and len(losses) == 2
    assert a.meta.dp is None and a.meta.arch_kwargs.get("norm", "bn") == "bn"
    assert rep["train_images"] + rep["holdout_images"] == 4 * 30 and rep["holdout_images"] == 4 * 6
    assert a.meta.training["holdout_accuracy"] == rep["holdout_accuracy"]
    c, _, _ = _train(fake_dataset, epochs=2, seed=4)
    assert c.model_id != a.model_id


def test_dp_training_groupnorm_metadata_and_epsilon(fake_dataset):
    a, rep, losses = _train(fake_dataset, epochs=1, seed=7, dp_epsilon=0.5, dp_delta=1e-4, max_grad_norm=0.5)
    b, _, _ = _train(fake_dataset, epochs=1, seed=7, dp_epsilon=0.5, dp_delta=1e-4, max_grad_norm=0.5)
    assert a.to_bytes() == b.to_bytes() and len(losses) == 1          # repeatable on CPU
    assert a.meta.arch_kwargs["norm"] == "gn"
    model = a.build()
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    dp = a.meta.dp
    assert set(dp) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "target_epsilon",
                       "sample_rate", "steps", "epochs"}
    assert 0 < dp["epsilon"] <= 0.5 and dp["delta"] == 1e-4 and dp["max_grad_norm"] == 0.5
    assert dp["noise_multiplier"] > 0 and dp["steps"] > 0 and dp["epochs"] == 1
    assert rep["dp"] is True and rep["dp_epsilon"] == dp["epsilon"]
    # the package round-trips (the receiving side rebuilds a GroupNorm model)
    assert package_from_bytes(a.to_bytes()).meta.dp == dp


def test_plain_and_dp_share_the_holdout_split(fake_dataset):
    _, plain, _ = _train(fake_dataset, epochs=1, seed=5, holdout=0.3)
    pkg, dp, _ = _train(fake_dataset, epochs=1, seed=5, holdout=0.3, dp_epsilon=1.0)
    assert pkg.meta.dp["delta"] == pytest.approx(1 / (10 * dp["train_images"]))    # default delta 1/(10 N)
    assert pkg.meta.dp["epsilon"] <= 1.0
    assert (plain["train_images"], plain["holdout_images"]) == (dp["train_images"], dp["holdout_images"])
    data = fake_dataset.subset("train", CLASSES)
    tr, ho = holdout_split(data, 0.3, 5)
    assert len(ho) == plain["holdout_images"] and len(set(tr.tolist()) | set(ho.tolist())) == len(data.labels)


def test_recipe_knobs(fake_dataset):
    base, _, _ = _train(fake_dataset, epochs=1, seed=1)
    sgd, _, _ = _train(fake_dataset, epochs=1, seed=1, optimizer="sgd", lr=0.05)
    aug, _, _ = _train(fake_dataset, epochs=1, seed=1, augment="crop+flip")
    assert len({base.model_id, sgd.model_id, aug.model_id}) == 3
    aug2, _, _ = _train(fake_dataset, epochs=1, seed=1, augment="crop+flip")
    assert aug2.model_id == aug.model_id
    dp_sgd, _, _ = _train(fake_dataset, epochs=1, seed=1, optimizer="sgd", dp_epsilon=1.0, augment="flip")
    assert dp_sgd.meta.dp["epsilon"] <= 1.0
    for bad, match in [({"optimizer": "rmsprop"}, "optimizer"), ({"augment": "rotate"}, "augment"),
                       ({"dp_epsilon": -1.0}, "dp_epsilon"), ({"dp_epsilon": 1.0, "max_grad_norm": 0.0},
                                                              "max_grad_norm")]:
        with pytest.raises(ValueError, match=match):
            _train(fake_dataset, epochs=1, **bad)


def test_augment_batch_shapes_and_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 32, 32)
    assert augment_batch(x, "none", g) is x
    y = augment_batch(x, "crop+flip", g)
    assert y.shape == x.shape and not torch.equal(x, y)
    f = augment_batch(x, "flip", torch.Generator().manual_seed(1))
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2)) for i in range(5))


def test_simulated_clients_take_the_study_s_augmentation(fake_dataset):
    from free_dfml.client.virtual_client import VirtualClients, train_partition
    from free_dfml.common.presets import study
    assert VirtualClients.from_study(study("tiny")).augment == "none"
    crop = VirtualClients.from_study(study("tiny", clients={"augment": "crop", "classes_per_client": 4}))
    assert crop.augment == "crop" and VirtualClients.from_json(crop.to_json()) == crop
    a, _ = train_partition(crop, 0, 5, dataset=fake_dataset)
    b, _ = train_partition(VirtualClients.from_study(study("tiny", clients={"classes_per_client": 4})), 0, 5,
                           dataset=fake_dataset)
    assert a.model_id != b.model_id
