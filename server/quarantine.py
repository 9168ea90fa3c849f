"""Quarantine: models kept in the zoo but never used for training, with the reason and the scores.

The store is one JSON file next to the zoo's index (``STATE/zoo/quarantine.json``)::

    {"version": 1,
     "quarantined": {"<model id>": {"reason": "...", "scores": {...}, "source": "training", "time": t}},
     "released":    {"<model id>": {"reason": "<why it was quarantined>", "time": t}},
     "deleted":     {"<model id>": {"reason": "...", "time": t}}}

A quarantined model's package stays in ``STATE/zoo/models/``. ``release`` makes it usable again
(the trainer uses it from its next iteration); ``delete`` removes its package from the zoo and keeps
the id under ``deleted``, so a running server skips it and the ingest service refuses it if it is
sent again. Every change is a read-modify-write under an ``flock`` on ``quarantine.lock`` with an
atomic replace of the file, so the operator's CLI and a running server (several threads) can change
it at the same time. Readers re-read the file only when its inode, size or mtime changed (one
``stat`` per training iteration).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from free_dfml.common.files import atomic_write_bytes

FILE_NAME = "quarantine.json"
VERSION = 1
REASON_BYTES = 300          # a stored reason is cut to this many bytes
NONFINITE_REASON = "non-finite training step"


class QuarantineError(Exception):
    """An operator request that cannot be done (unknown or ambiguous id, not quarantined)."""


def _short(text: str) -> str:
    b = str(text).encode("utf-8", "replace")[:REASON_BYTES]
    return b.decode("utf-8", "ignore")


def _empty() -> dict[str, Any]:
    return {"version": VERSION, "quarantined": {}, "released": {}, "deleted": {}}


class Quarantine:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_suffix(".lock")
        self._mutex = threading.Lock()
        self._seen: tuple | None = None
        self._doc: dict[str, Any] = _empty()

    @classmethod
    def of_zoo(cls, zoo_dir: str | os.PathLike) -> "Quarantine":
        return cls(Path(zoo_dir) / FILE_NAME)

    # ------------------------------------------------------------------------------ reading
    def _stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read_file(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return _empty()
        out = _empty()
        if isinstance(doc, dict):
            for part in ("quarantined", "released", "deleted"):
                if isinstance(doc.get(part), dict):
                    out[part] = {k: v for k, v in doc[part].items() if isinstance(v, dict)}
        return out

    def document(self) -> dict[str, Any]:
        """The store as it is on disk now (re-read only when the file changed)."""
        with self._mutex:
            stamp = self._stamp()
            if stamp != self._seen:
                self._doc, self._seen = self._read_file(), stamp
            return self._doc

    def ids(self) -> set[str]:
        """Ids never to train on: quarantined and deleted ones."""
        doc = self.document()
        return set(doc["quarantined"]) | set(doc["deleted"])

    def is_deleted(self, model_id: str) -> bool:
        return model_id in self.document()["deleted"]

    def entries(self) -> list[dict[str, Any]]:
        """Quarantined models, oldest first: id, reason, scores, source, time."""
        q = self.document()["quarantined"]
        rows = [{"id": k, **v} for k, v in q.items()]
        return sorted(rows, key=lambda r: (r.get("time") or 0, r["id"]))

    # ------------------------------------------------------------------------------ changes
    @contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            doc = self._read_file()
            yield doc
            atomic_write_bytes(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def add(self, model_id: str, reason: str, scores: dict[str, Any] | None = None,
            source: str = "training") -> None:
        with self._changing() as doc:
            doc["released"].pop(model_id, None)
            doc["quarantined"][model_id] = {"reason": _short(reason), "scores": dict(scores or {}),
                                            "source": source, "time": round(time.time(), 3)}

    def resolve(self, prefix: str, part: str = "quarantined") -> str:
        """The full id of a quarantined model from its id or a unique prefix of it."""
        prefix = prefix.strip().lower()
        if not prefix:
            raise QuarantineError("no model id given")
        hits = [m for m in self.document()[part] if m.startswith(prefix)]
        if not hits:
            raise QuarantineError(f"no quarantined model with id {prefix!r}")
        if len(hits) > 1:
            raise QuarantineError(f"id {prefix!r} is ambiguous ({len(hits)} quarantined models start with it)")
        return hits[0]

    def _move(self, prefix: str, to: str) -> str:
        """Take a quarantined model out of quarantine into the ``to`` list; returns its id."""
        model_id = self.resolve(prefix)
        with self._changing() as doc:
            entry = doc["quarantined"].pop(model_id, None)
            if entry is None:
                raise QuarantineError(f"model {model_id[:16]} is no longer quarantined")
            doc[to][model_id] = {"reason": entry.get("reason", ""), "time": round(time.time(), 3)}
        return model_id

    def release(self, prefix: str) -> str:
        """Make a quarantined model usable again; returns its id."""
        return self._move(prefix, "released")

    def delete(self, prefix: str, zoo) -> str:
        """Delete a quarantined model's package from ``zoo``; its id stays listed as deleted."""
        model_id = self._move(prefix, "deleted")
        zoo.remove(model_id)
        return model_id
