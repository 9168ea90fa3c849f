"""The server state folder: everything one FREE server keeps, in one place, written atomically.

Layout (``STATE`` is ``--state DIR``)::

    STATE/zoo/                 accepted model packages (server/zoo.py: models/<id>.safetensors + index.jsonl)
                               and quarantine.json (server/quarantine.py: kept, never trained on)
    STATE/checkpoints/         the FREE trainer's checkpoints (server/trainer.py)
    STATE/superlink.db         the Flower SuperLink database
    STATE/flwr-home/           FLWR_HOME for this server (config.toml, installed app copies)
    STATE/app/pyproject.toml   the Flower app submitted with ``flwr run`` (components + run config)
    STATE/config.json          the effective server settings (FREE config included)
    STATE/submissions.jsonl    one line per submission: accepted (id, arch, dp epsilon) or rejected (reason)
    STATE/status.json          live summary written by the ServerApp (see :func:`build_status`)
    STATE/server.json          the supervisor's record: pids, address, TLS, start time
    STATE/server.pid           the supervisor's pid (``free-server stop`` signals it)
    STATE/stop.request         present while a stop is asked for (the ServerApp checkpoints and exits)
    STATE/serverapp.lock       flock held by the one ServerApp serving this folder
    STATE/serverapp.alive      the ServerApp's pid and run id; touched at each poll that made progress
                               (server/liveness.py: the supervisor's lost-run check)
    STATE/logs/                superlink.log, serverapp.log, server.log

Every JSON file is replaced atomically (temp file + fsync + rename); ``submissions.jsonl`` is
append-only with one fsync'd line per event, and a torn last line is ignored on read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from free_dfml.common.files import atomic_write_bytes
from free_dfml.common.limits import bounded_reason
from free_dfml.common.processes import pid_alive
from free_dfml.server.quarantine import Quarantine

# entries status.json lists of each kind (the last accepted models, rejections and quarantined
# models; the counts cover them all, submissions.jsonl and quarantine.json hold every one): the
# document stays a few tens of kB however many submissions arrive
STATUS_KEEP = 50
STATUS_REJECTED_KEEP = STATUS_KEEP


def atomic_write_json(path: str | os.PathLike, doc: Any) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        return default


@dataclass
class StateDir:
    root: Path

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self._summary: SubmissionSummary | None = None

    # ------------------------------------------------------------------------------ paths
    @property
    def zoo_dir(self) -> Path: return self.root / "zoo"
    @property
    def checkpoint_dir(self) -> Path: return self.root / "checkpoints"
    @property
    def database(self) -> Path: return self.root / "superlink.db"
    @property
    def flwr_home(self) -> Path: return self.root / "flwr-home"
    @property
    def app_dir(self) -> Path: return self.root / "app"
    @property
    def config_path(self) -> Path: return self.root / "config.json"
    @property
    def submissions_path(self) -> Path: return self.root / "submissions.jsonl"
    @property
    def status_path(self) -> Path: return self.root / "status.json"
    @property
    def server_path(self) -> Path: return self.root / "server.json"
    @property
    def pid_path(self) -> Path: return self.root / "server.pid"
    @property
    def stop_path(self) -> Path: return self.root / "stop.request"
    @property
    def logs_dir(self) -> Path: return self.root / "logs"
    @property
    def exports_dir(self) -> Path: return self.root / "exports"
    @property
    def tensorboard_dir(self) -> Path: return self.root / "tensorboard"

    def create(self) -> "StateDir":
        for d in (self.root, self.zoo_dir, self.checkpoint_dir, self.flwr_home, self.app_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        return self.root.is_dir()

    # ------------------------------------------------------------------------ submissions log
    def log_submission(self, entry: dict[str, Any]) -> None:
        """Append one accepted/rejected event (fsync'd) to submissions.jsonl."""
        entry = {"time": round(time.time(), 3), **entry}
        self.root.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode("utf-8")
        with open(self.submissions_path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:                      # after a torn last line (a crash mid-write): start a new line
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def submissions(self) -> Iterator[dict[str, Any]]:
        try:
            text = self.submissions_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue     # a torn last line after a crash
            if isinstance(doc, dict):
                yield doc

    # ------------------------------------------------------------------------------- status
    def write_status(self, doc: dict[str, Any]) -> None:
        atomic_write_json(self.status_path, doc)

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.status_path)

    def write_server(self, doc: dict[str, Any]) -> None:
        atomic_write_json(self.server_path, doc)

    def read_server(self) -> dict[str, Any] | None:
        return read_json(self.server_path)

    def write_pid(self, pid: int | None = None) -> None:
        atomic_write_bytes(self.pid_path, f"{pid or os.getpid()}\n".encode())

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """The supervisor's pid when a server is running on this folder, else None."""
        pid = self.read_pid()
        return pid if pid_alive(pid) else None

    def request_stop(self) -> None:
        atomic_write_bytes(self.stop_path, f"{time.time()}\n".encode())

    def clear_stop(self) -> None:
        try:
            self.stop_path.unlink()
        except FileNotFoundError:
            pass

    def stop_requested(self) -> bool:
        return self.stop_path.exists()


class SubmissionSummary:
    """Counts and the last ``keep`` entries of ``submissions.jsonl``, kept up to date by reading
    only the lines appended since the last :meth:`update` (a status write every second costs the
    new lines, not the whole log). A line without its newline yet is left for the next read; a
    torn line (a crash mid-write, then more lines) is skipped as :meth:`StateDir.submissions` does."""

    def __init__(self, keep: int = STATUS_KEEP):
        self.keep = keep
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.accepted_ids: set[str] = set()     # unique models (bounded by the zoo, not the log)
        self.accepted: deque[dict[str, Any]] = deque(maxlen=self.keep)
        self.rejected: deque[dict[str, Any]] = deque(maxlen=self.keep)
        self.rejected_total = 0
        self.by_category: dict[str, int] = {}
        self.resubmissions = 0
        self.dp_models = 0

    def update(self, path: Path) -> "SubmissionSummary":
        with self._lock:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < self.offset:          # replaced or truncated: start over
                self._reset()
            if size == self.offset:
                return self
            with open(path, "rb") as f:
                f.seek(self.offset)
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    self.offset += len(raw)
                    self._add(raw)
            return self

    def _add(self, raw: bytes) -> None:
        try:
            e = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if not isinstance(e, dict):
            return
        if e.get("event") == "accepted":
            mid = e.get("model_id")
            if mid in self.accepted_ids:
                self.resubmissions += 1
                return
            self.accepted_ids.add(mid)
            if e.get("dp_epsilon") is not None:
                self.dp_models += 1
            self.accepted.append({"id": mid, "arch": e.get("arch"), "num_classes": e.get("num_classes"),
                                  "dp_epsilon": e.get("dp_epsilon"), "dp_delta": e.get("dp_delta"),
                                  "time": e.get("time")})
        elif e.get("event") == "rejected":
            self.rejected_total += 1
            c = e.get("category") or "invalid"
            self.by_category[c] = self.by_category.get(c, 0) + 1
            reason = e.get("reason")
            self.rejected.append({"reason": None if reason is None else bounded_reason(reason),
                                  "category": e.get("category"),
                                  "node": e.get("node"), "time": e.get("time")})


def summarize_submissions(state: StateDir) -> SubmissionSummary:
    """``state``'s submission summary, brought up to date (one per :class:`StateDir` object)."""
    if state._summary is None:
        state._summary = SubmissionSummary()
    return state._summary.update(state.submissions_path)


def build_status(state: StateDir, *, phase: str, started_at: float, run_id: int | None = None,
                 zoo_size: int = 0, training: dict[str, Any] | None = None,
                 last_evaluation: dict[str, Any] | None = None, pending: int = 0,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status.json document (what ``free-server status`` shows): counts of everything, and the
    last ``STATUS_KEEP`` accepted models, rejections and quarantined models."""
    subs = summarize_submissions(state)
    accepted, rejected = list(subs.accepted), list(subs.rejected)
    quarantined = Quarantine.of_zoo(state.zoo_dir).entries()
    now = time.time()
    doc = {
        "phase": phase,
        "pid": os.getpid(),
        "run_id": run_id,
        "started_at": started_at,
        "updated_at": round(now, 3),
        "uptime_s": round(now - started_at, 1),
        "models": {"accepted": len(subs.accepted_ids), "rejected": subs.rejected_total,
                   "resubmissions": subs.resubmissions, "in_zoo": zoo_size, "pending_queries": pending,
                   "quarantined": len(quarantined), "rejected_by_category": dict(subs.by_category),
                   "dp": subs.dp_models},
        "accepted": accepted,
        "rejected": rejected,
        "quarantined": quarantined[-STATUS_KEEP:],
        "dp_epsilons": [a["dp_epsilon"] for a in accepted if a["dp_epsilon"] is not None],
        "training": training or {},
        "last_evaluation": last_evaluation,
    }
    if extra:
        doc.update(extra)
    return doc
