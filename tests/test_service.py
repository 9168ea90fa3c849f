"""The ingest service (server/service.py) and the wire protocol (common/wire.py), in process.

A fake Flower grid delivers each message to the ClientApp's own handlers (client/client_app.py's
``query`` / ``ack``, with a node config as a SuperNode would pass it), so the whole exchange of a
deployment (query, reply, check, store, acknowledgement file) runs without a process or a socket.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from flwr.app import Array, Error, Message, MetricRecord

from free_dfml.client import client_app
from free_dfml.common import wire
from free_dfml.common.package import PackageError, load_package, save_package
from free_dfml.server.service import FreeServer
from free_dfml.server.settings import ServerSettings


class FakeGrid:
    """Flower's Grid in memory. ``nodes`` maps a node id to its handler (message -> reply, or None
    for a node that never answers); ``stall`` makes every call wait until it is set again."""

    def __init__(self) -> None:
        self.nodes: dict[int, Callable[[Message], Message | None]] = {}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.stall = threading.Event()
        self.stall.set()
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        self.stall.wait()

    def get_node_ids(self):
        self._call()
        return list(self.nodes)

    def push_messages(self, messages):
        self._call()
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid     # as Flower's grids do
            self.sent.append(msg)
            ids.append(mid)
            handler = self.nodes.get(msg.metadata.dst_node_id)
            reply = handler(msg) if handler is not None else None
            if reply is not None:
                self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids):
        self._call()
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower sets in a ServerApp / ClientApp process before any Message is built."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def supernode(tmp_path: Path, model: Path | None, *, verify: bool = True, ready: bool = False) -> tuple[Callable, Path]:
    """A node running the deployment ClientApp's handlers; returns it and its acknowledgement file.
    ``ready``: as ``free-client submit`` runs it (the validated id in the ready file; the reply is
    then read without torch)."""
    ack = tmp_path / f"ack-{uuid.uuid4().hex[:8]}.json"
    ctx = SimpleNamespace(node_config={"ack-path": str(ack), "verify": verify,
                                       **({"model-path": str(model)} if model else {})})
    if ready:
        path = tmp_path / f"ready-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps({"model-id": load_package(model).model_id}))
        ctx.node_config["ready-path"] = str(path)

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == f"{wire.QUERY}.{wire.ACK_ACTION}":
            return client_app.ack(msg, ctx)
        return client_app.query(msg, ctx)
    return handle, ack


def make_server(tmp_path: Path, grid: FakeGrid, **kw) -> FreeServer:
    kw.setdefault("train", False)
    return FreeServer(grid, ServerSettings(state_dir=str(tmp_path / "state"), poll_interval=0.05,
                                           status_every=0.1, device="cpu", preset="tiny", **kw))


def poll(srv: FreeServer, times: int = 2) -> None:
    for _ in range(times):
        srv.poll_once()


def submissions(srv: FreeServer) -> list[dict]:
    return list(srv.state.submissions())


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_packages, fake_dataset):
    """Package files: three plain, one DP-trained; a truncated file and one with a NaN weight."""
    from safetensors.torch import save_file

    from free_dfml.client.train import TrainConfig, train_client
    d = tmp_path_factory.mktemp("packages")
    out = {}
    for i in range(3):
        save_package(tiny_packages[i], d / f"m{i}.safetensors")
        out[f"m{i}"] = d / f"m{i}.safetensors"
    dp, _ = train_client(fake_dataset, list(range(12, 16)),
                         TrainConfig(epochs=1, arch_kwargs={"width": 8}, seed=7, dp_epsilon=0.5, dp_delta=1e-4))
    save_package(dp, d / "dp.safetensors")
    out["dp"] = d / "dp.safetensors"
    data = out["m0"].read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.safetensors"
    state = {k: v.clone() for k, v in tiny_packages[3].state.items()}
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(d / "nan.safetensors"), metadata={"free_dfml": tiny_packages[3].meta.to_json()})
    out["nan"] = d / "nan.safetensors"
    return out


# ------------------------------------------------------------------------------------ the wire

def test_wire_module_loads_without_torch_and_owns_the_caps():
    """The ClientApp process imports the wire protocol and its glue without torch (it starts fast);
    the size cap of a package file and of the wire is one constant."""
    code = ("import sys, free_dfml.common.wire, free_dfml.client.client_app\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr[-500:]
    from free_dfml.common import package
    assert wire.MAX_PACKAGE_BYTES == package.MAX_PACKAGE_BYTES == 64 * 1024 * 1024
    assert wire.MAX_HEADER_BYTES == package.MAX_HEADER_BYTES


def test_wire_checks(tiny_packages):
    """The server's checks on a reply's content (RecordDicts built here)."""
    pkg = tiny_packages[0]
    good = wire.package_to_content(pkg)
    assert set(good.keys()) == {"model", "meta"} and not good.metric_records
    assert set(good.config_records["meta"].keys()) == {"package", "model-id"}
    assert wire.content_to_package(good).model_id == pkg.model_id
    size = sum(len(a.data) for a in good.array_records["model"].values())
    with pytest.raises(PackageError, match="over the"):
        wire.content_to_package(good, max_bytes=size // 2)              # payload cap
    extra = wire.package_to_content(pkg)
    extra["stats"] = MetricRecord({"loss": 0.1})
    with pytest.raises(PackageError, match="exactly"):
        wire.content_to_package(extra)                                  # nothing but weights + metadata
    more = wire.package_to_content(pkg)
    more.config_records["meta"]["note"] = "hi"
    with pytest.raises(PackageError, match="unexpected metadata"):
        wire.content_to_package(more)
    wrong_id = wire.package_to_content(pkg)
    wrong_id.config_records["meta"]["model-id"] = "0" * 64
    with pytest.raises(PackageError, match="model-id"):
        wire.content_to_package(wrong_id)
    f64 = wire.package_to_content(pkg)
    k = sorted(f64.array_records["model"])[0]
    f64.array_records["model"][k] = Array(pkg.state[k].double().numpy())
    with pytest.raises(PackageError, match="float32"):
        wire.content_to_package(f64)
    bad_meta = wire.package_to_content(pkg)
    bad_meta.config_records["meta"]["package"] = "{not json"
    with pytest.raises(PackageError, match="JSON"):
        wire.content_to_package(bad_meta)
    shape = wire.package_to_content(pkg)
    shape.array_records["model"][k] = Array(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(PackageError, match="shape"):
        wire.content_to_package(shape)
    many = wire.package_to_content(pkg)
    for i in range(wire.MAX_ARRAYS):
        many.array_records["model"][f"x{i}"] = Array(np.zeros(1, dtype=np.float32))
    with pytest.raises(PackageError, match="arrays, over the limit"):
        wire.content_to_package(many)


# ------------------------------------------------------------------------------- the service

def test_accepted_replies_stored_logged_and_acknowledged(tmp_path, files):
    grid = FakeGrid()
    (n1, ack1), (n2, ack2) = supernode(tmp_path, files["m0"]), supernode(tmp_path, files["m1"], ready=True)
    grid.nodes = {11: n1, 12: n2}
    srv = make_server(tmp_path, grid)
    poll(srv)
    query = grid.sent[0]
    assert query.metadata.message_type == "query"
    assert dict(query.content.config_records["request"]) == {"protocol": 1, "max-bytes": wire.MAX_PACKAGE_BYTES}
    ids = {load_package(files[m]).model_id for m in ("m0", "m1")}
    for ack in (ack1, ack2):
        doc = json.loads(ack.read_text())
        assert doc["accepted"] is True and doc["new"] is True and doc["reason"] == ""
        assert doc["model-id"] in ids
    assert set(srv.zoo.ids()) == ids and not srv.pending and not srv.acks   # acks' replies collected
    subs = submissions(srv)
    assert [s["event"] for s in subs] == ["accepted", "accepted"] and {s["node"] for s in subs} == {11, 12}
    for s in subs:     # what the service received: the weights and the two metadata fields, nothing else
        assert s["wire"] == {"array_records": ["model"], "config_records": ["meta"], "metric_records": [],
                             "meta_fields": ["model-id", "package"], "arrays": s["wire"]["arrays"]}
        assert s["arch"] == "conv4" and s["dp_epsilon"] is None
    poll(srv)
    assert len(grid.sent) == 4               # a node heard from is not asked again
    srv.write_status(force=True)
    st = srv.state.read_status()
    assert st["models"]["accepted"] == 2 and st["models"]["in_zoo"] == 2 and st["phase"] == "collecting"


def _extra_records(model: Path) -> Callable[[Message], Message]:
    def handle(msg: Message) -> Message:
        content = wire.package_to_content(load_package(model))
        content["stats"] = MetricRecord({"loss": 0.1})      # a client that also sends its losses
        return Message(content, reply_to=msg)
    return handle


def test_rejections_give_the_reason_in_the_ack_and_the_log(tmp_path, files):
    grid = FakeGrid()
    nodes = {1: supernode(tmp_path, files["truncated"], verify=False),
             2: supernode(tmp_path, files["nan"], verify=False),
             3: supernode(tmp_path, None),                          # refuses: no model-path
             4: (_extra_records(files["m0"]), None),
             5: supernode(tmp_path, files["m2"])}
    grid.nodes = {n: h for n, (h, _) in nodes.items()}
    srv = make_server(tmp_path, grid)
    poll(srv)
    reasons = {s["node"]: s.get("reason") for s in submissions(srv) if s["event"] == "rejected"}
    assert "missing tensor" in reasons[1]
    assert "non-finite" in reasons[2]
    assert reasons[3].startswith("client error: ") and "model-path" in reasons[3]
    assert "exactly" in reasons[4]
    for n in (1, 2, 3):
        doc = json.loads(nodes[n][1].read_text())
        assert doc["accepted"] is False and doc["reason"] == reasons[n] and doc["model-id"] == ""
    assert json.loads(nodes[5][1].read_text())["accepted"] is True        # the service keeps serving
    assert srv.zoo.ids() == [load_package(files["m2"]).model_id]
    srv.write_status(force=True)
    st = srv.state.read_status()
    assert st["models"]["rejected"] == 4 and st["models"]["in_zoo"] == 1
    assert {r["reason"] for r in st["rejected"]} == set(reasons.values())


def test_payload_cap_is_sent_with_the_query_and_enforced(tmp_path, files):
    """The client refuses a package over the server's cap (an error reply); a reply over it that
    comes anyway is rejected by the service."""
    cap = 1000
    grid = FakeGrid()
    honest, _ = supernode(tmp_path, files["m0"])
    grid.nodes = {1: honest, 2: lambda msg: Message(wire.package_to_content(load_package(files["m1"])), reply_to=msg)}
    srv = make_server(tmp_path, grid, max_payload_bytes=cap)
    poll(srv)
    reasons = {s["node"]: s["reason"] for s in submissions(srv)}
    assert "over the server's 1000-byte limit" in reasons[1] and reasons[1].startswith("client error")
    assert "over the 1000-byte limit" in reasons[2]
    assert len(srv.zoo) == 0


def test_duplicate_model_stored_once(tmp_path, files):
    grid = FakeGrid()
    (a, ack_a), (b, ack_b) = supernode(tmp_path, files["m0"]), supernode(tmp_path, files["m0"])
    grid.nodes = {1: a}
    srv = make_server(tmp_path, grid)
    poll(srv)
    grid.nodes[2] = b
    poll(srv)
    first, second = json.loads(ack_a.read_text()), json.loads(ack_b.read_text())
    assert first["accepted"] and second["accepted"] and first["model-id"] == second["model-id"]
    assert first["new"] is True and second["new"] is False
    assert len(list((srv.state.zoo_dir / "models").glob("*.safetensors"))) == 1
    srv.write_status(force=True)
    assert srv.state.read_status()["models"]["resubmissions"] == 1


def test_dp_metadata_recorded_and_free_trains_on_a_mixed_zoo(tmp_path, files):
    """A DP model's epsilon/delta in the log and the status; FREE trains on DP and non-DP teachers,
    and a simulation-style server finishes once the models are in and the iterations done."""
    grid = FakeGrid()
    grid.nodes = {i: supernode(tmp_path, files[m])[0] for i, m in enumerate(("m0", "m1", "m2", "dp"))}
    srv = make_server(tmp_path, grid, train=True, expected_models=4, finish_when_done=True, max_iterations=2,
                      checkpoint_every=0, threads=1)
    srv.serve()
    dp_meta = load_package(files["dp"]).meta.dp
    entry = [s for s in submissions(srv) if s.get("dp_epsilon") is not None]
    assert len(entry) == 1 and entry[0]["dp_epsilon"] == pytest.approx(dp_meta["epsilon"])
    assert entry[0]["dp_delta"] == pytest.approx(dp_meta["delta"])
    st = srv.state.read_status()
    assert st["phase"] == "finished" and st["dp_epsilons"] == [pytest.approx(dp_meta["epsilon"])]
    assert st["training"]["error"] is None and st["training"]["iteration"] == 2
    assert st["training"]["last_metrics"]["zoo_size"] == 4
    assert json.loads((srv.state.checkpoint_dir / "checkpoint.json").read_text())["iteration"] == 2
    assert len((srv.state.logs_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_stalled_reply_blocks_no_one_and_a_lost_reply_is_asked_again(tmp_path, files, monkeypatch):
    """A reply whose upload stalls holds one pull worker, not the loop: another node is checked
    and acknowledged meanwhile. A reply Flower lost on the way (its error code) is not the client's
    answer: not counted, and the node is asked again."""
    import free_dfml.server.service as service
    monkeypatch.setattr(service, "PULL_WAIT_S", 0.2)
    grid = FakeGrid()
    (slow, slow_ack), (fast, fast_ack) = supernode(tmp_path, files["m0"]), supernode(tmp_path, files["m1"])
    lost = {"n": 0}

    def flaky(msg):          # first query: Flower's "objects never arrived" error; then the model
        if msg.metadata.message_type == wire.QUERY and lost["n"] == 0:
            lost["n"] += 1
            return Message(Error(code=3, reason="Reply message objects are unavailable"), reply_to=msg)
        return fast(msg)
    grid.nodes = {21: slow, 22: flaky}
    release = threading.Event()
    pull = grid.pull_messages

    def stalling_pull(ids):              # node 21's reply: as if its upload stalled half-way
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in grid.sent}
        if not release.is_set() and any(dst.get(m) == 21 for m in ids):
            release.wait(30)
        return pull(ids)
    monkeypatch.setattr(grid, "pull_messages", stalling_pull)
    srv = make_server(tmp_path, grid)
    t0 = time.time()
    for _ in range(20):
        srv.poll_once()
        if fast_ack.exists():
            break
    assert time.time() - t0 < 20          # the stalled pull (30 s) did not hold the loop
    assert json.loads(fast_ack.read_text())["accepted"] and not slow_ack.exists()
    assert [s["event"] for s in submissions(srv)] == ["accepted"]    # the lost reply was not counted
    assert lost["n"] == 1 and 22 in srv.heard
    release.set()
    for _ in range(20):
        srv.poll_once()
        if slow_ack.exists():
            break
    assert json.loads(slow_ack.read_text())["accepted"] and len(srv.zoo) == 2
    srv.shutdown()


def test_node_that_leaves_is_forgotten(tmp_path, files, monkeypatch):
    """A query to a node that left before answering is dropped after NODE_GONE_S, and so is an ack
    that is never answered; a node that stays connected keeps its query."""
    from free_dfml.server import service
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(service, "time", SimpleNamespace(time=lambda: clock.now, sleep=time.sleep))
    grid = FakeGrid()
    silent = lambda msg: None                                            # noqa: E731
    grid.nodes = {1: silent, 2: silent}
    srv = make_server(tmp_path, grid)
    srv.poll_once()
    assert sorted(n for n, _ in srv.pending.values()) == [1, 2]
    del grid.nodes[1]
    clock.now += service.NODE_GONE_S + 1
    srv.poll_once()
    assert sorted(n for n, _ in srv.pending.values()) == [2]           # node 2 is still there
    grid.nodes[3] = lambda msg: (Message(wire.package_to_content(load_package(files["m0"])), reply_to=msg)
                                 if msg.metadata.message_type == "query" else None)   # never answers its ack
    srv.poll_once()
    assert len(srv.acks) == 1 and srv.heard[3]["accepted"]
    srv.poll_once()
    assert len(srv.acks) == 1 and sorted(n for n, _ in srv.pending.values()) == [2]
    del grid.nodes[2]
    clock.now += service.NODE_GONE_S + 1
    srv.poll_once()
    assert not srv.acks and not srv.pending
    assert len(srv.zoo) == 1


def test_stalled_link_keeps_status_live_and_stop_is_honoured(tmp_path, files, capsys, caplog):
    """The grid stops answering while FREE trains: status.json keeps following training with the
    stall in ``link``, ``free-server status`` says so, and a stop request checkpoints and ends the
    service without waiting for the grid."""
    from free_dfml.common.cli import run_cli
    from free_dfml.server.cli import app as server_cli

    grid = FakeGrid()
    grid.nodes = {1: supernode(tmp_path, files["m0"])[0]}
    srv = make_server(tmp_path, grid, train=True, checkpoint_every=0, threads=1)
    srv.LINK_STALL_S = 0.5
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    try:
        end = time.time() + 120
        while time.time() < end and srv.runner.iteration < 1:
            time.sleep(0.1)
        grid.stall.clear()                                              # the next call hangs
        stalled_at = srv.runner.iteration
        end = time.time() + 120
        st = {}
        while time.time() < end:
            st = srv.state.read_status() or {}
            if st.get("link", {}).get("stalled_s") and st["training"]["iteration"] >= stalled_at + 2:
                break
            time.sleep(0.2)
        assert st["link"]["stalled_s"] >= 0.5 and st["training"]["iteration"] >= stalled_at + 2
        assert st["phase"] == "training" and st["training"]["running"]
        assert run_cli(server_cli, "free-server", ["status", "--state", str(srv.state.root)]) == 0
        assert "SuperLink has not answered" in capsys.readouterr().out
        srv.state.request_stop()
        end = time.time() + 120
        while time.time() < end and not srv._shut_done.is_set():
            time.sleep(0.1)
        final = srv.state.read_status()
        assert final["phase"] == "stopped" and not srv.runner.running()
        ck = json.loads((srv.state.checkpoint_dir / "checkpoint.json").read_text())
        assert ck["iteration"] == final["training"]["iteration"] >= st["training"]["iteration"]
        assert "stop requested while waiting on the SuperLink" in caplog.text
        assert thread.is_alive()                                        # the poll still waits on the grid
    finally:
        grid.stall.set()
        thread.join(30)
    assert not thread.is_alive()


def test_stop_checkpoints_and_a_restart_resumes(tmp_path, files):
    """stop.request: training stops with a checkpoint at its last iteration and the state folder's
    lock is released; a new service on the folder resumes with the same zoo."""
    grid = FakeGrid()
    grid.nodes = {1: supernode(tmp_path, files["m0"])[0], 2: supernode(tmp_path, files["m1"])[0]}
    srv = make_server(tmp_path, grid, train=True, checkpoint_every=0, min_models=2, threads=1)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    end = time.time() + 120
    while time.time() < end and srv.runner.iteration < 2:
        time.sleep(0.1)
    srv.state.request_stop()
    thread.join(120)
    assert not thread.is_alive()
    st = srv.state.read_status()
    assert st["phase"] == "stopped" and st["training"]["iteration"] >= 2
    ck = json.loads((srv.state.checkpoint_dir / "checkpoint.json").read_text())
    assert ck["iteration"] == st["training"]["iteration"]
    srv.state.clear_stop()
    again = make_server(tmp_path, FakeGrid(), train=True, checkpoint_every=0, max_iterations=ck["iteration"] + 1,
                        threads=1)
    assert sorted(again.zoo.ids()) == sorted(srv.zoo.ids())
    again.poll_once()
    again.runner.thread.join(120)
    assert again.runner.resumed and again.runner.iteration == ck["iteration"] + 1
    again.shutdown()


def test_supervisor_gone_or_stop_event_stops_the_service(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    srv = make_server(tmp_path, FakeGrid(), supervisor_pid=dead.pid)
    assert srv.should_stop()
    srv.settings.supervisor_pid = 0
    assert not srv.should_stop()
    srv.stop_event.set()
    srv.serve()                                     # returns at once, with the final status
    assert srv.state.read_status()["phase"] == "stopped"


def test_shutdown_from_two_threads_waits_for_the_checkpoint_and_tolerates_reentry(tmp_path, monkeypatch):
    """The watchdog and the main loop may both call shutdown(): the second caller returns only once
    the first has stopped training and written the final status. flwr's SIGTERM handler runs in the
    main thread and may interrupt a shutdown() already running there: that call returns at once."""
    srv = make_server(tmp_path, FakeGrid())
    stopped = threading.Event()

    def slow_stop(timeout: float = 120.0) -> None:
        time.sleep(0.5)
        stopped.set()
        srv.shutdown()                         # re-entry in the same thread (as from a signal handler)

    monkeypatch.setattr(srv.runner, "stop", slow_stop)
    monkeypatch.setattr(FreeServer, "SHUTDOWN_WAIT_S", 3.0)    # a re-entry that waited would show
    first = threading.Thread(target=srv.shutdown)
    first.start()
    time.sleep(0.1)
    srv.shutdown()                             # a second thread: must wait for the first
    assert stopped.is_set()
    assert srv.state.read_status()["phase"] == "stopped"
    first.join(5)
    assert not first.is_alive()


def test_stop_process_tree_ends_a_stopped_process():
    """A suspended SuperLink (SIGSTOP) does not keep `free-server stop` from ending it."""
    from free_dfml.common.processes import pid_alive, stop_process_tree
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGSTOP)
    left = stop_process_tree(proc, timeout=1)
    assert left == [] and not pid_alive(proc.pid)


def test_progress_marks_liveness_and_a_failing_or_hanging_grid_does_not(tmp_path, files, monkeypatch):
    """Every poll that succeeds marks the ServerApp's progress (serverapp.alive, what the supervisor's
    lost-run check reads); polls that fail (a refused runtime token) or hang mark none, while
    status.json names the failure."""
    from free_dfml.server import liveness
    grid = FakeGrid()
    grid.nodes = {1: supernode(tmp_path, files["m0"])[0]}
    srv = make_server(tmp_path, grid)
    srv.liveness.ident["run_id"] = srv.run_id = 7
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    try:
        def beat_after(t0: float, timeout: float = 5.0) -> bool:
            end = time.time() + timeout
            while time.time() < end:
                b = liveness.last_beat(srv.state)
                if b and b["time"] > t0:
                    return True
                time.sleep(0.05)
            return False
        assert beat_after(time.time() - 10)
        b = liveness.last_beat(srv.state)
        assert b["pid"] == srv.liveness.ident["pid"] and b["run_id"] == 7
        assert srv.heard[1]["accepted"]

        def refused():
            raise RuntimeError("Runtime task-token authentication failed.")
        monkeypatch.setattr(grid, "get_node_ids", refused)
        time.sleep(0.3)
        t0 = time.time()
        assert not beat_after(t0, 0.5)                       # the loop turns, but no progress
        quiet, pid = liveness.quiet_for(srv.state, 7)
        assert quiet >= 0.5 and pid == b["pid"]
        assert liveness.quiet_for(srv.state, 8) is None     # another run's ServerApp: not this one
        st = srv.state.read_status()
        assert "task-token authentication failed" in st["link"]["last_error"]
        monkeypatch.undo()
        assert beat_after(time.time())                       # recovers by itself once calls succeed
        time.sleep(0.3)
        assert srv.state.read_status()["link"]["last_error"] is None
        grid.stall.clear()                                   # the next call hangs
        time.sleep(0.3)
        assert not beat_after(time.time(), 0.5)
    finally:
        grid.stall.set()
        srv.stop_event.set()
        thread.join(10)
    assert not thread.is_alive()


def test_serverapp_checkpoints_before_flowers_force_exit_timer(tmp_path, monkeypatch):
    """The ServerApp's exit handler (stop training, checkpoint) runs before Flower's 5 s force-exit
    timer starts: a SIGINT on a refused runtime token or a supervisor's SIGTERM does not cut it."""
    import flwr.supercore.exit as flwr_exit
    from free_dfml.server import server_app
    seen = []
    monkeypatch.setattr(flwr_exit, "add_exit_handler", lambda h, **kw: seen.append((h, kw)))
    monkeypatch.setattr(server_app, "short_object_pull_backoff", lambda: None)
    monkeypatch.setattr(FreeServer, "serve", lambda self: None)
    srv = server_app.run_server(FakeGrid(), ServerSettings(state_dir=str(tmp_path / "s"), train=False),
                                register_exit=True)
    assert seen == [(srv.shutdown, {"run_before_force_exit": True})]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_flowers_heartbeat_sender_is_started_again_if_its_thread_died():
    """Flower's task heartbeat ends for good on an HTTP error it does not retry (a 500 here); the
    run would then be failed by the SuperLink 60 s later. The watch starts a new sender on the same
    heartbeat call; a sender stopped on purpose stays stopped."""
    import httpx
    from flwr.supercore.heartbeat import HeartbeatSender

    from free_dfml.server.liveness import HeartbeatWatch
    calls, go = [], threading.Event()

    def heartbeat() -> bool:
        calls.append(time.time())
        if len(calls) == 1:
            go.wait(5)
            req = httpx.Request("POST", "http://127.0.0.1:9/v1/runtime/send-task-heartbeat")
            raise httpx.HTTPStatusError("500", request=req, response=httpx.Response(500, request=req))
        return True
    sender = HeartbeatSender(heartbeat)
    sender.start()
    watch = HeartbeatWatch()
    assert watch.senders == [sender] and watch.check() == 0
    go.set()
    sender._thread.join(5)
    assert not sender._thread.is_alive()
    assert watch.check() == 1 and watch.restarts == 1
    new = watch.senders[0]
    end = time.time() + 5
    while time.time() < end and len(calls) < 2:
        time.sleep(0.02)
    assert len(calls) == 2 and new is not sender and new.is_running
    new.stop()
    assert watch.check() == 0 and watch.restarts == 1
