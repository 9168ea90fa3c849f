"""Admission checks on a model package: every hostile case of tests/hostile.py is refused with one
short line naming the problem, in process (``package_from_tensors``) and through the wire decode
(``common.wire.content_to_package``); reasons are bounded wherever they are stored or sent; and
Hypothesis fuzzes the parser and the metadata schema (only ``PackageError`` ever escapes)."""

from __future__ import annotations

import json
import re
import math
import time

import pytest
import torch
from flwr.app import Error, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import hostile
from test_service import FakeGrid, make_server, task_identity  # noqa: F401 (autouse: Message ids)
from free_dfml.common import limits, wire
from free_dfml.common.limits import MAX_REASON_BYTES, bounded_reason
from free_dfml.common.models import build_model, forward_macs
from free_dfml.common.package import (META_KEY, PackageError, package_from_bytes, package_from_tensors,
                                      parse_json, parse_meta)


def _one_bounded_line(reason: str) -> None:
    assert len(reason.encode("utf-8")) <= MAX_REASON_BYTES
    assert reason.isprintable(), repr(reason)          # no newline, NUL, ESC or other control


@pytest.mark.parametrize("case", sorted(hostile.PACKAGE_CASES))
def test_hostile_package_rejected_in_process(case):
    h = hostile.PACKAGE_CASES[case]()
    with pytest.raises(PackageError, match=h.match) as err:
        package_from_tensors(h.state, parse_json(h.doc) if isinstance(h.doc, str) else h.doc)
    _one_bounded_line(str(err.value))


@pytest.mark.parametrize("case", sorted(hostile.PACKAGE_CASES))
def test_hostile_package_rejected_through_the_wire(case):
    h = hostile.PACKAGE_CASES[case]()
    with pytest.raises(PackageError, match=h.match) as err:
        wire.content_to_package(hostile.as_content(h))
    _one_bounded_line(str(err.value))


@pytest.mark.parametrize("case", sorted(hostile.PACKAGE_CASES))
def test_hostile_package_rejected_by_the_file_reader(case):
    h = hostile.PACKAGE_CASES[case]()
    doc = h.doc if isinstance(h.doc, str) else json.dumps(h.doc)
    with pytest.raises(PackageError, match=h.match) as err:
        package_from_bytes(st_save(h.state, metadata={META_KEY: doc}))
    _one_bounded_line(str(err.value))


def test_honest_packages_pass_every_check():
    """Our own architectures at the sizes the toolkit uses pass: ResNet-18 at width 64 stores
    11.7 M values with 1000 classes (under the 16 M cap) and costs 3.9 G multiply-accumulates an
    image at 84 px (under the 4 G cap); a DP (GroupNorm) model passes too."""
    for arch, width, side, classes in (("conv4", 64, 84, 5), ("resnet18", 64, 32, 1000)):
        state, doc = hostile.valid(arch=arch, width=width, side=side, classes=classes)
        pkg = package_from_tensors(state, doc)
        assert wire.content_to_package(hostile.as_content(hostile.Hostile(state, doc, ""))).model_id \
            == pkg.model_id
    _, doc = hostile.valid()
    for arch, width, side, classes in (("resnet18", 64, 84, 1000), ("resnet10", 32, 128, 5)):
        meta = parse_meta({**doc, "arch": arch, "arch_kwargs": {"width": width, "norm": "bn"},
                           "input_shape": [3, side, side], "num_classes": classes, "class_labels": None})
        with torch.device("meta"):
            net = build_model(arch, num_classes=classes, image_size=side, width=width)
        assert sum(p.numel() for p in net.parameters()) <= limits.MAX_PARAMETERS
        assert forward_macs(net, meta.input_shape) <= limits.MAX_FORWARD_MACS
    state, doc = hostile.valid(norm="gn")
    doc["dp"] = {"epsilon": 2.0, "delta": 1e-5, "noise_multiplier": 1.1, "max_grad_norm": 1.0}
    assert package_from_tensors(state, doc).meta.is_dp


def test_probe_leaves_the_global_random_state_alone():
    state, doc = hostile.valid()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    package_from_tensors(state, doc)
    assert torch.equal(torch.rand(3), before)


def test_package_byte_cap_fits_the_parameter_cap():
    """No package within the parameter cap can need more than the byte cap."""
    assert limits.MAX_PARAMETERS * 4 + limits.MAX_HEADER_BYTES <= limits.MAX_PACKAGE_BYTES


def test_bounded_reason():
    r = bounded_reason(hostile.huge_reason())
    _one_bounded_line(r)
    assert r.startswith("\\x1b[2J\\x00line\\nbreak\\r") and r.endswith("...")
    assert bounded_reason("short and plain") == "short and plain"
    assert bounded_reason("é" * 400).endswith("...")           # cut on a character boundary
    _one_bounded_line(bounded_reason("é" * 400))
    t0 = time.perf_counter()
    bounded_reason("x" * 50_000_000)
    assert time.perf_counter() - t0 < 2.0
    _one_bounded_line(str(PackageError("a\nb" * 10_000)))     # every PackageError is bounded


def test_huge_client_reason_bounded_in_the_error_reply_the_ack_and_the_service(tmp_path):
    query = wire.query_message(1, wire.MAX_PACKAGE_BYTES)
    _one_bounded_line(wire.error_reply(query, hostile.huge_reason()).error.reason)
    ack = wire.ack_message(1, {"accepted": False, "reason": hostile.huge_reason()})
    _one_bounded_line(wire.ack_document(ack)["reason"])
    srv = make_server(tmp_path, FakeGrid())
    reply = Message(Error(code=wire.ERR_INVALID_PACKAGE, reason=hostile.huge_reason()), reply_to=query)
    outcome = srv.handle_reply(reply, 1)
    assert outcome["accepted"] is False
    _one_bounded_line(outcome["reason"])
    [logged] = list(srv.state.submissions())
    _one_bounded_line(logged["reason"])
    assert (tmp_path / "state").exists()
    assert sum(f.stat().st_size for f in (tmp_path / "state").rglob("*") if f.is_file()) < 100_000


# ------------------------------------------------------------------------------------ fuzzing

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20)

_FIELDS = ["format", "format_version", "arch", "arch_kwargs", "num_classes", "input_shape", "mean",
           "std", "class_labels", "training", "dp", "extra"]
_STATE, _DOC = hostile.valid()
# each example takes milliseconds; the deadline is generous for a loaded shared CPU
_FAST = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _json | st.just(None), max_size=4),
       drop=st.lists(st.sampled_from(_FIELDS), max_size=2))
def test_fuzz_metadata_schema(changes, drop):
    """A valid document with fields replaced or removed: accepted, or a bounded PackageError."""
    doc = {**_DOC, **changes}
    for k in drop:
        doc.pop(k, None)
    t0 = time.perf_counter()
    try:
        meta = parse_meta(doc)
    except PackageError as e:
        _one_bounded_line(str(e))
    else:
        assert all(math.isfinite(s) and s > 0 for s in meta.std)
    assert time.perf_counter() - t0 < 2.0


@_FAST
@given(doc=_json)
def test_fuzz_metadata_any_json(doc):
    try:
        package_from_tensors(_STATE, doc)
    except PackageError as e:
        _one_bounded_line(str(e))


_GOOD_BYTES = st_save(_STATE, metadata={META_KEY: json.dumps(_DOC)})


@_FAST
@given(data=st.data())
def test_fuzz_package_bytes(data):
    """Random bytes, and an honest file with bytes flipped, cut or its header replaced."""
    kind = data.draw(st.sampled_from(["random", "flip", "cut", "header"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "flip":
        blob = bytearray(_GOOD_BYTES)
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[pos] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "cut":
        blob = _GOOD_BYTES[:data.draw(st.integers(0, len(_GOOD_BYTES)))]
    else:
        header = data.draw(st.binary(max_size=100) | _json.map(lambda v: json.dumps(v).encode()))
        blob = len(header).to_bytes(8, "little") + header + _GOOD_BYTES[8:]
    t0 = time.perf_counter()
    try:
        package_from_bytes(blob)
    except PackageError as e:
        _one_bounded_line(str(e))
    assert time.perf_counter() - t0 < 2.0


@_FAST
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
       nest=st.integers(0, 3000))
def test_fuzz_wire_metadata_string(text, nest):
    """Any metadata string on the wire, deep nesting included: a bounded PackageError."""
    h = hostile.Hostile(_STATE, "[" * nest + text + "]" * nest, "")
    try:
        wire.content_to_package(hostile.as_content(h))
    except PackageError as e:
        _one_bounded_line(str(e))



def test_hostile_record_and_field_names_bounded_in_the_log_and_the_reason():
    state, doc = hostile.valid()
    content = hostile.as_content(hostile.Hostile(state, doc, ""))
    for i in range(50):
        content.config_records[wire.META_KEY][f"\x1b[31m{i}" + "k" * 100_000] = "x"
    with pytest.raises(PackageError, match="unexpected metadata field") as err:
        wire.content_to_package(content)
    _one_bounded_line(str(err.value))
    fields = wire.describe_content(content)["meta_fields"]
    assert len(fields) == 9 and fields[-1].startswith("... ")
    assert all(f.isprintable() and len(f.encode()) <= 64 for f in fields)


def test_hostile_packages_rejected_by_the_service(tmp_path):
    """Every hostile case sent by its own node to the ingest service over the fake grid: all
    rejected, each logged, acknowledged and shown in status with its bounded reason, and one
    honest node served in the same poll."""
    cases = sorted(hostile.PACKAGE_CASES)
    grid = FakeGrid()

    def node(content):
        def handle(msg: Message) -> Message | None:
            if msg.metadata.message_type == wire.QUERY:
                return Message(content, reply_to=msg)
            return None                                    # acknowledgements: nothing to reply
        return handle
    for i, case in enumerate(cases, start=1):
        grid.nodes[i] = node(hostile.as_content(hostile.PACKAGE_CASES[case]()))
    state, doc = hostile.valid()
    grid.nodes[100] = node(hostile.as_content(hostile.Hostile(state, doc, "")))
    srv = make_server(tmp_path, grid)
    srv.poll_once()
    srv.poll_once()
    log = {s["node"]: s for s in srv.state.submissions()}
    for i, case in enumerate(cases, start=1):
        assert log[i]["event"] == "rejected", case
        _one_bounded_line(log[i]["reason"])
        assert re.search(hostile.PACKAGE_CASES[case]().match, log[i]["reason"]), (case, log[i]["reason"])
    assert log[100]["event"] == "accepted" and len(srv.zoo) == 1
    acks = [m for m in grid.sent if m.metadata.message_type != wire.QUERY]
    assert len(acks) == len(cases) + 1
    for m in acks:
        _one_bounded_line(wire.ack_document(m)["reason"])


def _serve_one(tmp_path, name: str, content, **settings) -> dict:
    """``content`` sent by one node to a fresh ingest service with ``settings``: its log entry."""
    grid = FakeGrid()
    grid.nodes[1] = lambda msg: Message(content, reply_to=msg) if msg.metadata.message_type == wire.QUERY else None
    srv = make_server(tmp_path / name, grid, **settings)
    srv.poll_once()
    (entry,) = srv.state.submissions()
    return entry


def test_configured_caps_are_the_ones_the_service_applies(tmp_path):
    """Each admission cap lowered just below an honest package (that the defaults accept) rejects it
    with a reason naming the cap's setting; a raised cap admits a package the default refuses, and
    the zoo reads it back (stored packages are not held to today's caps again)."""
    from free_dfml.common.models import build_model
    state, doc = hostile.valid()
    doc["training"] = {"epochs": 1, "data": {"name": "glyphs"}}          # nests the document 3 deep
    honest = hostile.as_content(hostile.Hostile(state, doc, ""))
    assert _serve_one(tmp_path, "default", honest)["event"] == "accepted"
    with torch.device("meta"):
        net = build_model("conv4", num_classes=5, image_size=32, width=8)
    values = sum(v.numel() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked"))
    payload = sum(t.numel() * 4 for t in state.values())
    for setting, value, reason in (
            ("max_payload_bytes", payload - 1, rf"over the {payload - 1}-byte limit \(max-payload-bytes\)"),
            ("max_input_side", 28, r"input_shape H must be an integer in 8\.\.28, got 32 \(max-input-side 28\)"),
            ("max_parameters", values - 1, rf"stores {values} values, over the limit of {values - 1} "
                                           r"\(max-parameters\)"),
            ("max_forward_macs", forward_macs(net, (3, 32, 32)) - 1, r"\(max-forward-macs\)"),
            ("max_label_bytes", 6, r"class_labels\[0\] is longer than 6 bytes \(max-label-bytes\)"),
            ("max_training_bytes", 20, r"over the 20-byte limit \(max-training-bytes\)"),
            ("max_json_depth", 2, r"nested deeper than 2 levels \(max-json-depth\)")):
        entry = _serve_one(tmp_path, setting, honest, **{setting: value})
        assert entry["event"] == "rejected" and re.search(reason, entry["reason"]), (setting, entry["reason"])
    long = _serve_one(tmp_path, "reason", hostile.as_content(hostile.PACKAGE_CASES["huge_mean"]()),
                      max_reason_bytes=60)
    assert long["event"] == "rejected" and len(long["reason"].encode()) <= 60 and long["reason"].endswith("...")
    with limits.applied(limits.Limits(input_side=160)):     # over the default 128 px: refused, unless raised
        state, doc = hostile.valid(side=160)
    big = hostile.as_content(hostile.Hostile(state, doc, ""))
    assert "(max-input-side 128)" in _serve_one(tmp_path, "big-default", big)["reason"]
    entry = _serve_one(tmp_path, "big-raised", big, max_input_side=160)
    assert entry["event"] == "accepted"
    from free_dfml.server.zoo import Zoo
    zoo = Zoo(tmp_path / "big-raised" / "state" / "zoo")      # another process's view: default caps
    assert zoo.meta(entry["model_id"]).input_shape == (3, 160, 160)
    assert zoo.package(entry["model_id"]).model_id == entry["model_id"]
    assert limits.active() == limits.DEFAULT_LIMITS           # the service's caps stayed inside it


def test_hostile_table_admission_rows(tmp_path):
    """experiments/hostile_table.py's in-process rows (the issue's package and reason probes through
    the ingest service): every one refused as the table says, an honest node accepted."""
    from experiments import hostile_table
    hostile_table.ROWS.clear()
    hostile_table.admission(tmp_path)
    assert len(hostile_table.ROWS) == len(hostile_table.PACKAGE_ROWS) + 4
    assert [r["row"] for r in hostile_table.ROWS if not r["ok"]] == []
    md = hostile_table.markdown({"command": "c", "commit": "0" * 40, "started": "s", "machine": "m", "load_start": 0,
                                 "load_end": 0, "seconds": 1.0, "rows": hostile_table.ROWS})
    assert md.count("\n| ") == len(hostile_table.ROWS) + 1 and "**no**" not in md
