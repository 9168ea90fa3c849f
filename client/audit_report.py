"""The audit's report on disk: ``report.json`` (every figure), ``report.md`` (a person reads it) and,
per attack, ``grid_<attack>.png``: each recovered image above its nearest private image in pixel
space, framed red when that image is a training image and blue when it is a held-out one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RED = torch.tensor([0.85, 0.1, 0.1]).view(3, 1, 1)
BLUE = torch.tensor([0.1, 0.3, 0.9]).view(3, 1, 1)
GREY = torch.tensor([0.6, 0.6, 0.6]).view(3, 1, 1)


def _clean(v: Any) -> Any:
    """JSON-safe: NaN / inf -> None, tuples -> lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items() if not str(k).startswith("_")}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _frame(x: torch.Tensor, colour: torch.Tensor, scale: int = 2, border: int = 2) -> torch.Tensor:
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = F.interpolate(x[None], scale_factor=scale, mode="nearest")[0]
    out = colour.expand(3, x.shape[1] + 2 * border, x.shape[2] + 2 * border).clone()
    out[:, border:-border, border:-border] = x
    return out


def grid(recovered: dict, train: torch.Tensor, heldout: torch.Tensor, num_classes: int, per_class: int
         ) -> torch.Tensor:
    """Per class two rows: the ``per_class`` recovered images nearest to a private image, and below each
    its nearest private image (red frame: training image, blue: held-out)."""
    x, y, m = recovered["images"], recovered["labels"], recovered["match"]
    tiles: list[torch.Tensor] = []
    blank = None
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.argsort(m["d_any"][idx])][:per_class] if len(idx) else idx
        top, bottom = [], []
        for i in idx.tolist():
            src = train if bool(m["is_train"][i]) else heldout
            top.append(_frame(x[i].clamp(0, 1), GREY))
            bottom.append(_frame(src[int(m["i_any"][i])], RED if bool(m["is_train"][i]) else BLUE))
        if blank is None and top:
            blank = torch.ones_like(top[0])
        tiles.append((top, bottom))
    if blank is None:
        return torch.ones(3, 8, 8)
    rows = []
    for top, bottom in tiles:
        for row in (top, bottom):
            row = row + [blank] * (per_class - len(row))
            rows.append(torch.cat(row, 2))
        rows.append(torch.ones(3, 6, rows[-1].shape[2]))       # gap between classes
    return torch.cat(rows, 1)


def write_report(doc: dict, out: Path, *, command: str = "") -> list[Path]:
    """Write report.json, report.md and the grids into ``out`` (created); returns the files written."""
    from torchvision.utils import save_image
    out.mkdir(parents=True, exist_ok=True)
    files = []
    imgs = doc.get("_images", {})
    for attack, rec in imgs.get("recovered", {}).items():
        g = grid(rec, imgs["train"], imgs["heldout"], doc["model"]["num_classes"], doc["settings"]["pairs"])
        p = out / f"grid_{attack}.png"
        save_image(g, p)
        files.append(p)
    clean = _clean({**doc, "command": command or None})
    (out / "report.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(clean, [f.name for f in files]), encoding="utf-8")
    return [out / "report.json", out / "report.md", *files]


def _f(v: Any, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def markdown(doc: dict, grids: list[str]) -> str:
    mem, inv, data = doc["membership"], doc["inversion"], doc["data"]
    lines = [f"# Privacy audit of model {doc['model_id'][:16]}", "",
             f"Model: {doc['model']['arch']} {doc['model']['arch_kwargs']}, {doc['model']['num_classes']} classes. "
             f"Data: {data['train_images']} training and {data['holdout_images']} held-out images "
             f"(held-out share {data['holdout']}, split seed {data['seed']}).", ""]
    if doc.get("command"):
        lines += [f"Command: `{doc['command']}`", ""]
    lines += ["## Verdict", ""] + [f"- {v}" for v in doc["verdicts"]] + [
        "", "These are two known attacks, measured on your data; a low figure does not prove that no "
        "other attack can learn more from the model.", "",
        "## Membership inference", "",
        f"Accuracy: training {_f(mem['train_accuracy'])}, held-out {_f(mem['holdout_accuracy'])}.", "",
        "| attack | AUC | 95% interval | TPR at 1% FPR |", "|---|---|---|---|"]
    for name in ("loss", "confidence"):
        a = mem[name]
        ci = a.get("auc_95") or [None, None]
        lines.append(f"| {name} | {_f(a['auc'])} | {_f(ci[0])}-{_f(ci[1])} | {_f(a['tpr_at_1pct_fpr'])} |")
    lines += ["", "AUC 0.50: the attack cannot tell training images from held-out ones; 1.00: it always can.", ""]
    lines += ["## Inversion leakage", "",
              "Each recovered image's nearest same-class private image: is it a training image? Chance is "
              "the training share of the private images. `p`: permutation test (the training / held-out "
              "labels of the private images reshuffled; valid when many recovered images share one nearest "
              "image). `distinct`: how many different private images are nearest to some recovered image. The verdict "
              "tests the pixel and random-network spaces, which treat training and held-out images alike; "
              "the model's own features were fit to the training images, so there the share departs from "
              "chance either way without any image being reproduced (a sign of membership, not a copy).", ""]
    for attack, res in inv.items():
        s = res["settings"]
        budget = (f"{s['iterations']} FIVE iterations x {s['inner_steps']} inner steps, last "
                  f"{s['kept_iterations']} kept" if attack == "five" else f"{s['steps']} steps")
        lines += [f"### {attack} ({res['images']} recovered images; {budget}; final CE {_f(res['final_ce'], 3)})", "",
                  "| space | training share | chance | p | distinct | median NN dist train / held-out | "
                  "recovered nearer a training image than 95% of held-out images are |",
                  "|---|---|---|---|---|---|---|"]
        for space, v in res["spaces"].items():
            lines.append(f"| {space} | {_f(v['train_share'])} | {_f(v['chance'])} | {v['p_value']:.2g} | "
                         f"{v['distinct_nearest']} | "
                         f"{_f(v['median_nn_train'], 3)} / {_f(v['median_nn_heldout'], 3)} | "
                         f"{v['closer_than_heldout_p5']} |")
        lines += ["", "Per class (pixel / model / random training share):", ""]
        per = {sp: {c["class"]: c for c in v["per_class"]} for sp, v in res["spaces"].items()}
        for cls in next(iter(per.values()), {}):
            lines.append(f"- {cls}: " + " / ".join(_f(per[sp][cls]["train_share"]) for sp in per)
                         + f" (chance {_f(next(iter(per.values()))[cls]['chance'])})")
        if res.get("closest_pairs"):
            lines += ["", "Closest (recovered, training image) pairs in pixel space: " + ", ".join(
                f"#{p['recovered']}-train#{p['train_image']} ({p['class']}) {p['pixel_l2']:.2f}"
                for p in res["closest_pairs"])]
        if f"grid_{attack}.png" in grids:
            lines += ["", f"![{attack}](grid_{attack}.png)", "",
                      "Each recovered image (grey frame) above its nearest private image: red frame a "
                      "training image, blue a held-out one."]
        lines.append("")
    return "\n".join(lines)


def verdicts_for(audit_dir: Path, model_id: str) -> list[str]:
    """The verdict lines of the audit in ``audit_dir``, which must be of the model ``model_id``
    (ValueError with a one-line reason otherwise)."""
    path = Path(audit_dir) / "report.json"
    if not path.is_file():
        raise ValueError(f"no audit report at {path} (run: free-client audit --model FILE ... --out {audit_dir})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        mid, lines = doc["model_id"], doc["verdicts"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable audit report {path}: {type(e).__name__}") from None
    if not isinstance(lines, list) or not all(isinstance(v, str) for v in lines):
        raise ValueError(f"unreadable audit report {path}: no verdict lines")
    if mid != model_id:
        raise ValueError(f"the audit in {audit_dir} is of model {str(mid)[:16]}, not of this package "
                         f"({model_id[:16]}): audit this package first")
    return lines
