"""Scaling with the zoo size: ingest N models through ``Zoo.add`` and train FREE on the zoo.

Each size runs in a FRESH subprocess (``python -m benchmarks.scaling --size N ...``) so that its
peak resident memory (VmHWM) is its own. In that process:

1. ingest: N random-initialised Conv4 packages (``scaling_width``; distinct seeds, so distinct ids),
   each built, packaged (``make_package``) and written with ``Zoo.add``, one at a time;
2. train: a ``FreeTrainer`` on that zoo (teacher LRU cache of ``scaling_cache`` models), one
   warm-up iteration, then ``scaling_iterations`` timed iterations (FIVE + BELL + replay).

Reported per size: ingest seconds, peak RSS during ingest and during training (the peak is reset
in between via /proc/self/clear_refs), seconds per iteration, teacher loads from disk, the memory
bank's bytes. The zoo stays on disk: memory should not grow with N (target: peak at the largest
size within 1.2x of the smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.accuracy import free_config
from benchmarks.common import peak_rss_mb, reset_peak_rss, rss_mb
from benchmarks.jobs import Ctx, Job
from benchmarks.presets import Preset
from free_dfml.common.models import build_model
from free_dfml.common.package import make_package
from free_dfml.server.memory_bank import MemoryBank
from free_dfml.server.trainer import FreeTrainer
from free_dfml.server.zoo import Zoo

REPO = Path(__file__).resolve().parents[1]


def child(size: int, root: str, preset: dict, device: str, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    p = Preset.from_dict(preset)
    image_size = p.study.data.image_size
    base_rss = rss_mb()
    if Path(root).exists():
        shutil.rmtree(root)
    zoo = Zoo(root, cache_size=p.scaling_cache)
    t0 = time.perf_counter()
    c = 3
    for i in range(size):
        torch.manual_seed(p.study.seed * 100003 + i)
        net = build_model("conv4", num_classes=5, in_channels=c, image_size=image_size, width=p.scaling_width)
        pkg = make_package(net, arch="conv4", arch_kwargs={"width": p.scaling_width}, num_classes=5,
                           input_shape=(c, image_size, image_size), mean=(0.5,) * c, std=(0.3,) * c,
                           training={"note": "random init (scaling benchmark)"})
        zoo.add(pkg)
        del net, pkg
    ingest_s = time.perf_counter() - t0
    peak_ingest = peak_rss_mb()
    rss_ingest = rss_mb()
    reset_ok = reset_peak_rss()

    loads = {"n": 0}
    orig = zoo.package

    def counting(mid):
        loads["n"] += 1
        return orig(mid)

    zoo.package = counting     # count teacher loads from disk (LRU cache misses)
    cfg = free_config(p, schedule={"warmup": 1}, learner={"width": p.scaling_width},
                      bank={"max_mb": p.scaling_bank_mb})
    t0 = time.perf_counter()
    trainer = FreeTrainer(zoo, cfg, device=device)
    init_s = time.perf_counter() - t0
    trainer.step()            # warm-up iteration: generator only
    times = []
    for _ in range(p.scaling_iterations):
        t0 = time.perf_counter()
        trainer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_train = peak_rss_mb()
    bank_bytes = trainer.bank.nbytes
    out = {"size": size, "zoo_models": len(zoo), "ingest_s": round(ingest_s, 3),
           "ingest_ms_per_model": round(1000 * ingest_s / max(1, size), 3),
           "trainer_init_s": round(init_s, 3),
           "s_per_iteration": round(sum(times) / max(1, len(times)), 4),
           "iterations": len(times), "base_rss_mb": round(base_rss, 1),
           "peak_rss_ingest_mb": round(peak_ingest, 1), "rss_after_ingest_mb": round(rss_ingest, 1),
           "peak_rss_train_mb": round(peak_train, 1),
           "peak_rss_mb": round(max(peak_ingest, peak_train), 1), "peak_reset": reset_ok,
           "teacher_loads": loads["n"], "teacher_cache": p.scaling_cache, "teachers_cached": zoo.cached(),
           "bank_keys": len(trainer.bank.keys()), "bank_mb": round(bank_bytes / 2 ** 20, 2),
           "bank_bound_mb": cfg.bank.max_mb, "bank_evicted_keys": trainer.bank.evicted,
           # without the bound: one ring of bank.capacity images per (model, class) key ever seen,
           # i.e. this much once every model of the zoo has been visited
           "bank_mb_unbounded_all_visited": round(size * 5 * MemoryBank.ring_bytes(
               cfg.bank.capacity, (c, image_size, image_size), trainer.bank.dtype) / 2 ** 20, 1),
           "disk_mb": round(sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file()) / 2 ** 20, 2)}
    if device.startswith("cuda"):
        out["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def run(ctx: Ctx, deps: dict) -> dict:
    p = ctx.preset
    rows = []
    for n in p.scaling_sizes:
        root = Path(ctx.work) / f"scaling-zoo-{n}"
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--size", str(n), "--root", str(root),
               "--device", ctx.device, "--threads", str(p.threads_per_worker),
               "--preset-json", json.dumps(p.to_dict())]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scaling child for N={n} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["process_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        shutil.rmtree(root, ignore_errors=True)
    first, last = rows[0], rows[-1]
    return {"rows": rows,
            "peak_ratio_largest_vs_smallest": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
            "train_peak_ratio_largest_vs_smallest": round(last["peak_rss_train_mb"] / first["peak_rss_train_mb"], 3),
            "s_per_iteration_ratio": round(last["s_per_iteration"] / max(1e-9, first["s_per_iteration"]), 3)}


def jobs(p) -> list[Job]:
    return [Job("scaling", run, weight=4.0)]


def summarize(outcomes: dict, p) -> dict:
    o = outcomes.get("scaling")
    if o is None:
        return {}
    return o.result if o.ok else {"error": o.error}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one scaling measurement (run by benchmarks.run)")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset-json", required=True)
    a = ap.parse_args(argv)
    print(json.dumps(child(a.size, a.root, json.loads(a.preset_json), a.device, a.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
