"""Few-shot evaluation of a server's meta-learner on a user's data: what ``free-server evaluate`` runs.

The data: a data-set spec (``glyphs``, ``cifar-fs:PATH``, a folder of class folders) and a split:

- ``all``: every class of the data set (a folder: every class folder, whatever a split file says);
- ``train`` | ``val`` | ``test``: that split (a folder's split file, else its seeded 64/16/20
  class split; glyphs and CIFAR-FS have fixed splits);
- ``auto`` (the default): ``all`` for a folder without split file (a folder of the user's own new
  classes is evaluated on all of them), ``test`` otherwise (the meta-test classes, never seen by
  the clients of a glyph or CIFAR-FS federation; a folder's split file says which are new).

Two seeds: ``split_seed`` fixes the data (a folder's seeded class split, the glyph rendering) and
``seed`` the episodes. Every method (FREE, and with ``baselines`` a random start and the zoo
average as in the demo) is scored on the same episodes, checked by their fingerprint, and the
report gives FREE minus each baseline episode by episode with its 95% interval.

Determinism: the data and the episodes depend only on the spec, split, split seed, images per
class and episode seed. The accuracies are the same to the last digit when run again with the same
checkpoint, device, processor type and number of torch threads; another thread count changes the
order of floating-point sums in the convolutions, so the last digits can differ (within the
interval). On CUDA, cuDNN's kernel choice can differ too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from free_dfml.common.datasets import ALL, SPLITS, DataError, FewShotDataset, SplitData, open_dataset
from free_dfml.common.folder_data import FolderDataset
from free_dfml.common.evaluation import QUERY, paired

AUTO = "auto"
EVAL_SPLITS = (AUTO, ALL) + SPLITS
BASELINES = ("random", "average")


class EvaluationError(ValueError):
    """Bad evaluation input, with a one-line explanation."""


@dataclass
class EvalSpec:
    data: str                              # data-set spec: glyphs | cifar-fs:PATH | DIR | folder:DIR[?split=F]
    split: str = AUTO                      # auto | all | train | val | test
    way: int | None = None                 # None: the meta-learner's
    shot: int = 1
    episodes: int = 200
    query: int = QUERY
    seed: int = 0                          # the episodes
    split_seed: int = 0                    # the data: a folder's seeded class split, the glyph rendering
    images_per_class: int | None = None    # glyphs: rendered a class (default 40); folders: first N files
    baselines: bool = False                # also score a random start and the zoo average

    def check(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise EvaluationError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {self.split!r}")
        for name, v, lo in (("--shot", self.shot, 1), ("--episodes", self.episodes, 1), ("--query", self.query, 1)):
            if v < lo:
                raise EvaluationError(f"{name} must be >= {lo}, got {v}")
        if self.images_per_class is not None and self.images_per_class < 1:
            raise EvaluationError(f"--images-per-class must be >= 1, got {self.images_per_class}")


def resolve_split(ds: FewShotDataset, split: str) -> str:
    """``auto`` -> ``all`` for a folder without split file, else ``test``."""
    if split != AUTO:
        return split
    return ALL if isinstance(ds, FolderDataset) and ds.split_file is None else "test"


def _split_source(ds: FewShotDataset, split: str, split_seed: int) -> str:
    if isinstance(ds, FolderDataset):
        if split == ALL:
            return "every class folder"
        if ds.split_file is not None:
            return f"split file {ds.split_file}"
        return f"seeded 64/16/20 class split, split seed {split_seed}"
    return "every split" if split == ALL else "the data set's fixed split"


def open_eval_data(spec: EvalSpec, *, image_size: int, channels: int) -> tuple[SplitData, dict[str, Any]]:
    """The evaluation data and a description of it (data set, split, class and image counts)."""
    try:
        ds = open_dataset(spec.data, image_size=image_size, grayscale=channels == 1, seed=spec.split_seed,
                          images_per_class=spec.images_per_class)
        split = resolve_split(ds, spec.split)
        data = ds.select(split)
    except DataError as e:
        raise EvaluationError(str(e)) from None
    counts = torch.bincount(data.labels, minlength=data.num_classes).tolist() if len(data) else [0]
    info = {"spec": spec.data, "dataset": ds.name, "split": split,
            "split_source": _split_source(ds, split, spec.split_seed), "classes": data.num_classes,
            "images": len(data), "images_per_class": [min(counts), max(counts)],
            "image_shape": list(ds.image_shape), "split_seed": spec.split_seed}
    if isinstance(ds, FolderDataset):
        info["root"] = str(ds.root)
        info["folder_classes"] = len(ds.class_folders)
    return data, info


def data_line(info: dict[str, Any]) -> str:
    """One line: which data, which split, how many classes and images."""
    lo, hi = info["images_per_class"]
    per = f"{lo}" if lo == hi else f"{lo}-{hi}"
    where = info.get("root", info["spec"])
    c, h, _ = info["image_shape"]
    of = f" of {info['folder_classes']}" if info.get("folder_classes", info["classes"]) != info["classes"] else ""
    return (f"data: {info['dataset']} {where}, split {info['split']} ({info['split_source']}): "
            f"{info['classes']}{of} classes, {info['images']} images ({per} a class), {h}x{h} "
            f"{'grayscale' if c == 1 else 'RGB'}")


def evaluate_trainer(trainer, spec: EvalSpec, *, progress: bool = True,
                     on_data: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Score the trainer's meta-learner (and with ``spec.baselines`` a random start and the zoo
    average) on ``spec``; returns the evaluation document. ``on_data`` sees the data description
    before the (long) scoring starts."""
    from free_dfml.server import report
    from free_dfml.server.baselines import average_learner, random_learner

    spec.check()
    lrn = trainer.cfg.learner
    way = lrn.way if spec.way is None else spec.way
    if way != lrn.way:
        raise EvaluationError(f"the meta-learner is {lrn.way}-way; --way {way} does not match")
    data, info = open_eval_data(spec, image_size=lrn.image_size, channels=lrn.channels)
    if tuple(info["image_shape"]) != (lrn.channels, lrn.image_size, lrn.image_size):
        raise EvaluationError(f"data is {info['image_shape']} but the meta-learner takes "
                              f"{[lrn.channels, lrn.image_size, lrn.image_size]}")
    if data.num_classes < way:
        raise EvaluationError(f"a {way}-way episode needs {way} classes; {info['split']} has {data.num_classes}")
    if on_data is not None:
        on_data(info)
    learners = {"free": trainer.learner}
    skipped: dict[str, str] = {}
    if spec.baselines:
        learners["random"] = random_learner(trainer.cfg, norm=trainer.norm)
        try:
            learners["average"] = average_learner([trainer.zoo.package(m) for m in trainer.zoo.ids()], trainer.cfg)
        except ValueError as e:
            skipped["average"] = str(e)
    t0 = time.perf_counter()
    try:
        results = report.evaluate_methods(
            learners, data, way=way, shots=(spec.shot,), episodes=spec.episodes, steps=lrn.adapt_steps,
            lr=lrn.inner_lr, seed=spec.seed, device=trainer.device, progress=progress, with_episodes=True)
    except ValueError as e:     # e.g. a class with fewer than shot + query images
        raise EvaluationError(str(e).splitlines()[0]) from None
    key = f"{spec.shot}shot"
    shas = {m: r[key]["episodes_sha"] for m, r in results.items()}
    if len(set(shas.values())) != 1:      # cannot happen with one sampler seed; paired needs it
        raise RuntimeError(f"methods were scored on different episodes: {shas}")
    pairs = {m: {key: paired(results["free"][key]["accuracies"], r[key]["accuracies"])}
             for m, r in results.items() if m != "free"}
    for r in results.values():
        r[key].pop("accuracies")
    free = results["free"][key]
    doc: dict[str, Any] = {
        "time": time.time(), "iteration": trainer.iteration, "data": info, "split": info["split"],
        "way": way, "shot": spec.shot, "episodes": spec.episodes, "query": spec.query, "seed": spec.seed,
        "split_seed": spec.split_seed, "adapt_steps": lrn.adapt_steps, "inner_lr": lrn.inner_lr,
        "device": str(trainer.device), "torch_threads": torch.get_num_threads(),
        "episodes_sha": free["episodes_sha"], "results": results, "eval_s": round(time.perf_counter() - t0, 2),
        f"eval_{spec.shot}shot": free["mean"], f"eval_{spec.shot}shot_ci95": free["ci95"],
        "spec": asdict(spec),
    }
    if pairs:
        doc["paired"] = pairs
    if skipped:
        doc["skipped"] = skipped
    return doc


def result_line(doc: dict[str, Any]) -> str:
    """FREE's figure in one line."""
    r = doc["results"]["free"][f"{doc['shot']}shot"]
    return (f"FREE meta-learner (iteration {doc['iteration']}), {doc['way']}-way {doc['shot']}-shot: "
            f"{100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}% ({doc['episodes']} episodes, seed {doc['seed']}, "
            f"{doc['torch_threads']} torch threads)")


def print_report(doc: dict[str, Any], console=None) -> None:
    """FREE's line, and with baselines the demo's table with the paired differences."""
    from free_dfml.server import report
    print(result_line(doc))
    if len(doc["results"]) > 1:
        report.print_table(console or report.console(), doc,
                           title=f"FREE vs baselines on the same {doc['episodes']} episodes (95% intervals)")
    for m, why in doc.get("skipped", {}).items():
        print(f"{m}: not scored: {why}")
