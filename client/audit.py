"""Privacy audit of a model package, run on the client with its own data before the model leaves.

Two known attacks, measured; neither proves that no other attack works:

* **Inversion leakage.** The server's own inversion (:mod:`free_dfml.server.meta_generator`) is run
  on the model: FIVE from a fresh meta-generator at the server's ``quick`` settings (the model alone
  in the zoo for the preset's iterations; the images of the last ``bank_capacity / m`` iterations,
  what the server's memory bank would hold), and scratch inversion with a larger step budget as the
  stronger attacker. Each recovered image of class ``c`` is compared with the client's private
  images of class ``c``: its nearest training image and its nearest held-out image (images the model
  never saw, drawn from the same classes by the same seeded split as ``free-client train``), in pixel
  space, in the model's own penultimate features and in a fixed random convolutional network's
  features. If the model leaks its training images, recovered images sit nearer to training images
  than to held-out ones more often than chance, ``n_train / (n_train + n_heldout)``; the p-value
  comes from reshuffling the training / held-out labels of the private images (many recovered
  images often share one nearest "hub" image, so they are not independent draws).
* **Membership inference.** Loss-threshold and confidence (max softmax) attacks on training vs
  held-out images: ROC AUC (with a bootstrap 95% interval) and the true-positive rate at 1% false
  positives.

Only the images of the given classes are read: the caller hands over one ``SplitData`` (the given
classes of the train split) and the audit splits it exactly as training did (:func:`holdout_split`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from free_dfml.client.train import holdout_split
from free_dfml.common.datasets import SplitData, to_float
from free_dfml.common.package import ModelPackage

Progress = Callable[[str, int, int], None]      # (stage, done, total)

# verdict thresholds (documented in docs/privacy.md)
AUC_LOW, AUC_HIGH = 0.55, 0.65      # membership AUC: <= low: little signal, > high: strong
SHARE_MARGIN, P_LEAK = 0.05, 0.01   # NN training share: this far above chance, at this p-value
SPACES = ("pixel", "model", "random")
# The verdict tests only the spaces that treat training and held-out images alike. The model's own
# features were fit to the training images, so there the training share departs from chance (either
# way) even when no image is reproduced: it is reported, as a sign, not tested.
TEST_SPACES = ("pixel", "random")


class AuditError(ValueError):
    """The model and the data do not fit together (one-line explanation)."""


@dataclass
class AuditConfig:
    preset: str = "quick"           # the server preset whose inversion settings the attacks use
    five_iterations: int | None = None   # FIVE steps on the model alone (None: the preset's iterations)
    scratch_steps: int | None = None     # None: twice the preset's scratch_steps (the stronger attacker)
    scratch_per_class: int | None = None  # None: the preset's samples_per_class
    seed: int = 0                   # the attacks' generator / latent draws
    pairs: int = 8                  # closest (recovered, training) pairs listed, and grid columns
    bootstrap: int = 200            # resamples for the AUC interval
    permutations: int = 2000        # relabellings for the training-share p-values


# ------------------------------------------------------------------------------------- the data

def split_private(pkg: ModelPackage, data: SplitData, holdout: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_heldout, y_heldout) as ``free-client train`` split ``data``, checked against
    the package: class count, image shape, and the training/held-out counts its metadata records."""
    meta = pkg.meta
    if data.num_classes != meta.num_classes:
        raise AuditError(f"the model has {meta.num_classes} classes but {data.num_classes} were given "
                         f"(--classes must list the classes it was trained on, in the same order)")
    if tuple(data.images.shape[1:]) != tuple(meta.input_shape):
        raise AuditError(f"the data's images are {list(data.images.shape[1:])} but the model takes "
                         f"{list(meta.input_shape)} (check --image-size)")
    if not 0 < holdout < 1:
        raise AuditError(f"holdout must be in (0, 1), got {holdout}")
    tr, ho = holdout_split(data, holdout, seed)
    t = meta.training or {}
    want = (t.get("train_images"), t.get("holdout_images"))
    if want[0] is not None and want != (len(tr), len(ho)):
        raise AuditError(f"this split has {len(tr)} training / {len(ho)} held-out images but the model "
                         f"was trained on {want[0]} / {want[1]} (check --data, --images-per-class, "
                         f"--holdout, --seed)")
    x = to_float(data.images)
    return x[tr], data.labels[tr], x[ho], data.labels[ho]


def check_accuracies(pkg: ModelPackage, train_acc: float, holdout_acc: float, tol: float = 0.02) -> None:
    """The same counts can come from other images (another rendering seed, another split seed): the
    accuracies the package recorded at training must be reproduced on this split."""
    t = pkg.meta.training or {}
    want = (t.get("train_accuracy"), t.get("holdout_accuracy"))
    if None in want or not all(isinstance(v, (int, float)) for v in want):
        return
    if abs(want[0] - train_acc) > tol or abs(want[1] - holdout_acc) > tol:
        raise AuditError(f"on this split the model is {train_acc:.2f} / {holdout_acc:.2f} accurate (training / "
                         f"held-out) but it recorded {want[0]:.2f} / {want[1]:.2f}: not the images it was "
                         f"trained on (check --data, --seed, --images-per-class, --holdout)")


# -------------------------------------------------------------------------------- membership

def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    s = np.concatenate([pos, neg])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):               # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r = ranks[: len(pos)].sum()
    return float((r - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """The highest share of members flagged by a threshold that flags at most ``fpr`` of non-members."""
    best = 0.0
    for t in np.unique(np.concatenate([pos, neg])):
        if (neg >= t).mean() <= fpr:
            best = max(best, float((pos >= t).mean()))
    return best


@torch.no_grad()
def _scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    loss = F.cross_entropy(logits, y, reduction="none")
    conf = logits.softmax(1).max(1).values
    acc = float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")
    return -loss.numpy().astype(np.float64), conf.numpy().astype(np.float64), acc


def membership(model: nn.Module, x_tr, y_tr, x_ho, y_ho, *, bootstrap: int = 200, seed: int = 0) -> dict:
    """Loss-threshold and confidence attacks: members = training images, non-members = held-out."""
    loss_tr, conf_tr, acc_tr = _scores(model, x_tr, y_tr)
    loss_ho, conf_ho, acc_ho = _scores(model, x_ho, y_ho)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"train_accuracy": acc_tr, "holdout_accuracy": acc_ho,
                           "members": len(y_tr), "non_members": len(y_ho)}
    for name, pos, neg in (("loss", loss_tr, loss_ho), ("confidence", conf_tr, conf_ho)):
        boots = [roc_auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(bootstrap)]
        out[name] = {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
                     "auc_95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
                     if boots else None}
    auc = max(out["loss"]["auc"], out["confidence"]["auc"])
    tpr = max(out["loss"]["tpr_at_1pct_fpr"], out["confidence"]["tpr_at_1pct_fpr"])
    level = "LOW" if auc <= AUC_LOW else ("MODERATE" if auc <= AUC_HIGH else "HIGH")
    say = {"LOW": "barely better than a coin flip", "MODERATE": "somewhat better than chance",
           "HIGH": "far better than chance"}[level]
    out["verdict"] = (f"membership inference: {level} - loss/confidence attacks tell your training images "
                      f"from held-out ones {say} (AUC {auc:.2f}; 0.50 is chance), and catch {tpr:.0%} of "
                      f"training images at 1% false positives")
    out["level"] = level
    return out


# ------------------------------------------------------------------------------------ inversion

def server_config(preset: str) -> Any:
    from free_dfml.common.config import FreeConfig
    try:
        return FreeConfig.preset(preset)
    except ValueError as e:
        raise AuditError(str(e)) from None


def invert_model(pkg: ModelPackage, cfg: AuditConfig, progress: Progress | None = None) -> dict[str, dict]:
    """The two attacks' recovered images (float [n, C, H, W] at the model's input shape) and labels."""
    from free_dfml.server.generator import to_teacher_input
    from free_dfml.server.meta_generator import MetaGenerator, Teacher, invert_from_scratch

    scfg = server_config(cfg.preset)
    gen, lrn = scfg.generator, scfg.learner
    model = pkg.build("cpu")
    shape = tuple(pkg.meta.input_shape)
    teacher = Teacher(model, shape, pkg.meta.num_classes, pkg.model_id, is_dp=pkg.meta.is_dp)
    iters = int(cfg.five_iterations or scfg.schedule.iterations)
    # the server's meta-generator at the preset's settings (L_adv needs the server's meta-learner: off)
    mg = MetaGenerator(nz=gen.nz, ngf=gen.ngf, image_size=lrn.image_size, channels=lrn.channels,
                       inner_steps=gen.inner_steps, inner_lr=gen.lr, z_lr=gen.z_lr, meta_lr=gen.meta_lr,
                       betas=tuple(gen.betas), samples_per_class=gen.samples_per_class,
                       lambda_bn=gen.lambda_bn, jitter=gen.jitter,
                       rng=torch.Generator().manual_seed(cfg.seed), device="cpu")
    keep = max(1, int(scfg.bank.capacity) // mg.samples_per_class)
    kept: list = []
    for i in range(iters):
        r = mg.step([teacher])[0]
        kept = (kept + [r])[-keep:]
        if progress:
            progress("FIVE inversion", i + 1, iters)
    five = {"images": torch.cat([to_teacher_input(r.images, shape) for r in kept]),
            "labels": torch.cat([r.labels for r in kept]),
            "final_ce": float(np.mean([r.final_ce for r in kept])),
            "settings": {"preset": cfg.preset, "iterations": iters, "inner_steps": mg.inner_steps,
                         "samples_per_class": mg.samples_per_class, "kept_iterations": len(kept),
                         **mg.generator.config()}}
    steps = int(cfg.scratch_steps or 2 * int(gen.scratch_steps))
    per_class = int(cfg.scratch_per_class or gen.samples_per_class)
    g = mg.generator.config()
    if progress:
        progress("scratch inversion", 0, 1)
    r = invert_from_scratch(teacher, nz=g["nz"], ngf=g["ngf"], image_size=g["image_size"],
                            channels=g["channels"], steps=steps, per_class=per_class,
                            rng=torch.Generator().manual_seed(cfg.seed + 1), lr=mg.inner_lr, z_lr=mg.z_lr,
                            betas=mg.betas, lambda_bn=mg.lambda_bn, jitter=mg.jitter)
    if progress:
        progress("scratch inversion", 1, 1)
    scratch = {"images": to_teacher_input(r.images, shape), "labels": r.labels, "final_ce": r.final_ce,
               "settings": {"preset": cfg.preset, "steps": steps, "samples_per_class": per_class, **g}}
    return {"five": five, "scratch": scratch}


class RandomConvNet(nn.Module):
    """A fixed, randomly initialised conv net (seeded; no trained weights): a generic image feature."""

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            c = channels
            for w in (32, 64, 64):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                c = w
            self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def embed(x: torch.Tensor, space: str, model: nn.Module, random_net: nn.Module) -> torch.Tensor:
    """Images in [0, 1] -> vectors compared by L2: raw pixels, or unit-length features."""
    if space == "pixel":
        return x.flatten(1)
    if space == "model":        # Normalized(classifier): the classifier's features on normalised input
        f = torch.cat([model.model.features((x[i:i + 256] - model.mean) / model.std)
                       for i in range(0, len(x), 256)]) if len(x) else x.new_zeros(0, 1)
    else:
        f = random_net(x - 0.5)
    return F.normalize(f.flatten(1), dim=1)


def _perm_p(nn_pos: list[torch.Tensor], n_train: list[int], n_private: list[int], observed: int,
            rng: torch.Generator, permutations: int) -> float:
    """Permutation p-value of ``observed`` training hits: the training / held-out labels of each
    class's private images are reshuffled (counts kept), each recovered image keeps its nearest
    private image. Exact under the null that the model does not single out its training images, and
    valid when many recovered images share one nearest image (hubs), unlike a binomial test."""
    hits = torch.zeros(permutations)
    for pos, nt, npv in zip(nn_pos, n_train, n_private):
        is_train = torch.argsort(torch.rand(permutations, npv, generator=rng), 1) < nt   # [P, npv]
        hits += is_train[:, pos].sum(1).float()
    return float((1 + (hits >= observed).sum()) / (1 + permutations))


def _space(e_r, e_tr, e_ho, y_r, y_tr, y_ho, class_names: list[str], rng: torch.Generator,
           permutations: int) -> tuple[dict, dict]:
    """One space: the training share per class and pooled, and per recovered image its nearest
    training image and nearest private image (training or held-out)."""
    n = len(y_r)
    match = {"d_train": torch.full((n,), float("inf")), "i_train": torch.full((n,), -1, dtype=torch.long),
             "d_any": torch.full((n,), float("inf")), "i_any": torch.full((n,), -1, dtype=torch.long),
             "is_train": torch.zeros(n, dtype=torch.bool)}
    per_class, d_tr_all, d_ho_all, ref_all = [], [], [], []
    nn_pos, n_train, n_private = [], [], []
    hits = n_all = distinct = 0
    expect = 0.0
    for c, name in enumerate(class_names):
        r, t, h = ((y == c).nonzero().flatten() for y in (y_r, y_tr, y_ho))
        if len(r) == 0 or len(t) == 0 or len(h) == 0:
            continue
        dt, it = torch.cdist(e_r[r], e_tr[t]).min(1)
        dh, ih = torch.cdist(e_r[r], e_ho[h]).min(1)
        ref_all.append(torch.cdist(e_ho[h], e_tr[t]).min(1).values)   # how near unseen images come
        to_tr = dt < dh
        pos = torch.where(to_tr, it, len(t) + ih)         # nearest private image: [train..., held-out...]
        p, k = len(t) / (len(t) + len(h)), int(to_tr.sum())
        per_class.append({"class": name, "recovered": len(r), "train_share": k / len(r), "chance": p,
                          "p_value": _perm_p([pos], [len(t)], [len(t) + len(h)], k, rng, permutations),
                          "distinct_nearest": int(pos.unique().numel()),
                          "median_nn_train": float(dt.median()), "median_nn_heldout": float(dh.median())})
        hits, n_all, expect = hits + k, n_all + len(r), expect + p * len(r)
        distinct += int(pos.unique().numel())
        nn_pos.append(pos)
        n_train.append(len(t))
        n_private.append(len(t) + len(h))
        d_tr_all.append(dt)
        d_ho_all.append(dh)
        match["d_train"][r], match["i_train"][r] = dt, t[it]
        match["d_any"][r] = torch.minimum(dt, dh)
        match["i_any"][r] = torch.where(to_tr, t[it], h[ih])
        match["is_train"][r] = to_tr
    if n_all == 0:
        return {}, match
    d_tr = torch.cat(d_tr_all)
    ref5 = float(torch.quantile(torch.cat(ref_all), 0.05))
    return {"train_share": hits / n_all, "chance": expect / n_all,
            "p_value": _perm_p(nn_pos, n_train, n_private, hits, rng, permutations),
            "distinct_nearest": distinct,
            "median_nn_train": float(d_tr.median()), "median_nn_heldout": float(torch.cat(d_ho_all).median()),
            "heldout_to_train_p5": ref5, "closer_than_heldout_p5": int((d_tr < ref5).sum()),
            "per_class": per_class}, match


def nearest(rec: dict, x_tr, y_tr, x_ho, y_ho, model: nn.Module, random_net: nn.Module,
            class_names: list[str], pairs: int, *, seed: int = 0, permutations: int = 2000) -> tuple[dict, dict]:
    """Per space and class: the share of recovered images whose nearest private image (same class) is a
    training image, against chance; the closest (recovered, training) pairs in pixel space.
    Returns (figures, the pixel-space match of every recovered image)."""
    out: dict[str, Any] = {"images": int(len(rec["labels"])), "final_ce": rec["final_ce"],
                           "settings": rec["settings"], "spaces": {}}
    x_r, y_r = rec["images"].float(), rec["labels"]
    pixel_match: dict = {}
    for space in SPACES:
        e_r, e_tr, e_ho = (embed(v, space, model, random_net) for v in (x_r, x_tr, x_ho))
        rng = torch.Generator().manual_seed(seed)
        fig, match = _space(e_r, e_tr, e_ho, y_r, y_tr, y_ho, class_names, rng, permutations)
        if fig:
            out["spaces"][space] = fig
        if space == "pixel":
            pixel_match = match
    if pixel_match:
        d, idx = pixel_match["d_train"], pixel_match["i_train"]
        out["closest_pairs"] = [{"recovered": int(i), "class": class_names[int(y_r[i])],
                                 "train_image": int(idx[i]), "pixel_l2": float(d[i])}
                                for i in torch.argsort(d)[:pairs] if torch.isfinite(d[i])]
    out["leaks_in"] = [s for s, v in out["spaces"].items() if s in TEST_SPACES
                       and v["p_value"] < P_LEAK and v["train_share"] - v["chance"] >= SHARE_MARGIN]
    return out, pixel_match


def inversion_verdict(attack: str, res: dict) -> str:
    sp = res["spaces"]
    shares = ", ".join(f"{s} {v['train_share']:.2f}" for s, v in sp.items() if s in TEST_SPACES)
    chance = next(iter(sp.values()))["chance"] if sp else float("nan")
    if res["leaks_in"]:
        head = (f"LEAK - recovered images sit nearer to your training images than to held-out ones "
                f"more often than chance in {' and '.join(res['leaks_in'])} space")
    else:
        head = "NO MEASURED LEAK - recovered images are no nearer to your training images than to held-out ones"
    return f"inversion ({attack}): {head} (training share {shares}; chance {chance:.2f})"


# ---------------------------------------------------------------------------------------- audit

def run_audit(pkg: ModelPackage, data: SplitData, *, holdout: float, seed: int, cfg: AuditConfig | None = None,
              progress: Progress | None = None) -> dict:
    """The whole audit of ``pkg`` against ``data`` (the model's classes of the train split, in order);
    returns the report document (plus the recovered images under the ``_images`` key, for the grids)."""
    cfg = cfg or AuditConfig()
    x_tr, y_tr, x_ho, y_ho = split_private(pkg, data, holdout, seed)
    model = pkg.build("cpu")
    if progress:
        progress("membership inference", 0, 1)
    mem = membership(model, x_tr, y_tr, x_ho, y_ho, bootstrap=cfg.bootstrap, seed=cfg.seed)
    check_accuracies(pkg, mem["train_accuracy"], mem["holdout_accuracy"])
    if progress:
        progress("membership inference", 1, 1)
    recovered = invert_model(pkg, cfg, progress)
    random_net = RandomConvNet(int(pkg.meta.input_shape[0]), seed=cfg.seed)
    inversion, images = {}, {}
    for i, (attack, rec) in enumerate(recovered.items()):
        if progress:
            progress("nearest neighbours", i, len(recovered))
        res, match = nearest(rec, x_tr, y_tr, x_ho, y_ho, model, random_net, list(data.classes), cfg.pairs,
                             seed=cfg.seed, permutations=cfg.permutations)
        res["verdict"] = inversion_verdict(attack, res)
        inversion[attack] = res
        images[attack] = {"images": rec["images"], "labels": rec["labels"], "match": match}
    if progress:
        progress("nearest neighbours", len(recovered), len(recovered))
    dp = pkg.meta.dp
    dp_line = (f"differential privacy: the model carries DP epsilon {dp['epsilon']:.3g} "
               f"(delta {dp['delta']:.2g})" if dp else "differential privacy: none (the model was trained without DP)")
    return {
        "model_id": pkg.model_id,
        "model": {"arch": pkg.meta.arch, "arch_kwargs": pkg.meta.arch_kwargs, "num_classes": pkg.meta.num_classes,
                  "input_shape": list(pkg.meta.input_shape)},
        "dp": dp, "dp_epsilon": dp["epsilon"] if dp else None,
        "data": {"classes": list(data.classes), "holdout": holdout, "seed": seed,
                 "train_images": int(len(y_tr)), "holdout_images": int(len(y_ho))},
        "settings": dataclasses.asdict(cfg),
        "membership": mem, "inversion": inversion,
        "verdicts": [mem["verdict"]] + [inversion[a]["verdict"] for a in inversion] + [dp_line],
        "_images": {"recovered": images, "train": x_tr, "heldout": x_ho},
    }
