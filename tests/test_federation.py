"""The federation end to end, with real processes on loopback (CPU).

One FREE server (``free-server start``: flower-superlink + the FREE ServerApp via ``flwr run``,
TLS with certificates generated here) takes submissions from ``free-client submit`` processes
(each a flower-supernode + ClientApp). Covered: six clients submitting at once all acknowledged
with their ids over TLS (none lost, none stored twice); what crossed Flower's wire was only the
weights + metadata records; a rejection and a duplicate reach ``free-client`` as its exit code and
message; SIGKILL of every server process, restart on the same state folder: zoo intact, training
resumed from the checkpoint, new submissions accepted (without TLS this time); a clean stop leaves
no process behind.

Node authentication, ``submit`` without a server and the client's retry are in
tests/test_submit.py (their own servers, so they run beside these); the service's logic (checks,
rejections, duplicates, DP metadata, nodes that leave, a stalled SuperLink, stop) in process over
a fake grid in tests/test_service.py; ``free-sim`` on Flower's simulation engine in
tests/test_study.py. Helpers: tests/loopback.py.
"""

from __future__ import annotations

import json
import time

import pytest
from loopback import BIN, Server, alive, client_models, make_certs, parallel, run, server_pids

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory, fake_dataset):
    return client_models(tmp_path_factory.mktemp("models"), fake_dataset)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    srv = Server(d / "state", make_certs(d / "certs"), d / "server.log")
    srv.start()
    yield srv
    srv.shutdown()


@slow
def test_six_concurrent_clients_accepted_over_tls(server, models):
    """Six submissions at once: every one acknowledged with its own id, each stored once."""
    names = [f"client{i}" for i in range(3)] + [f"extra{i}" for i in range(1, 4)]
    t0 = time.time()
    results = parallel([lambda m=models[n]: server.submit(m) for n in names])
    for r in results:
        assert r.returncode == 0, r.stderr
    ids = [r.stdout.strip().splitlines()[-1] for r in results]
    from free_dfml.common.package import load_package
    assert ids == [load_package(models[n]).model_id for n in names] and len(set(ids)) == 6
    st = server.status()
    assert st["running"] and st["server"]["tls"]
    assert st["models"]["accepted"] == 6 and st["models"]["in_zoo"] == 6
    assert sorted(a["id"] for a in st["accepted"]) == sorted(ids)
    index = [json.loads(ln)["id"] for ln in (server.state / "zoo" / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == sorted(ids)                       # none stored twice
    human = run(BIN / "free-server", "status", "--state", server.state)
    assert "6 accepted" in human.stdout
    print(f"six TLS submissions in parallel: {time.time() - t0:.1f} s")


@slow
def test_only_weights_and_metadata_cross_the_wire(server):
    """What the ServerApp received from each ClientApp over Flower (logged from the received content)."""
    subs = [json.loads(ln) for ln in (server.state / "submissions.jsonl").read_text().splitlines()]
    accepted = [s for s in subs if s["event"] == "accepted"]
    assert len(accepted) >= 6
    for s in accepted:
        assert s["wire"] == {"array_records": ["model"], "config_records": ["meta"], "metric_records": [],
                             "meta_fields": ["model-id", "package"], "arrays": s["wire"]["arrays"]}


@slow
def test_rejection_and_duplicate_reach_the_client(server, models):
    """free-client's side of an acknowledgement: a rejection is exit 3 with the server's reason, a
    duplicate is accepted under its existing id; the server keeps serving."""
    # a client validates before sending: the truncated file never leaves without --no-verify
    local = run(BIN / "free-client", "submit", "--model", models["truncated"], "--server", server.address)
    assert local.returncode == 1 and "invalid package" in local.stderr
    before = server.status()
    r_trunc, r_dup = parallel([lambda: server.submit(models["truncated"], "--no-verify"),
                               lambda: server.submit(models["client0"])])
    assert r_trunc.returncode == 3, r_trunc.stderr
    assert "rejected by the server" in r_trunc.stderr and "missing tensor" in r_trunc.stderr
    assert r_dup.returncode == 0, r_dup.stderr
    from free_dfml.common.package import load_package
    assert r_dup.stdout.strip() == load_package(models["client0"]).model_id
    assert "already in the zoo" in r_dup.stderr
    st = server.status()
    assert st["running"]
    assert st["models"]["rejected"] == before["models"]["rejected"] + 1
    assert st["models"]["in_zoo"] == 6 and st["models"]["resubmissions"] == 1
    assert "missing tensor" in " | ".join(r["reason"] for r in st["rejected"])


@slow
def test_sigkill_then_resume_on_same_state(server, models):
    end = time.time() + 240           # a bound on a hang (the CPU is shared with the other test worker)
    while time.time() < end:
        ck = server.status()["training"].get("last_checkpoint") or {}
        if ck.get("iteration", 0) >= 2:
            break
        time.sleep(0.5)
    assert ck.get("iteration", 0) >= 2, f"no checkpoint at iteration 2 within the bound: {server.status()['training']}"
    ck_iter = ck["iteration"]
    zoo_before = sorted(p.name for p in (server.state / "zoo" / "models").glob("*.safetensors"))
    server.kill_all()
    end = time.time() + 10
    while time.time() < end and server_pids(server.state):
        time.sleep(0.2)
    assert not server_pids(server.state)
    # restart on the same folder (plain loopback this time)
    server.start(tls=False)
    zoo_after = sorted(p.name for p in (server.state / "zoo" / "models").glob("*.safetensors"))
    assert zoo_after == zoo_before
    end = time.time() + 180
    st = {}
    while time.time() < end:
        st = server.status()
        if st.get("training", {}).get("resumed") and st["training"]["iteration"] > 0:
            break
        time.sleep(0.5)
    assert st["training"]["resumed"] is True
    assert st["training"]["iteration"] >= ck_iter
    assert st["models"]["in_zoo"] == len(zoo_before) and st["models"]["accepted"] == len(zoo_before)
    assert "resumed from checkpoint" in (server.state / "logs" / "serverapp.log").read_text()
    # the restarted server still takes submissions
    r = server.submit(models["client1"])
    assert r.returncode == 0, r.stderr
    # a clean stop: checkpoint, and nothing left running
    pids = server_pids(server.state)
    stop = run(BIN / "free-server", "stop", "--state", server.state, timeout=240)
    assert stop.returncode == 0, stop.stderr
    time.sleep(1)
    assert not [p for p in pids if alive(p)]
    assert json.loads((server.state / "status.json").read_text())["phase"] == "stopped"
    # the meta-learner as a package, adaptation settings in its metadata
    out = server.state.parent / "meta.safetensors"
    exp = run(BIN / "free-server", "export", "--state", server.state, "--out", out)
    assert exp.returncode == 0, exp.stderr
    from free_dfml.common.package import load_package
    meta = load_package(out).meta
    assert meta.num_classes == 5 and {"adapt_steps", "inner_lr", "way"} <= set(meta.training)
