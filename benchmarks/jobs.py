"""A tiny dependency-aware job runner: benchmark pieces run in worker processes (one torch thread each
on CPU, so two jobs use two cores without fighting over threads), or in-process with ``workers=0``.

A job is a function called as ``fn(ctx, deps, **kwargs)`` where ``deps`` maps each dependency's
name to its result. The function must be defined at a module's top level, so that it pickles (by
name) into a spawned worker; its results must be picklable too (plain dicts). A failing job records its traceback;
the jobs that depend on it are skipped, everything else still runs.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Ctx:
    preset: Any              # benchmarks.presets.Preset
    out: str                 # the run's output folder
    work: str                # scratch folder inside it (zoos, states)
    device: str              # "cpu" | "cuda"


@dataclass
class Job:
    name: str
    fn: Callable[..., Any]   # a module-level function, e.g. benchmarks.accuracy.run_method
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    weight: float = 1.0      # rough cost, bigger first when several are ready


@dataclass
class Outcome:
    ok: bool
    result: Any = None
    error: str | None = None
    wall_s: float = 0.0


def _call(fn: Callable[..., Any], ctx: Ctx, deps: dict, kwargs: dict) -> Outcome:
    t0 = time.perf_counter()
    try:
        result = fn(ctx, deps, **kwargs)
        return Outcome(True, result, None, time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - recorded, the run goes on
        return Outcome(False, None, traceback.format_exc(), time.perf_counter() - t0)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this worker when the harness process dies (killed, not only interrupted),
    so that no orphaned worker keeps training a job whose result nobody will collect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):                       # not Linux: workers outlive a killed parent
        return
    if os.getppid() != parent:                              # it died before the request took effect
        os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass


def run_jobs(jobs: list[Job], ctx: Ctx, *, workers: int, threads: int,
             log: Callable[[str], None] = print) -> dict[str, Outcome]:
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate job names")
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        missing = [d for d in j.deps if d not in by_name]
        if missing:
            raise ValueError(f"job {j.name} depends on unknown job(s) {missing}")
    done: dict[str, Outcome] = {}
    pending = list(jobs)

    def ready() -> list[Job]:
        out = [j for j in pending if all(d in done for d in j.deps)]
        return sorted(out, key=lambda j: -j.weight)

    def take(j: Job) -> dict | None:
        """Take ``j`` off the queue: its dependencies' results, or None (recorded as skipped)
        when one of them failed."""
        pending.remove(j)
        if not all(done[d].ok for d in j.deps):
            done[j.name] = Outcome(False, None, "skipped: a dependency failed")
            return None
        log(f"[bench] {j.name} ...")
        return {d: done[d].result for d in j.deps}

    if workers <= 0:
        while pending:
            batch = ready()
            if not batch:
                raise RuntimeError("dependency cycle among jobs")
            j = batch[0]
            deps = take(j)
            if deps is not None:
                done[j.name] = _call(j.fn, ctx, deps, j.kwargs)
                _report(log, j.name, done[j.name])
        return done

    running: dict[Future, Job] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
        while pending or running:
            for j in ready():
                if len(running) >= workers:
                    break
                deps = take(j)
                if deps is not None:
                    running[pool.submit(_call, j.fn, ctx, deps, j.kwargs)] = j
            if not running:
                if pending and not ready():
                    raise RuntimeError("dependency cycle among jobs")
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in finished:
                j = running.pop(f)
                try:
                    done[j.name] = f.result()
                except Exception:  # noqa: BLE001 - a crashed worker
                    done[j.name] = Outcome(False, None, traceback.format_exc())
                _report(log, j.name, done[j.name])
    return done


def _report(log, name: str, o: Outcome) -> None:
    if o.ok:
        log(f"[bench] {name} done in {o.wall_s:.1f} s")
    else:
        log(f"[bench] {name} FAILED after {o.wall_s:.1f} s:\n{o.error}")
