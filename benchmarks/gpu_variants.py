"""Batched-inversion timing on a GPU under cuDNN settings: ``cudnn.benchmark`` off (PyTorch's
default) and on (cuDNN times its algorithms for each new shape and keeps the fastest; FREE's shapes
are fixed, so only the first step pays), at the full and the quick preset's sizes. Both the loop and
the batched step run under the same setting, in one process, so each ratio is like for like.

    python -m benchmarks.gpu_variants OUT.json [DEVICE [PRESETS]]   (defaults: cuda, full,quick)
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from benchmarks.batched import run
from benchmarks.common import machine_info
from benchmarks.jobs import Ctx
from benchmarks.presets import get_preset


def main(out: str, device: str = "cuda", presets: tuple[str, ...] = ("full", "quick")) -> None:
    rows = []
    for preset in presets:
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            p = get_preset(preset, batched_T=(16, 64), batched_repeats=3)
            with tempfile.TemporaryDirectory() as work:
                r = run(Ctx(preset=p, out=work, work=work, device=device), {})
            for row in r["rows"]:
                rows.append({"preset": preset, "cudnn_benchmark": bench, "teacher": r["teacher"],
                             "images_per_teacher": r["images_per_teacher"], **row})
                print(json.dumps(rows[-1]), flush=True)
    doc = {"machine": machine_info(torch.device(device)), "rows": rows}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not 1 <= len(args) <= 3:
        sys.exit(__doc__)
    main(args[0], args[1] if len(args) > 1 else "cuda",
         tuple(args[2].split(",")) if len(args) > 2 else ("full", "quick"))
