"""DP recipe study for glyph clients (docs/privacy.md): held-out accuracy and membership AUC of a
Conv4 client trained with DP-SGD under different recipes, against the demo's non-DP client.

    python -m experiments.dp_recipes --out runs/dp-recipes/recipes.jsonl [--only NAME ...] [--list]

The demo client: glyphs, 100 images a class, the classes of the demo's client 0, 20% held out,
seed 0, Conv4 width 32. DP-SGD here is written out (torch.func per-sample gradients, Poisson
sampling, clipping, Gaussian noise calibrated by Opacus' RDP accountant for the target epsilon), so
that knobs free-client does not have (augmentation multiplicity, GroupNorm groups, training only the
head) can be measured before anyone adds them. One thread (shared machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

BASE = dict(dp_epsilon=None, epochs=20, lr=0.003, optimizer="adam", batch_size=32, max_grad_norm=1.0,
            width=32, groups=None, aug_mult=1, augment="none", weight_decay=0.0, seed=0,
            head_only=False, prior=None, client=0)

RECIPES: dict[str, dict] = {
    # the demo's client, and non-DP regularisation
    "plain": {},
    "plain-crop": dict(augment="crop"),
    "plain-wd5e-4": dict(weight_decay=5e-4),
    "plain-crop-wd5e-4": dict(augment="crop", weight_decay=5e-4),
    # DP: the current free-client default (the plain recipe under DP-SGD)
    "dp8-default": dict(dp_epsilon=8.0),
    # DP: larger batches (Poisson sampling rate batch/n), more epochs, SGD with momentum / Adam,
    # clipping, width, GroupNorm groups, augmentation multiplicity, head only
    "dp8-b128-sgd": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=0.5),
    "dp8-b400-sgd": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=0.5),
    "dp8-b400-sgd-w16": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=0.5, width=16),
    "dp8-b400-sgd-w8": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=0.5, width=8),
    "dp8-b400-sgd-head": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=0.5, head_only=True),
    "plain-head": dict(head_only=True),
    "dp8-b128-sgd-w8": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=0.5, width=8),
    "dp8-b400-sgd-w8-lr1": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=1.0, width=8),
    "dp8-b400-sgd-w8-e160": dict(dp_epsilon=8.0, batch_size=400, epochs=160, optimizer="sgd", lr=0.5, width=8),
    "dp8-b400-adam-w8": dict(dp_epsilon=8.0, batch_size=400, epochs=80, lr=0.01, width=8),
    "dp8-b400-sgd-w8-g2": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=0.5, width=8, groups=2),
    "dp8-b400-sgd-w8-c01": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=5.0, width=8,
                                max_grad_norm=0.1),
    "dp8-b400-sgd-w4": dict(dp_epsilon=8.0, batch_size=400, epochs=80, optimizer="sgd", lr=0.5, width=4),
    "dp8-b128-sgd-w8-crop": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=0.5, width=8,
                                 augment="crop"),
    "dp8-b128-sgd-w8-am4": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=0.5, width=8,
                                augment="crop", aug_mult=4),
    "dp8-b128-sgd-w8-e80": dict(dp_epsilon=8.0, batch_size=128, epochs=80, optimizer="sgd", lr=0.5, width=8),
    "dp8-b64-sgd-w8": dict(dp_epsilon=8.0, batch_size=64, epochs=40, optimizer="sgd", lr=0.25, width=8),
    "dp8-b128-sgd-w16": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=0.5, width=16),
    "dp8-b128-sgd-w16-lr1": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=1.0, width=16),
    "dp8-b128-sgd-w16-e60": dict(dp_epsilon=8.0, batch_size=128, epochs=60, optimizer="sgd", lr=0.5, width=16),
    "dp8-b128-sgd-w16-e20": dict(dp_epsilon=8.0, batch_size=128, epochs=20, optimizer="sgd", lr=0.5, width=16),
    "dp8-b128-adam-w16": dict(dp_epsilon=8.0, batch_size=128, epochs=40, lr=0.003, width=16),
    "dp8-b128-sgd-w16-s1": dict(dp_epsilon=8.0, batch_size=128, epochs=40, optimizer="sgd", lr=0.5, width=16, seed=1),
    "plain-w16": dict(width=16),
    "plain-w8": dict(width=8),
}


def load(images_per_class: int = 100, seed: int = 0, client: int = 0):
    from free_dfml.common.datasets import open_dataset
    from free_dfml.common.partition import client_classes
    ds = open_dataset("glyphs", image_size=32, seed=seed, images_per_class=images_per_class)
    classes = client_classes(len(ds.classes("train")), 20, 5, True, seed)[client]
    return ds, classes


def build(r: dict, num_classes: int, mean, std) -> nn.Module:
    from free_dfml.common.models import Normalized, build_model
    norm = "gn" if r["dp_epsilon"] is not None or r["prior"] else "bn"
    net = build_model("conv4", num_classes=num_classes, width=r["width"], norm=norm)
    if r["groups"]:
        for name, m in list(net.named_modules()):
            for cname, child in list(m.named_children()):
                if isinstance(child, nn.GroupNorm):
                    setattr(m, cname, nn.GroupNorm(r["groups"], child.num_channels))
    return Normalized(net, mean, std)


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to size/8 pixels (reflect padding), one per image."""
    n, _, h, w = x.shape
    p = max(1, h // 8)
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(r: dict, x_tr, y_tr, num_classes: int, mean, std) -> nn.Module:
    torch.manual_seed(r["seed"])
    model = build(r, num_classes, mean, std)
    if r["prior"]:           # features pretrained on public random-process images; the head is fresh
        if str(r["prior"]).endswith(".safetensors"):      # a client.prior cache file (features only)
            from safetensors.torch import load_file
            sd = load_file(r["prior"])
        else:
            sd = {k: v for k, v in torch.load(r["prior"]).items() if ".head." not in f".{k}"}
        missing = model.load_state_dict(sd, strict=False).missing_keys
        assert all(".head." in f".{k}" for k in missing), missing
    if r["head_only"]:       # the seeded random features stay as initialised; only the head learns
        for k, p in model.named_parameters():
            p.requires_grad_(".head." in f".{k}")
    params = [p for p in model.parameters() if p.requires_grad]
    if r["optimizer"] == "adam":
        opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"]) if r["weight_decay"] \
            else torch.optim.Adam(params, lr=r["lr"])
    else:
        opt = torch.optim.SGD(params, lr=r["lr"], momentum=0.9, weight_decay=r["weight_decay"])
    g = torch.Generator().manual_seed(r["seed"] + 1)
    ga = torch.Generator().manual_seed(r["seed"] + 3)
    n = len(y_tr)
    if r["dp_epsilon"] is None:
        for _ in range(r["epochs"]):
            model.train()
            order = torch.randperm(n, generator=g)
            for i in range(0, n, r["batch_size"]):
                b = order[i:i + r["batch_size"]]
                if len(b) < 2:
                    continue
                xb = shift(x_tr[b], ga) if r["augment"] == "crop" else x_tr[b]
                loss = F.cross_entropy(model(xb), y_tr[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model
    from opacus.accountants.utils import get_noise_multiplier
    q = r["batch_size"] / n
    steps = int(r["epochs"] / q)
    delta = 1.0 / (10 * n)
    sigma = get_noise_multiplier(target_epsilon=r["dp_epsilon"], target_delta=delta, sample_rate=q,
                                 steps=steps, accountant="rdp")
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    gn = torch.Generator().manual_seed(r["seed"] + 2)

    def loss_one(p, x, y):
        out = functional_call(model, dict(zip(names, p)), (x,))
        return F.cross_entropy(out, y)

    # per-sample gradient of the mean loss over the sample's K augmentations
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    C, K = r["max_grad_norm"], r["aug_mult"]
    model.train()
    for _ in range(steps):
        mask = torch.rand(n, generator=g) < q
        idx = mask.nonzero().flatten()
        p = [t.detach() for t in params]
        summed = [torch.zeros_like(t) for t in p]
        if len(idx):
            xb, yb = x_tr[idx], y_tr[idx]
            if r["augment"] == "crop":
                xk = torch.stack([shift(xb, ga) for _ in range(K)], 1)     # [b, K, C, H, W]
            else:
                xk = xb[:, None]
            yk = yb[:, None].expand(-1, xk.shape[1])
            grads = per_sample(p, xk, yk)
            norms = torch.sqrt(sum(gr.flatten(1).pow(2).sum(1) for gr in grads))
            scale = (C / (norms + 1e-6)).clamp(max=1.0)
            summed = [(gr * scale.view(-1, *[1] * (gr.dim() - 1))).sum(0) for gr in grads]
        for t, s in zip(params, summed):
            t.grad = (s + sigma * C * torch.randn(t.shape, generator=gn)) / (q * n)
        opt.step()
    model.sigma, model.steps = sigma, steps
    return model


def measure(name: str, over: dict, ds, classes) -> dict:
    from free_dfml.client.audit import membership
    from free_dfml.client.train import holdout_split
    from free_dfml.common.datasets import to_float
    r = {**BASE, **over}
    if r["client"]:
        classes = load(client=r["client"])[1]
    data = ds.subset("train", classes)
    tr, ho = holdout_split(data, 0.2, r["seed"])
    x, y = to_float(data.images), data.labels
    t0 = time.perf_counter()
    model = train(r, x[tr], y[tr], data.num_classes, ds.mean, ds.std)
    model.eval()
    mem = membership(model, x[tr], y[tr], x[ho], y[ho], bootstrap=0)
    return {"recipe": name, **r, "noise_multiplier": getattr(model, "sigma", None),
            "steps": getattr(model, "steps", None), "train_acc": round(mem["train_accuracy"], 4),
            "heldout_acc": round(mem["holdout_accuracy"], 4), "auc_loss": round(mem["loss"]["auc"], 4),
            "auc_conf": round(mem["confidence"]["auc"], 4), "tpr1_loss": mem["loss"]["tpr_at_1pct_fpr"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/dp-recipes/recipes.jsonl")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--set", nargs="*", default=[], help="extra recipe NAME=JSON")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    recipes = dict(RECIPES)
    for s in a.set:
        k, _, v = s.partition("=")
        recipes[k] = json.loads(v)
    if a.list:
        print("\n".join(f"{k}: {v}" for k, v in recipes.items()))
        return
    ds, classes = load()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in a.only or list(recipes):
        rec = measure(name, recipes[name], ds, classes)
        print(json.dumps(rec), flush=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
