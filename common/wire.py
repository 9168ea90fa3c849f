"""The wire protocol between a client's ClientApp and the FREE ServerApp (Flower Message API).

=========  ===============  =============================================================================
direction  message_type     content
=========  ===============  =============================================================================
S -> C     ``query``        ``{"request": ConfigRecord({"protocol": 1, "max-bytes": N})}``
C -> S     reply            ``{"model": ArrayRecord(weights), "meta": ConfigRecord({"package": <ModelMeta
                            JSON>, "model-id": <sha256 of the weights>})}``, nothing else; or an error
                            reply (``Error(code=100, reason)``) when the client refuses to send
S -> C     ``query.ack``    ``{"ack": ConfigRecord({"accepted": bool, "model-id": str, "new": bool,
                            "reason": str})}``
C -> S     reply            empty ``RecordDict()``
=========  ===============  =============================================================================

Both sides import this module; it imports Flower but not torch (the package code is imported
inside the functions that need it), so a ClientApp process that only writes an acknowledgement
starts fast. :func:`content_to_package` is the server's check of a reply: every failure is a
:class:`~free_dfml.common.package.PackageError` whose message is the rejection reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from free_dfml.common.limits import MAX_ARRAYS, MAX_HEADER_BYTES, MAX_PACKAGE_BYTES, bounded_reason

if TYPE_CHECKING:
    from free_dfml.common.package import ModelPackage

PROTOCOL = 1
QUERY = "query"              # message_type of the server's request
ACK_ACTION = "ack"           # message_type "query.ack": the server's acknowledgement
REQUEST_KEY = "request"      # ConfigRecord of a query: protocol, max-bytes
MODEL_KEY = "model"          # ArrayRecord: the weights
META_KEY = "meta"            # ConfigRecord: the metadata
ACK_KEY = "ack"              # ConfigRecord of an acknowledgement
PACKAGE_FIELD = "package"    # ModelMeta JSON inside META_KEY
ID_FIELD = "model-id"        # sha256 of the weights inside META_KEY
META_FIELDS = frozenset({PACKAGE_FIELD, ID_FIELD})
ERR_INVALID_PACKAGE = 100    # Error.code of a client-side refusal (our own range, above Flower's)
# Flower's Error.codes for a message lost on the way (flwr.common.constant.ErrorCode: MESSAGE_,
# REPLY_MESSAGE_ and NODE_UNAVAILABLE): not the client's answer, the server asks again
TRANSPORT_ERRORS = frozenset({3, 4, 5})
# the Flower app's components that speak this protocol (as `flwr run` names them in pyproject.toml)
SERVERAPP_COMPONENT = "free_dfml.server.server_app:app"
CLIENTAPP_COMPONENT = "free_dfml.client.client_app:app"


# ------------------------------------------------------------------------------ server -> client

def query_message(node_id: int, max_bytes: int) -> Message:
    """"Send me your model": the request carries the protocol version and the server's size cap."""
    req = ConfigRecord({"protocol": PROTOCOL, "max-bytes": int(max_bytes)})
    return Message(RecordDict({REQUEST_KEY: req}), dst_node_id=node_id, message_type=QUERY)


def ack_message(node_id: int, outcome: dict[str, Any]) -> Message:
    """The acknowledgement of a reply: ``outcome`` as the service decided it (accepted, model_id,
    new, reason)."""
    rec = {"accepted": bool(outcome["accepted"]), "model-id": str(outcome.get("model_id") or ""),
           "new": bool(outcome.get("new", False)), "reason": bounded_reason(outcome.get("reason") or "")}
    return Message(RecordDict({ACK_KEY: ConfigRecord(rec)}), dst_node_id=node_id,
                   message_type=f"{QUERY}.{ACK_ACTION}")


def ack_document(msg: Message) -> dict[str, Any]:
    """The acknowledgement as the JSON document ``free-client submit`` reads (plain values only)."""
    rec = msg.content.config_records.get(ACK_KEY)
    doc: dict[str, Any] = dict(rec) if rec is not None else {"accepted": False, "reason": "empty acknowledgement"}
    return {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in doc.items()}


def request_max_bytes(msg: Message) -> int:
    """The size cap a query asks for (the default cap when it names none)."""
    try:
        req = msg.content.config_records.get(REQUEST_KEY)
        return int(req["max-bytes"]) if req is not None and "max-bytes" in req else MAX_PACKAGE_BYTES
    except (KeyError, TypeError, ValueError):
        return MAX_PACKAGE_BYTES


# ------------------------------------------------------------------------------ client -> server

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


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERR_INVALID_PACKAGE, reason=bounded_reason(reason)), reply_to=msg)


def package_reply(msg: Message, pkg_or_path: "ModelPackage | str | os.PathLike") -> Message:
    """Validate the package locally and build the reply to ``msg`` (or an error reply with the reason)."""
    from free_dfml.common.package import ModelPackage, PackageError, load_package
    try:
        pkg = pkg_or_path if isinstance(pkg_or_path, ModelPackage) else load_package(pkg_or_path)
        limit = request_max_bytes(msg)
        size = package_bytes(pkg)
        if size > limit:
            raise PackageError(f"package weights are {size} bytes, over the server's {limit}-byte limit")
        return Message(package_to_content(pkg), reply_to=msg)
    except PackageError as e:
        return error_reply(msg, f"client refused to send its model: {e}")


_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_safetensors(data: bytes) -> tuple[ArrayRecord, str, set[str]]:
    """A safetensors file's readable tensors (numpy, no torch), its free-dfml metadata string as it
    is, and the dtypes of its tensors."""
    arrays, meta_json, dtypes = ArrayRecord(), "{}", set()
    if len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        try:
            header = json.loads(data[8:8 + n])
        except (ValueError, RecursionError):
            header = {}
        if isinstance(header, dict):
            meta_json = str((header.get("__metadata__") or {}).get("free_dfml", "{}"))
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__" or not isinstance(info, dict):
                    continue
                dtypes.add(str(info.get("dtype")))
                dt = _ST_DTYPES.get(info.get("dtype"))
                start, end = (info.get("data_offsets") or [0, -1])[:2]
                if dt is None or base + end > len(data) or end < start:
                    continue
                arr = np.frombuffer(data[base + start: base + end], dtype=dt).reshape(info.get("shape", [-1]))
                arrays[name] = Array(np.array(arr))
    return arrays, meta_json, dtypes


def unverified_content(path: str | os.PathLike) -> RecordDict:
    """``free-client submit --no-verify``: the file's tensors and metadata as they are, unchecked.

    For testing a server's defences: every tensor whose bytes are present in the file is sent
    (a truncated file loses its last tensors), the metadata string is sent verbatim. Still only
    the ``model`` and ``meta`` records.
    """
    arrays, meta_json, _ = _read_safetensors(Path(path).read_bytes())
    return RecordDict({MODEL_KEY: arrays, META_KEY: ConfigRecord({PACKAGE_FIELD: meta_json})})


def checked_file_reply(msg: Message, path: str | os.PathLike, model_id: str) -> Message | None:
    """The reply for a package file that ``free-client submit`` has just validated (its id
    ``model_id``): its float32 tensors and metadata read with numpy, so the ClientApp process
    never imports torch. None when the file is not plain float32 (the caller validates it again);
    an error reply when it is over the query's size cap. The server checks everything again."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return error_reply(msg, f"client refused to send its model: cannot read {path}: {e.strerror}")
    arrays, meta_json, dtypes = _read_safetensors(data)
    if dtypes != {"F32"}:
        return None
    size = sum(len(a.data) for a in arrays.values())
    limit = request_max_bytes(msg)
    if size > limit:
        return error_reply(msg, f"client refused to send its model: package weights are {size} bytes, "
                                f"over the server's {limit}-byte limit")
    meta = ConfigRecord({PACKAGE_FIELD: meta_json, ID_FIELD: str(model_id)})
    return Message(RecordDict({MODEL_KEY: arrays, META_KEY: meta}), reply_to=msg)


# ------------------------------------------------------------------------------ the server's checks

def _check_records(content: RecordDict) -> tuple[ArrayRecord, ConfigRecord, str]:
    """Exactly the model arrays and the metadata config, the known fields, within the caps."""
    from free_dfml.common.package import PackageError
    arrays_keys = set(content.array_records.keys())
    config_keys = set(content.config_records.keys())
    metric_keys = set(content.metric_records.keys())
    if arrays_keys != {MODEL_KEY} or config_keys != {META_KEY} or metric_keys:
        raise PackageError(
            f"reply must hold exactly the '{MODEL_KEY}' arrays and the '{META_KEY}' config; got arrays "
            f"{sorted(arrays_keys)}, configs {sorted(config_keys)}, metrics {sorted(metric_keys)}")
    arrays = content.array_records[MODEL_KEY]
    meta = content.config_records[META_KEY]
    extra = sorted(set(meta.keys()) - META_FIELDS)
    if extra:
        raise PackageError(f"unexpected metadata field(s) {extra}")
    doc = meta.get(PACKAGE_FIELD)
    if not isinstance(doc, str):
        raise PackageError(f"metadata field '{PACKAGE_FIELD}' must be a JSON string")
    if len(doc) > MAX_HEADER_BYTES:
        raise PackageError(f"metadata is {len(doc)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if len(arrays) > MAX_ARRAYS:
        raise PackageError(f"{len(arrays)} arrays, over the limit of {MAX_ARRAYS}")
    return arrays, meta, doc


def content_to_package(content: RecordDict, *, max_bytes: int = MAX_PACKAGE_BYTES) -> "ModelPackage":
    """Check a reply's content and validate it into a package; raises PackageError with the reason."""
    import torch

    from free_dfml.common.package import PackageError, package_from_tensors, parse_json
    arrays, meta, doc = _check_records(content)
    total = sum(len(a.data) for a in arrays.values()) + len(doc)
    if total > max_bytes:
        raise PackageError(f"payload is {total} bytes, over the {max_bytes}-byte limit (max-payload-bytes)")
    state: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        if arr.stype != "numpy.ndarray":
            raise PackageError(f"tensor {name!r} has serialization {arr.stype!r}, expected numpy.ndarray")
        if arr.dtype != "float32":
            raise PackageError(f"tensor {name!r} has dtype {arr.dtype}, expected float32")
        try:
            nd = arr.numpy()            # np.load(allow_pickle=False): never unpickles
        except Exception as e:         # noqa: BLE001 - any decoding problem is a bad package
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PackageError(f"tensor {name!r} cannot be decoded: {first}") from None
        if nd.dtype != np.float32 or tuple(nd.shape) != tuple(arr.shape):
            raise PackageError(f"tensor {name!r} does not match its declared dtype/shape")
        state[name] = torch.from_numpy(np.ascontiguousarray(nd).copy())
    pkg = package_from_tensors(state, parse_json(doc, "metadata"))
    claimed = meta.get(ID_FIELD)
    if claimed is not None and claimed != pkg.model_id:
        raise PackageError("metadata model-id does not match the weights (corrupted in transit?)")
    return pkg


def _names(keys: Any, most: int = 8) -> list[str]:
    """Record or field names as logged: a hostile reply's names are client text, so at most
    ``most`` of them, each one bounded printable line of at most 64 bytes."""
    names = sorted(keys)
    out = [bounded_reason(k, 64) for k in names[:most]]
    return out + ([f"... {len(names) - most} more"] if len(names) > most else [])


def describe_content(content: RecordDict) -> dict[str, Any]:
    """What a reply held (record names and metadata fields): logged with every submission."""
    d: dict[str, Any] = {"array_records": _names(content.array_records.keys()),
                         "config_records": _names(content.config_records.keys()),
                         "metric_records": _names(content.metric_records.keys())}
    if META_KEY in content.config_records:
        d["meta_fields"] = _names(content.config_records[META_KEY].keys())
    if MODEL_KEY in content.array_records:
        d["arrays"] = len(content.array_records[MODEL_KEY])
    return d
