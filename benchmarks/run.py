"""One command for the project's performance evidence.

    python -m benchmarks.run --preset tiny|quick|paper [--device auto|cpu|cuda]
                             [--out runs/bench/NAME] [--only accuracy,recovery,...,cost,time_to_accuracy,equal_time]
                             [--set FIELD=VALUE ...]

``--set`` overrides a field of the preset (``benchmarks/presets.py``; VALUE is JSON when it parses),
e.g. ``--set iterations=1000 --set 'methods=["random","free","oracle"]' --set
'free={"generator": {"jitter": 2}}'`` (``free`` holds FreeConfig overrides for every FREE-family
method; the study's fields as ``section.field``, e.g. ``--set clients.count=8``).

Sections (one module each): ``accuracy`` (every method, 5-way 1/5-shot, 600 meta-test episodes),
``recovery`` (FIVE vs scratch inversion speed), ``batched`` (vmapped multi-teacher inversion vs the
sequential loop), ``hetero`` (mixed-architecture and mixed-domain zoos), ``scaling`` (memory and
speed vs zoo size); ``trust`` (harmful models, the data-free screen off and on) and ``reliability``
(a real loopback server: concurrent submits, latency, kill -9), ``cost`` (inversion seconds per
iteration, FIVE vs fresh generators), ``time_to_accuracy`` (meta-val accuracy vs training
wall-clock) and ``equal_time`` (meta-test at one wall-clock budget, over seeds) only with ``--only``.
Writes ``results.json``, ``results.md`` and PNG plots into ``--out``, with the
machine (CPU / GPU model, torch version), the preset, the seed and the command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import (accuracy, batched, cost, equal_time, hetero, recovery, reliability, scaling,
                        time_to_accuracy, trust)
from benchmarks.common import command_line, machine_info, set_threads
from benchmarks.jobs import Ctx, run_jobs
from benchmarks.presets import NAMES, get_preset, parse_setting
from benchmarks.report import markdown, plots, run_record, targets
from free_dfml.server.device import resolve_device

# each section's module has jobs(preset) -> [Job] and summarize(outcomes, preset) -> dict
MODULES = {"accuracy": accuracy, "recovery": recovery, "batched": batched, "hetero": hetero,
           "scaling": scaling, "trust": trust, "reliability": reliability, "cost": cost,
           "time_to_accuracy": time_to_accuracy, "equal_time": equal_time}
OPT_IN = ("trust", "reliability", "cost", "time_to_accuracy", "equal_time")   # run only when named in --only
# opt-in sections with their own NAME.json, NAME.md, targets and plots (also appended to results.md)
SELF_REPORTED = ("cost", "time_to_accuracy", "equal_time")
SECTIONS = tuple(m for m in MODULES if m not in OPT_IN)


def _jobs_for(sections, p):
    jobs, seen = [], set()
    for sec in sections:
        for j in MODULES[sec].jobs(p):
            if j.name not in seen:
                seen.add(j.name)
                jobs.append(j)
    return jobs


def check_sections(only: list[str] | None, p) -> list[str]:
    """The sections to run (all by default); a ValueError for a request that cannot run."""
    sections = list(only) if only else list(SECTIONS)
    bad = [s for s in sections if s not in MODULES]
    if bad:
        raise ValueError(f"unknown section(s) {bad} (known: {', '.join(MODULES)})")
    for s in sections:                              # a section's own check of its settings
        getattr(MODULES[s], "check", lambda _: None)(p)
    probes = [s for s in ("recovery", "cost") if s in sections]
    if probes and "free" not in p.methods:
        raise ValueError(f"the {probes[0]} section probes the generator that the accuracy section's "
                         f"'free' method trains: keep 'free' in methods or leave {probes[0]} out")
    return sections


def run(preset: str = "quick", *, out: str | Path | None = None, device: str = "auto",
        only: list[str] | None = None, workers: int | None = None, keep_work: bool = False,
        log: Callable[[str], None] = print, command: str | None = None, **overrides: Any) -> dict:
    """Run the benchmark; returns the results document (also written to ``out/results.json``)."""
    if workers is not None:
        overrides["workers"] = workers
    p = get_preset(preset, **overrides)
    sections = check_sections(only, p)
    dev = resolve_device(device)
    out = Path(out or f"runs/bench/{preset}")
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    if p.workers <= 0:
        set_threads(p.threads_per_worker)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_start = _loadavg()
    git = _git_state()
    t0 = time.perf_counter()
    ctx = Ctx(preset=p, out=str(out), work=str(work), device=str(dev))
    jobs = _jobs_for(sections, p)
    log(f"[bench] preset {preset}: {len(jobs)} jobs, {p.workers} worker(s), device {dev}, out {out}")
    outcomes = run_jobs(jobs, ctx, workers=p.workers, threads=p.threads_per_worker, log=log)
    wall = time.perf_counter() - t0
    machine = machine_info(dev)
    machine["torch_threads"] = p.threads_per_worker or machine["torch_threads"]
    machine["load_average_start"] = load_start     # other work on the machine during the run
    machine["load_average_end"] = _loadavg()
    doc: dict[str, Any] = {
        "preset": preset, "seed": p.study.seed, "settings": p.to_dict(), "machine": machine,
        "command": command or "benchmarks.run.run(" + repr(preset) + ")", "started": started,
        "wall_s": round(wall, 1), "out": str(out), "git": git, "sections": {},
        # preset fields set by the caller (beyond the worker count): the run is not the preset as such
        "overrides": {k: v for k, v in overrides.items() if k != "workers"},
        "complete_preset": sections == list(SECTIONS) and set(overrides) <= {"workers", "seed"},
        "jobs": {k: {"ok": o.ok, "wall_s": round(o.wall_s, 2)} for k, o in outcomes.items()},
        "job_errors": {k: o.error for k, o in outcomes.items() if not o.ok},
    }
    for sec in sections:
        doc["sections"][sec] = MODULES[sec].summarize(outcomes, p)
    if "trust" in doc["sections"]:
        (out / "trust.json").write_text(json.dumps(doc["sections"]["trust"], indent=1, default=_json_default))
        (out / "trust.md").write_text(trust.markdown(doc["sections"]["trust"]))
    if "reliability" in doc["sections"]:
        (out / "reliability.json").write_text(json.dumps(doc["sections"]["reliability"], indent=1,
                                                         default=_json_default))
        (out / "reliability.md").write_text(reliability.markdown(doc["sections"]["reliability"]))
    doc["targets"] = targets(doc)
    doc["plots"] = plots(doc, out)
    extra_md = ""
    for sec in (s for s in SELF_REPORTED if s in doc["sections"]):
        mod, body = MODULES[sec], {**doc["sections"][sec], "run": run_record(doc)}
        doc["sections"][sec] = body
        (out / f"{sec}.json").write_text(json.dumps(body, indent=1, default=_json_default))
        (out / f"{sec}.md").write_text(mod.markdown(body))
        extra_md += "\n" + mod.markdown(body)
        doc["targets"] += mod.targets(body)
        try:
            doc["plots"] += mod.plots(body, out)
        except Exception as e:  # noqa: BLE001 - a plot must never lose the results
            log(f"[bench] plot {sec} failed: {e}")
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    (out / "results.md").write_text(markdown(doc) + extra_md)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[bench] done in {wall:.0f} s: {out / 'results.md'}")
    return doc


def _git_state() -> dict | None:
    """The commit the run measured, and the tracked files that differed from it at the start."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": head, "modified": sorted(x[3:] for x in dirty if x.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=NAMES, help="tiny | quick | paper (alias full)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--out", default=None, help="output folder (default runs/bench/<preset>)")
    ap.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(MODULES))
    ap.add_argument("--workers", type=int, default=None, help="worker processes (0: in-process)")
    ap.add_argument("--dataset", default=None, help="data set spec (default glyphs; 'synthetic' for tests)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep-work", action="store_true", help="keep the zoos and states under OUT/work")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a preset field (benchmarks/presets.py), VALUE as JSON if it parses; repeatable")
    a = ap.parse_args(argv)
    over: dict[str, Any] = {}
    if a.dataset:
        over["dataset"] = a.dataset
    if a.seed is not None:
        over["seed"] = a.seed
    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else None
    try:                                            # refuse bad fields / values before any work
        over.update(parse_setting(s) for s in a.set)
        check_sections(only, get_preset(a.preset, **over))
    except ValueError as e:
        ap.error(str(e))
    cmd = command_line("benchmarks.run", argv)
    doc = run(a.preset, out=a.out, device=a.device, only=only, workers=a.workers, keep_work=a.keep_work,
              command=cmd, **over)
    return 0 if not doc["job_errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
