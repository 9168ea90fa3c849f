"""The free-dfml Flower ClientApp: answers the server's query with ONE model package.

Wire protocol (Flower Message API; see docs/federation.md):

* server -> client, ``message_type="query"``: ``RecordDict({"request": ConfigRecord({"protocol": 1,
  "max-bytes": N})})``: "send me your model".
* client -> server, the reply: ``RecordDict({"model": ArrayRecord(weights), "meta":
  ConfigRecord({"package": <ModelMeta JSON>, "model-id": <sha256 of the weights>})})``, nothing
  else: no data, no gradients, no losses. The package is validated locally before it is sent; a
  package that fails validation (or is over the server's size cap) is answered with an error
  reply carrying the reason, never sent.
* server -> client, ``message_type="query.ack"``: ``RecordDict({"ack": ConfigRecord({"accepted":
  bool, "model-id": str, "new": bool, "reason": str})})``. The client writes it as JSON to the
  ``ack-path`` of its node config (where ``free-client submit`` waits for it) and replies with an
  empty RecordDict.

Deployment: the SuperNode's node config names the package (``model-path``) and the acknowledgement
file (``ack-path``). Simulation: :func:`make_client_app` builds a ClientApp that trains its own
model on its own classes (chosen from ``partition-id`` / ``num-partitions``) and publishes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

if TYPE_CHECKING:   # torch and the package code are imported where needed: the ack handler's
    from free_dfml.common.package import ModelPackage   # process starts faster without them

MAX_PACKAGE_BYTES = 256 * 1024 * 1024   # == common.package.MAX_PACKAGE_BYTES (checked in the tests)

PROTOCOL = 1
MODEL_KEY = "model"          # ArrayRecord: the weights
META_KEY = "meta"            # ConfigRecord: the metadata
PACKAGE_FIELD = "package"    # ModelMeta JSON inside META_KEY
ID_FIELD = "model-id"        # sha256 of the weights inside META_KEY
REPLY_KEYS = frozenset({MODEL_KEY, META_KEY})
META_FIELDS = frozenset({PACKAGE_FIELD, ID_FIELD})
ACK_ACTION = "ack"           # message_type "query.ack"
ERR_INVALID_PACKAGE = 100    # Error.code of a client-side refusal (our own range, above Flower's)


def package_bytes(pkg: "ModelPackage") -> int:
    return sum(t.numel() * t.element_size() for t in pkg.state.values())


def package_to_content(pkg: "ModelPackage") -> RecordDict:
    """The reply content for a package: only weights (ArrayRecord) and metadata (ConfigRecord)."""
    from free_dfml.common.package import package_from_tensors
    checked = package_from_tensors(pkg.state, pkg.meta)     # validate before anything leaves
    arrays = ArrayRecord()
    for k in sorted(checked.state):
        arrays[k] = Array(checked.state[k].detach().cpu().numpy().astype(np.float32, copy=False))
    meta = ConfigRecord({PACKAGE_FIELD: checked.meta.to_json(), ID_FIELD: checked.model_id})
    return RecordDict({MODEL_KEY: arrays, META_KEY: meta})


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERR_INVALID_PACKAGE, reason=reason), reply_to=msg)


def _max_bytes(msg: Message) -> int:
    try:
        req = msg.content.config_records.get("request")
        return int(req["max-bytes"]) if req is not None and "max-bytes" in req else MAX_PACKAGE_BYTES
    except (KeyError, TypeError, ValueError):
        return MAX_PACKAGE_BYTES


def reply_with_package(msg: Message, pkg_or_path: "ModelPackage | str | os.PathLike") -> Message:
    """Validate the package locally and build the reply (or an error reply with the reason)."""
    from free_dfml.common.package import ModelPackage, PackageError, load_package
    try:
        pkg = pkg_or_path if isinstance(pkg_or_path, ModelPackage) else load_package(pkg_or_path)
        limit = _max_bytes(msg)
        size = package_bytes(pkg)
        if size > limit:
            raise PackageError(f"package weights are {size} bytes, over the server's {limit}-byte limit")
        return Message(package_to_content(pkg), reply_to=msg)
    except PackageError as e:
        return _error_reply(msg, f"client refused to send its model: {e}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_ack(msg: Message, context: Context) -> Message:
    """Store the server's acknowledgement where ``free-client submit`` waits for it."""
    rec = msg.content.config_records.get("ack")
    doc: dict[str, Any] = dict(rec) if rec is not None else {"accepted": False, "reason": "empty acknowledgement"}
    doc = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in doc.items()}
    path = context.node_config.get("ack-path")
    if path:
        _atomic_write(Path(str(path)), json.dumps(doc, sort_keys=True).encode())
    return Message(RecordDict(), reply_to=msg)


_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def unverified_content(path: str) -> RecordDict:
    """``free-client submit --no-verify``: the file's tensors and metadata as they are, unchecked.

    For testing a server's defences: every tensor whose bytes are present in the file is sent
    (a truncated file loses its last tensors), the metadata string is sent verbatim. Still only
    the ``model`` and ``meta`` records.
    """
    data = Path(path).read_bytes()
    arrays, meta_json = ArrayRecord(), "{}"
    if len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        try:
            header = json.loads(data[8:8 + n])
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = {}
        if isinstance(header, dict):
            meta_json = str((header.get("__metadata__") or {}).get("free_dfml", "{}"))
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__" or not isinstance(info, dict):
                    continue
                dt = _ST_DTYPES.get(info.get("dtype"))
                start, end = (info.get("data_offsets") or [0, -1])[:2]
                if dt is None or base + end > len(data) or end < start:
                    continue
                arr = np.frombuffer(data[base + start: base + end], dtype=dt).reshape(info.get("shape", [-1]))
                arrays[name] = Array(np.array(arr))
    return RecordDict({MODEL_KEY: arrays, META_KEY: ConfigRecord({PACKAGE_FIELD: meta_json})})


# ------------------------------------------------------------------------------- deployment

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    path = context.node_config.get("model-path")
    if not path:
        return _error_reply(msg, "this SuperNode has no model-path in its node config")
    if context.node_config.get("verify") is False:
        return Message(unverified_content(str(path)), reply_to=msg)
    return reply_with_package(msg, str(path))


@app.query(ACK_ACTION)
def ack(msg: Message, context: Context) -> Message:
    return write_ack(msg, context)


# ------------------------------------------------------------------------------- simulation

@dataclass
class SimClientSettings:
    """How each virtual client trains its own model in ``free-sim``."""

    dataset: str = "glyphs"
    image_size: int = 32
    images_per_class: int | None = None
    classes_per_client: int = 5
    archs: list[str] = field(default_factory=lambda: ["conv4"])   # cycled over partition ids
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 32
    seed: int = 0
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    max_grad_norm: float = 1.0
    out_dir: str | None = None     # where each client writes its package (for inspection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def client_classes(partition: int, num_partitions: int, num_classes: int, per_client: int,
                   seed: int = 0) -> list[int]:
    """Train-split class indices of one client: the same plan as server/experiment.py (a seeded
    permutation cut into disjoint blocks while the split allows)."""
    from free_dfml.common.partition import client_classes as plan
    return plan(num_classes, num_partitions, per_client, True, seed)[partition]


def train_partition(settings: SimClientSettings, partition: int, num_partitions: int) -> "ModelPackage":
    import torch

    from free_dfml.client.train import TrainConfig, train_client
    from free_dfml.common.datasets import open_dataset

    ds = open_dataset(settings.dataset, image_size=settings.image_size, seed=settings.seed,
                      images_per_class=settings.images_per_class)
    n = len(ds.classes("train"))
    classes = client_classes(partition, num_partitions, n, settings.classes_per_client, settings.seed)
    arch = settings.archs[partition % len(settings.archs)]
    cfg = TrainConfig(arch=arch, arch_kwargs=dict(settings.arch_kwargs), epochs=settings.epochs,
                      lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed * 1000 + partition,
                      dp_epsilon=settings.dp_epsilon, dp_delta=settings.dp_delta,
                      max_grad_norm=settings.max_grad_norm)
    torch.set_num_threads(1)
    pkg, _ = train_client(ds, classes, cfg)
    if settings.out_dir:
        from free_dfml.common.package import save_package
        save_package(pkg, Path(settings.out_dir) / f"client-{partition:03d}.safetensors")
    return pkg


def make_client_app(settings: SimClientSettings,
                    trainer: Callable[[SimClientSettings, int, int], "ModelPackage"] = train_partition) -> ClientApp:
    """A ClientApp for simulation: each virtual client trains on its own classes, then publishes."""
    sim_app = ClientApp()

    @sim_app.query()
    def sim_query(msg: Message, context: Context) -> Message:
        if context.node_config.get("model-path"):
            return reply_with_package(msg, str(context.node_config["model-path"]))
        from free_dfml.common.package import PackageError
        try:
            partition = int(context.node_config["partition-id"])
            num = int(context.node_config["num-partitions"])
            pkg = trainer(settings, partition, num)
        except PackageError as e:
            return _error_reply(msg, f"client refused to send its model: {e}")
        return reply_with_package(msg, pkg)

    @sim_app.query(ACK_ACTION)
    def sim_ack(msg: Message, context: Context) -> Message:
        return write_ack(msg, context)

    return sim_app
