"""A FreeTrainer with ``batched_inversion`` at its default ("auto") against one with the loop, on one
device: whether the batched step was installed, the per-iteration inversion loss and BELL KL of
both, and how far the two learners drift apart in float32 (rounding only: in float64 they agree,
tests/test_benchmarks.py). Six random Conv4-16 teachers, the quick FreeConfig, 4 iterations. The
wall times include the device's first-use costs for whichever mode runs first.

    python -m benchmarks.trainer_batched_check cuda          # "auto" vs the loop
    python -m benchmarks.trainer_batched_check cpu force     # batched forced on vs the loop
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from free_dfml.common.models import build_model
from free_dfml.common.package import make_package
from free_dfml.server.trainer import FreeConfig, FreeTrainer
from free_dfml.server.zoo import Zoo


def main(dev: str, force: bool = False) -> None:
    with tempfile.TemporaryDirectory() as d:
        zoo = Zoo(d + "/zoo")
        for i in range(6):
            torch.manual_seed(100 + i)
            net = build_model("conv4", num_classes=5, width=16)
            zoo.add(make_package(net, arch="conv4", arch_kwargs={"width": 16}, num_classes=5,
                                 input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.3,) * 3))
        trainers = []
        for mode in (True if force else "auto", False):
            cfg = FreeConfig.preset("quick", warmup=1, iterations=4, max_replay_batches=3, batched_inversion=mode)
            tr = FreeTrainer(zoo, cfg, device=dev)
            installed = "step" in tr.metagen.__dict__
            t0 = time.perf_counter()
            tr.run(4, progress=False)
            if dev == "cuda":
                torch.cuda.synchronize()
            trainers.append(tr)
            print(f"mode={mode} installed={installed} time={time.perf_counter() - t0:.2f}s "
                  f"inversion_ce={[round(h['inversion_ce'], 4) for h in tr.history]} "
                  f"bell={[round(h.get('bell_kl', float('nan')), 4) for h in tr.history]}", flush=True)
        a, b = trainers
        diff = max(float((p.detach() - q.detach()).abs().max())
                   for p, q in zip(a.learner.parameters(), b.learner.parameters()))
        print("max learner param diff, batched vs loop (float32):", diff)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda", len(sys.argv) > 2 and sys.argv[2] == "force")
