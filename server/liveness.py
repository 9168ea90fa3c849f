"""Lost-run detection: the ServerApp's loop marks its progress in ``STATE/serverapp.alive``, the
supervisor reads it.

A ServerApp can keep its process while it no longer serves: its main loop hangs in a call to the
SuperLink, every poll fails, or the process is frozen. (A ServerApp whose runtime token the
SuperLink refuses, or whose run it failed after missed heartbeats, exits by itself: Flower's
runtime client answers a refused token with SIGINT, and the ingest service checkpoints on the
way out; the supervisor then sees the process gone.) The ingest service calls :meth:`Liveness.beat`
after every poll that succeeded and every reply it handled; the supervisor calls :func:`quiet_for`
and, past ``lost-after`` seconds, stops that ServerApp (SIGTERM: it checkpoints; SIGKILL if it does
not exit) and submits the run again. Nothing accepted is lost: the zoo and the checkpoints are in
the state folder; a reply in flight is asked for again by the client's retry.

:class:`HeartbeatWatch` keeps Flower's task heartbeat going in the ServerApp process (its sender
ends on errors it does not retry, which would cost the run 60 s later).

The file holds the ServerApp's pid and run id (rewritten when they change); a beat only sets its
modification time, so a poll costs one ``utime`` call, not a write.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from free_dfml.common.processes import pid_alive
from free_dfml.server.state import StateDir

ALIVE_FILE = "serverapp.alive"
RECOVERIES_KEEP = 10      # recovery events server.json lists (recovery_count counts them all)


class Liveness:
    """The ServerApp side: :meth:`beat` after each poll that made progress."""

    def __init__(self, state: StateDir, run_id: int | None):
        self.path = state.root / ALIVE_FILE
        self.ident = {"pid": os.getpid(), "run_id": run_id}
        self._written = False

    def beat(self) -> None:
        try:
            if not self._written:
                tmp = self.path.with_name(f".{ALIVE_FILE}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self.ident) + "\n")
                os.replace(tmp, self.path)
                self._written = True
            else:
                os.utime(self.path)
        except FileNotFoundError:
            self._written = False          # removed under us: written again at the next beat
        except OSError:
            pass                           # a full disk must not stop the service; status says more


class HeartbeatWatch:
    """Flower's task heartbeat sender in this ServerApp process, started again if its thread died.

    Flower's sender (``flwr.supercore.heartbeat.HeartbeatSender``, started before the ServerApp's
    code runs) retries only transport errors and HTTP 503/504: any other error (a SuperLink's HTTP
    500, for example) ends its thread for good, and 60 s later the SuperLink fails the run and
    refuses the ServerApp's token. :meth:`check`, called at each poll, starts a new sender on the
    same heartbeat call instead. The senders are found by their threads when this object is made
    (a finished thread no longer names its target); outside a Flower ServerApp process there are
    none and :meth:`check` does nothing."""

    def __init__(self) -> None:
        self.senders: list[Any] = []
        self.restarts = 0
        try:
            from flwr.supercore.heartbeat import HeartbeatSender
        except ImportError:       # another Flower: nothing to watch
            return
        self._cls = HeartbeatSender
        for t in threading.enumerate():
            owner = getattr(getattr(t, "_target", None), "__self__", None)
            if isinstance(owner, HeartbeatSender) and not owner._stop_event.is_set():
                self.senders.append(owner)

    def check(self) -> int:
        """Start a new sender for each one whose thread ended without being stopped; how many."""
        n = 0
        for i, old in enumerate(self.senders):
            if old._thread.is_alive() or old._stop_event.is_set():
                continue
            new = self._cls(old.heartbeat_fn)
            new.start()
            self.senders[i] = new
            n += 1
        self.restarts += n
        return n


def last_beat(state: StateDir) -> dict[str, Any] | None:
    """``{"pid", "run_id", "time"}`` of the last beat (time: the file's modification time), or None."""
    path = state.root / ALIVE_FILE
    try:
        doc = json.loads(path.read_text())
        doc["time"] = path.stat().st_mtime
    except (OSError, ValueError, TypeError):
        return None
    return doc if isinstance(doc, dict) else None


def quiet_for(state: StateDir, run_id: int | None, now: float | None = None) -> tuple[float, int] | None:
    """How long the live ServerApp of ``run_id`` has made no progress, and its pid; None when no
    ServerApp of that run has beaten yet (still starting) or its process is gone (the supervisor's
    exit check covers that)."""
    beat = last_beat(state)
    if not beat or beat.get("run_id") != run_id or not pid_alive(beat.get("pid")):
        return None
    return (now if now is not None else time.time()) - beat["time"], int(beat["pid"])


def token_refused(superlink_log: Path, offset: int, most: int = 4 * 2 ** 20) -> bool:
    """Whether ``flower-superlink`` logged a refused runtime token ("Runtime task-token
    authentication failed": a run it failed, e.g. after missed heartbeats) past byte ``offset`` of
    its log (the whole file if it rotated since); reads at most ``most`` bytes."""
    try:
        with open(superlink_log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(offset if offset <= size else 0)
            return b"task-token authentication failed" in f.read(most)
    except OSError:
        return False


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def add_recovery(record: dict[str, Any], reason: str, run_id: int | None, now: float | None = None) -> dict[str, Any]:
    """Append one recovery event (time, reason, the run given up) to the supervisor's record, keeping
    the last ``RECOVERIES_KEEP``; the record (``server.json``) stays a few kB however many happen."""
    ev = {"time": round(now if now is not None else time.time(), 3), "reason": reason[:300], "run_id": run_id}
    record["recoveries"] = (list(record.get("recoveries") or []) + [ev])[-RECOVERIES_KEEP:]
    record["recovery_count"] = int(record.get("recovery_count") or 0) + 1
    return ev
