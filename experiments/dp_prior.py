"""Which public stroke prior makes the best DP clients (docs/privacy.md)?

    python -m experiments.dp_prior --out runs/dp-prior/priors.jsonl [--only NAME ...]

For each prior setting (``client.prior.StrokePrior``), pretrain it once (cached in
``runs/dp-prior/cache``), then train the demo's clients 0-2 on it: the head without DP (the
ceiling a DP head can reach) and the DP recipe at epsilon 8 (results before the recipe settled
used 80 epochs at lr 0.5 without copies) (``experiments.dp_recipes``' DP-SGD),
and report held-out accuracy and the loss attack's AUC. One thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from experiments.dp_recipes import load, measure
from free_dfml.client.prior import StrokePrior, prior_features, prior_key

PRIORS = {
    "p64": StrokePrior(),
    "p256x25": StrokePrior(classes=256, images_per_class=25),
    "p64-e16": StrokePrior(epochs=16),
    "p256x50": StrokePrior(classes=256, images_per_class=50),
    "p512x25-e12": StrokePrior(classes=512, images_per_class=25, epochs=12),
    "p128x100": StrokePrior(classes=128),
}
# the DP recipe (client.train.DP_RECIPE) in experiments.dp_recipes' terms
DP8 = dict(head_only=True, batch_size=400, optimizer="sgd", lr=1.0, dp_epsilon=8.0, epochs=20, augment="crop",
           aug_mult=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/dp-prior/priors.jsonl")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--clients", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--cache", default="runs/dp-prior/cache")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds, _ = load()
    shape, kw = (3, 32, 32), {"width": 32, "norm": "gn"}
    for name in a.only or list(PRIORS):
        p = PRIORS[name]
        t = time.perf_counter()
        prior_features("conv4", kw, shape, ds.mean, ds.std, prior=p, cache_dir=a.cache)
        path = Path(a.cache) / "prior" / f"{prior_key('conv4', kw, shape, ds.mean, ds.std, p)}.safetensors"
        pre = round(time.perf_counter() - t, 1)
        for c in a.clients:
            classes = load(client=c)[1]
            for run, over in (("head", dict(head_only=True)), ("dp8", DP8)):
                rec = measure(f"{name}/{run}/c{c}", {**over, "prior": str(path), "width": 32}, ds, classes)
                rec.update(prior=name, prior_settings=p.__dict__, pretrain_s=pre)
                print(json.dumps(rec), flush=True)
                with open(a.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
