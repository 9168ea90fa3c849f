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
    STATE/logs/                superlink.log, serverapp.log, server.log

Every JSON file is replaced atomically (temp file + fsync + rename); ``submissions.jsonl`` is
append-only with one fsync'd line per event, and a torn last line is ignored on read.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from free_dfml.common.files import atomic_write_bytes
from free_dfml.common.processes import pid_alive
from free_dfml.server.quarantine import Quarantine

STATUS_REJECTED_KEEP = 50      # rejected submissions listed in status.json (all are in submissions.jsonl)


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
        with open(self.submissions_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
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


def summarize_submissions(state: StateDir) -> dict[str, Any]:
    """Accepted models (unique ids, first acceptance) and rejections, from submissions.jsonl."""
    accepted: dict[str, dict[str, Any]] = {}
    rejected: list[dict[str, Any]] = []
    resubmissions = 0
    for e in state.submissions():
        if e.get("event") == "accepted":
            if e.get("model_id") in accepted:
                resubmissions += 1
                continue
            accepted[e["model_id"]] = e
        elif e.get("event") == "rejected":
            rejected.append(e)
    return {"accepted": list(accepted.values()), "rejected": rejected, "resubmissions": resubmissions}


def build_status(state: StateDir, *, phase: str, started_at: float, run_id: int | None = None,
                 zoo_size: int = 0, training: dict[str, Any] | None = None,
                 last_evaluation: dict[str, Any] | None = None, pending: int = 0,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status.json document (what ``free-server status`` shows)."""
    subs = summarize_submissions(state)
    accepted = [{"id": e["model_id"], "arch": e.get("arch"), "num_classes": e.get("num_classes"),
                 "dp_epsilon": e.get("dp_epsilon"), "dp_delta": e.get("dp_delta"), "time": e.get("time")}
                for e in subs["accepted"]]
    rejected = [{"reason": e.get("reason"), "category": e.get("category"), "node": e.get("node"),
                 "time": e.get("time")} for e in subs["rejected"][-STATUS_REJECTED_KEEP:]]
    by_category: dict[str, int] = {}
    for e in subs["rejected"]:
        c = e.get("category") or "invalid"
        by_category[c] = by_category.get(c, 0) + 1
    quarantined = Quarantine.of_zoo(state.zoo_dir).entries()
    now = time.time()
    doc = {
        "phase": phase,
        "pid": os.getpid(),
        "run_id": run_id,
        "started_at": started_at,
        "updated_at": round(now, 3),
        "uptime_s": round(now - started_at, 1),
        "models": {"accepted": len(accepted), "rejected": len(subs["rejected"]),
                   "resubmissions": subs["resubmissions"], "in_zoo": zoo_size, "pending_queries": pending,
                   "quarantined": len(quarantined), "rejected_by_category": by_category},
        "accepted": accepted,
        "rejected": rejected,
        "quarantined": quarantined,
        "dp_epsilons": [a["dp_epsilon"] for a in accepted if a["dp_epsilon"] is not None],
        "training": training or {},
        "last_evaluation": last_evaluation,
    }
    if extra:
        doc.update(extra)
    return doc
