"""The model zoo: the server's durable, content-addressed store of received model packages.

Layout::

    root/models/<model_id>.safetensors   # the validated package, written atomically
    root/index.jsonl                      # one {"id", "arch", "num_classes", "time"} line per model, arrival order
    root/quarantine.json                  # models kept but never trained on (server/quarantine.py)

A package's id is :attr:`ModelPackage.model_id` (sha256 over its weights), so an identical
re-submission is stored once. The file is made durable (temp file + fsync + rename) BEFORE the
index line is appended; on open the index is reconciled with the folder (lines without a file are
dropped, files without a line are appended, a torn last line is ignored), so a SIGKILL between the
two writes loses nothing. Built teachers are kept in a bounded LRU cache: memory does not grow
with the zoo.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path

from torch import nn

from free_dfml.common.files import atomic_write_bytes
from free_dfml.common.limits import STORED_LIMITS, applied
from free_dfml.common.package import (ModelMeta, ModelPackage, PackageError, _header_meta, load_package,
                                      package_from_tensors, parse_meta)
from free_dfml.server.quarantine import Quarantine

SUFFIX = ".safetensors"


def _is_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class Zoo:
    def __init__(self, root: str | Path, cache_size: int = 32):
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.index_path = self.root / "index.jsonl"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.cache_size = max(1, int(cache_size))
        self._lock = threading.RLock()
        self._ids: list[str] = []
        self._known: set[str] = set()
        self._metas: dict[str, ModelMeta] = {}
        self._cache: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
        self.quarantine = Quarantine.of_zoo(self.root)
        self._reconcile()

    # ------------------------------------------------------------------------------ internals
    def _path(self, model_id: str) -> Path:
        if not _is_id(model_id):
            raise KeyError(f"not a model id: {model_id!r}")
        return self.models_dir / f"{model_id}{SUFFIX}"

    def _reconcile(self) -> None:
        """Rebuild the arrival order from the index, reconciled with the files on disk."""
        for tmp in self.models_dir.glob(".*.tmp"):   # leftovers of interrupted atomic writes
            try:
                tmp.unlink()
            except OSError:
                pass
        on_disk = {p.stem for p in self.models_dir.glob(f"*{SUFFIX}") if _is_id(p.stem)}
        ids: list[str] = []
        seen: set[str] = set()
        dirty = False
        if self.index_path.exists():
            for line in self.index_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    mid = json.loads(line)["id"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    dirty = True       # torn or foreign line
                    continue
                if mid in seen or mid not in on_disk:
                    dirty = True
                    continue
                seen.add(mid)
                ids.append(mid)
        missing = sorted(on_disk - seen, key=lambda m: (self._path(m).stat().st_mtime_ns, m))
        if missing:
            dirty = True
            ids.extend(missing)
        self._ids, self._known = ids, set(ids)
        if dirty:
            lines = "".join(json.dumps(self._index_entry(m)) + "\n" for m in ids)
            atomic_write_bytes(self.index_path, lines.encode())

    def _index_entry(self, model_id: str) -> dict:
        try:
            meta = self.meta(model_id)
            return {"id": model_id, "arch": meta.arch, "num_classes": meta.num_classes,
                    "time": round(time.time(), 3)}
        except (PackageError, KeyError, OSError):
            return {"id": model_id, "time": round(time.time(), 3)}

    def _append_index(self, entry: dict) -> None:
        with open(self.index_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # --------------------------------------------------------------------------------- public
    def add(self, pkg: ModelPackage) -> tuple[str, bool]:
        """Store a package (validated again); returns (model_id, newly_added)."""
        checked = package_from_tensors(pkg.state, pkg.meta)
        model_id = checked.model_id
        with self._lock:
            if model_id in self._known:
                return model_id, False
            path = self._path(model_id)
            if not path.exists():
                atomic_write_bytes(path, checked.to_bytes())
            self._metas[model_id] = checked.meta
            self._append_index({"id": model_id, "arch": checked.meta.arch,
                                "num_classes": checked.meta.num_classes, "time": round(time.time(), 3)})
            self._ids.append(model_id)
            self._known.add(model_id)
            return model_id, True

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    def usable_ids(self) -> list[str]:
        """The ids training may use: every model but the quarantined (and deleted) ones, read from
        the quarantine file now (an operator's release or delete counts at once)."""
        skip = self.quarantine.ids()
        with self._lock:
            return [m for m in self._ids if m not in skip]

    def remove(self, model_id: str) -> None:
        """Delete a model's package and its index line (the operator's ``quarantine delete``)."""
        path = self._path(model_id)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            self._ids = [m for m in self._ids if m != model_id]
            self._known.discard(model_id)
            self._metas.pop(model_id, None)
            for key in [k for k in self._cache if k[0] == model_id]:
                del self._cache[key]
            lines = []
            if self.index_path.exists():
                for line in self.index_path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        if json.loads(line).get("id") == model_id:
                            continue
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    lines.append(line + "\n")
            atomic_write_bytes(self.index_path, "".join(lines).encode())

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._known

    def meta(self, model_id: str) -> ModelMeta:
        """The package's metadata, read from the safetensors header only (cached)."""
        with self._lock:
            if model_id in self._metas:
                return self._metas[model_id]
            path = self._path(model_id)
            if not path.exists():
                raise KeyError(f"no model {model_id!r} in the zoo")
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise PackageError("not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                data = head + f.read(min(n, 1024 * 1024))
            with applied(STORED_LIMITS):      # admitted under the caps of its time: the format only
                meta = parse_meta(_header_meta(data))
            self._metas[model_id] = meta
            return meta

    def package(self, model_id: str) -> ModelPackage:
        """The stored package, re-validated with :func:`load_package` (its format: the admission
        caps, which may have changed since it was admitted, are not applied again)."""
        path = self._path(model_id)
        if model_id not in self._known and not path.exists():
            raise KeyError(f"no model {model_id!r} in the zoo")
        with applied(STORED_LIMITS):          # admitted under the caps of its time: the format only
            pkg = load_package(path)
        if pkg.model_id != model_id:
            raise PackageError(f"stored package {path.name} does not match its id (corrupt file)")
        return pkg

    def teacher(self, model_id: str, device="cpu") -> nn.Module:
        """The built, eval-mode teacher (takes [0,1] images), from a bounded LRU cache."""
        key = (model_id, str(device))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        model = self.package(model_id).build(device)
        with self._lock:
            self._cache[key] = model
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return model

    def cached(self) -> int:
        """How many built teachers the cache holds now."""
        return len(self._cache)
