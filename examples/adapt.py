"""Adapt an exported FREE meta-learner to a new few-shot task and predict.

    free-server export --state STATE --out meta.safetensors
    python examples/adapt.py --model meta.safetensors --images TASK_DIR [--shot 1]

``TASK_DIR`` holds one folder per class (exactly as many classes as the meta-learner's ``way``,
5 by default) with a few images each. The first ``--shot`` images of every class (in file-name
order) are the support set: the meta-learner is fine-tuned on them with the adaptation settings
stored in its metadata (``adapt_steps`` SGD steps at ``inner_lr``), then every other image is
classified. The first line names the data used (folder, classes, support and query images);
then one line per query image and the accuracy. ``--json`` prints the same as one JSON document
instead, ``--out FILE`` writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from free_dfml.common.adaptation import adapt, buffers_of, forward, parameters_of
from free_dfml.common.package import PackageError, load_package

EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff"}


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    img = Image.open(path).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported meta-learner package")
    ap.add_argument("--images", required=True, help="folder with one sub-folder of images per class")
    ap.add_argument("--shot", type=int, default=1, help="support images per class")
    ap.add_argument("--steps", type=int, default=None, help="adaptation steps (default: from the metadata)")
    ap.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default: from the metadata)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON document instead of text")
    ap.add_argument("--out", default=None, help="also write the JSON document to this file")
    a = ap.parse_args()
    if a.shot < 1:
        print("adapt.py: error: --shot must be >= 1", file=sys.stderr)
        return 1
    try:
        pkg = load_package(a.model)
    except PackageError as e:
        print(f"adapt.py: error: invalid package {a.model}: {e}", file=sys.stderr)
        return 1
    meta = pkg.meta
    way = meta.num_classes
    steps = a.steps if a.steps is not None else int(meta.training.get("adapt_steps", 10))
    lr = a.lr if a.lr is not None else float(meta.training.get("inner_lr", 0.01))
    c, size, _ = meta.input_shape
    root = Path(a.images)
    classes = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if len(classes) != way:
        print(f"adapt.py: error: {root} must hold exactly {way} class folders (found {len(classes)})", file=sys.stderr)
        return 1
    sx, sy, queries = [], [], []
    for label, d in enumerate(classes):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTS)
        if len(files) <= a.shot:
            print(f"adapt.py: error: class {d.name!r} needs more than {a.shot} images", file=sys.stderr)
            return 1
        for p in files[: a.shot]:
            sx.append(load_image(p, c, size))
            sy.append(label)
        queries += [(p, label) for p in files[a.shot:]]
    data = {"images": str(root), "classes": way, "class_names": [d.name for d in classes],
            "support_images": len(sx), "query_images": len(queries), "shot": a.shot,
            "image_shape": [c, size, size]}
    if not a.json:
        print(f"data: {root}: {way} classes, {len(sx)} support images ({a.shot} a class, the first in "
              f"file-name order) + {len(queries)} query images, {size}x{size} {'grayscale' if c == 1 else 'RGB'}")
    learner = pkg.build("cpu")
    learner.train()      # batch statistics during adaptation and scoring, as in the evaluation protocol
    params = parameters_of(learner, detach=True)
    buffers = buffers_of(learner)
    x_s, y_s = torch.stack(sx), torch.tensor(sy)
    with torch.enable_grad():
        params = adapt(learner, x_s, y_s, steps=steps, lr=lr, params=params, buffers=buffers)
    x_q = torch.stack([load_image(p, c, size) for p, _ in queries])
    with torch.no_grad():
        pred = forward(learner, params, x_q, buffers).argmax(1).tolist()
    correct = sum(int(k == label) for (_, label), k in zip(queries, pred))
    doc = {"model": str(a.model), "data": data, "way": way, "shot": a.shot, "steps": steps, "lr": lr,
           "correct": correct, "accuracy": correct / max(1, len(queries)),
           "predictions": [{"image": str(p), "predicted": classes[k].name, "true": classes[label].name}
                           for (p, label), k in zip(queries, pred)]}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2))
    if a.json:
        print(json.dumps(doc, indent=2))
        return 0
    for r in doc["predictions"]:
        print(f"{r['image']}  ->  {r['predicted']}" + ("" if r["predicted"] == r["true"] else f"   (true: {r['true']})"))
    print(f"{way}-way {a.shot}-shot, {steps} steps at lr {lr}: {correct}/{len(queries)} correct "
          f"({100 * doc['accuracy']:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
