"""The Flower processes free-dfml starts (SuperLink, SuperNode, their SuperExec and app processes):
launched from this Python's environment (:func:`venv_exe`, :func:`venv_env`), and all gone when a
command ends, also when Flower re-parents them into other sessions (:func:`stop_process_tree`).
Linux ``/proc`` only, like the deployment commands that use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def venv_exe(name: str) -> str:
    """The console script ``name`` of this Python's environment (flower-superlink, flwr, ...), or the
    bare name for a PATH lookup when this environment has none."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower child process: this Python's bin folder first on PATH (so that
    Flower's own subprocesses find the same installation), unbuffered output, plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def pid_alive(pid: int | None) -> bool:
    """True when ``pid`` is a live process (a zombie counts as gone)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Flower's superexec runs in its own session: ppid is what links them)."""
    cmap, out, todo = _ppid_map(), [], [pid]
    while todo:
        for c in cmap.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def terminate(pids: list[int], timeout: float = 15.0) -> list[int]:
    """SIGTERM ``pids``, wait, SIGKILL what is left; returns the pids still alive (should be none)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + timeout
    while time.time() < end and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]


def stop_process_tree(proc: subprocess.Popen, timeout: float = 15.0) -> list[int]:
    """Stop ``proc`` and every descendant (SIGTERM, then SIGKILL after ``timeout`` s), reap ``proc``;
    returns the pids still alive afterwards (normally none)."""
    kids = descendants(proc.pid)
    terminate([proc.pid] + kids, timeout=timeout)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return [p for p in [proc.pid] + kids if pid_alive(p)]
