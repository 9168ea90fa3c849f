"""Shared pieces of the benchmark harness: machine record, memory probes, data, zoo building, evaluation."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from free_dfml.client.train import TrainConfig, train_client
from free_dfml.common.datasets import SplitData, open_dataset, to_float
from free_dfml.common.evaluation import evaluate
from free_dfml.common.package import package_from_bytes
from free_dfml.common.partition import client_classes

# ------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, memory, GPU (if used), torch and python versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    return info


# ------------------------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def timed(store: dict, key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = round(time.perf_counter() - t0, 3)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- data

class SyntheticDataset:
    """A small, fast stand-in data set (coloured low-frequency patterns + noise and shifts) with the
    interface of :class:`free_dfml.common.datasets.FewShotDataset`; for the harness's own tests
    (``--dataset synthetic``), never for reported figures."""

    name = "synthetic"

    def __init__(self, image_size: int = 32, seed: int = 0, images_per_class: int = 20,
                 classes: tuple[int, int, int] = (30, 10, 10), channels: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.image_shape = (channels, image_size, image_size)
        self._splits = {}
        for split, n in zip(("train", "val", "test"), classes):
            protos = F.interpolate(torch.rand(n, channels, 4, 4, generator=g), size=image_size,
                                   mode="bilinear", align_corners=False)
            x = protos.repeat_interleave(images_per_class, 0)
            x = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
            y = torch.arange(n).repeat_interleave(images_per_class)
            self._splits[split] = SplitData((x * 255).round().to(torch.uint8), y,
                                            [f"{split}-{c}" for c in range(n)])
        allx = to_float(self._splits["train"].images)
        self.mean = tuple(float(v) for v in allx.mean((0, 2, 3)))
        self.std = tuple(float(v) for v in allx.std((0, 2, 3)))

    def split(self, name: str):
        return self._splits[name]

    def classes(self, split: str) -> list[str]:
        return list(self._splits[split].classes)

    def subset(self, split: str, classes: Sequence[int]):
        return self._splits[split].take(classes)


_DATA_CACHE: dict[tuple, Any] = {}


def open_data(spec: str, *, image_size: int = 32, seed: int = 0,
              images_per_class: int | None = None):
    """``glyphs`` (the embedded data set, rendered once into the usual cache) or ``synthetic``."""
    key = (spec, image_size, seed, images_per_class)
    if key not in _DATA_CACHE:
        if spec == "synthetic":
            _DATA_CACHE[key] = SyntheticDataset(image_size=image_size, seed=seed,
                                                images_per_class=images_per_class or 20)
        else:
            _DATA_CACHE[key] = open_dataset(spec, image_size=image_size, seed=seed,
                                            images_per_class=images_per_class)
    return _DATA_CACHE[key]


# ---------------------------------------------------------------------------------------------- zoo

@dataclass
class ClientSpec:
    """One client model to train: architecture, width, its meta-train classes, input size, seed."""
    arch: str
    width: int
    classes: list[int]
    seed: int
    image_size: int = 32
    epochs: int = 20
    lr: float = 0.01

    def to_dict(self) -> dict:
        return {"arch": self.arch, "width": self.width, "classes": list(self.classes), "seed": self.seed,
                "image_size": self.image_size, "epochs": self.epochs, "lr": self.lr}


def client_plan(num_classes: int, n: int, per_client: int, seed: int, *, archs: Sequence[str] = ("conv4",),
                widths: Sequence[int] = (32,), image_sizes: Sequence[int] = (32,), epochs: int = 20,
                seed_offset: int = 0) -> list[ClientSpec]:
    """``n`` clients over disjoint class sets (wrapping round once the split is used up): clients
    ``seed_offset .. seed_offset + n - 1`` of the simulation's plan (``common/partition.py``); client i
    gets ``archs[i % len(archs)]`` etc. so mixed zoos interleave evenly."""
    plan = client_classes(num_classes, seed_offset + n, per_client, True, seed)[seed_offset:]
    specs = []
    for i, classes in enumerate(plan):
        specs.append(ClientSpec(archs[i % len(archs)], widths[i % len(widths)], classes,
                                seed * 1000 + seed_offset + i, image_sizes[i % len(image_sizes)], epochs))
    return specs


def train_clients(specs: Sequence[ClientSpec], *, data_spec: str, data_seed: int,
                  images_per_class: int | None, device: str = "cpu") -> list[tuple[bytes, dict]]:
    """Train each client; returns (package bytes, report) pairs (picklable, so this runs in a worker)."""
    out = []
    for s in specs:
        ds = open_data(data_spec, image_size=s.image_size, seed=data_seed, images_per_class=images_per_class)
        tc = TrainConfig(arch=s.arch, arch_kwargs={"width": s.width}, epochs=s.epochs, lr=s.lr,
                         seed=s.seed, device=device)
        t0 = time.perf_counter()
        pkg, rep = train_client(ds, s.classes, tc)
        rep = {**rep, **s.to_dict(), "train_s": round(time.perf_counter() - t0, 2)}
        out.append((pkg.to_bytes(), rep))
    return out


def plan_hash(specs: Sequence[ClientSpec], extra: Any = None) -> str:
    blob = json.dumps({"specs": [s.to_dict() for s in specs], "extra": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def add_packages(zoo, items: Sequence[tuple[bytes, dict]]) -> list[dict]:
    """Add packages (bytes) to a Zoo; returns the reports with ``model_id``."""
    reps = []
    for data, rep in items:
        mid, _ = zoo.add(package_from_bytes(data))
        reps.append({**rep, "model_id": mid})
    return reps


# --------------------------------------------------------------------------------------- evaluation

def evaluate_learner(learner, test, *, way: int, shots: Sequence[int], episodes: int, steps: int,
                     lr: float, seed: int, device, with_episodes: bool = False) -> dict[str, dict]:
    """The field's protocol via :func:`free_dfml.common.evaluation.evaluate`, one entry per shot,
    each with its evaluation wall time (and, ``with_episodes``, every episode's accuracy, for paired
    differences). Same ``seed`` -> same episodes for every method."""
    out = {}
    for shot in shots:
        t0 = time.perf_counter()
        r = evaluate(learner, test, way=way, shot=shot, episodes=episodes, steps=steps, lr=lr,
                     seed=seed, device=device)
        sync(device)
        out[f"{shot}shot"] = {**r.to_dict(with_episodes), "eval_s": round(time.perf_counter() - t0, 2)}
    return out


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def map_jobs(fn, jobs: list, workers: int) -> list:
    """``fn`` over ``jobs``, in this process (``workers`` < 1) or in a pool of that many processes
    (``fn`` must be a module-level function; results in the order of ``jobs``)."""
    if workers < 1:
        return [fn(j) for j in jobs]
    # spawned, as benchmarks.jobs does: a forked child cannot use CUDA once its parent has
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs))


def append_jsonl(path: Path | str, rows: Sequence[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command a report records: ``python -m module`` and the arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return f"python -m {module} " + " ".join(shlex.quote(x) for x in args)
