"""The federation end to end, with real processes on loopback (CPU).

One FREE server (``free-server start``: flower-superlink + the FREE ServerApp via ``flwr run``,
TLS with certificates generated here) takes submissions from ``free-client submit`` processes
(each a flower-supernode + ClientApp). Covered: six clients submitting at once all acknowledged
with their ids over TLS (none lost, none stored twice); what
crossed Flower's wire was only the weights + metadata records; a rejection and a duplicate reach
``free-client`` as its exit code and message; SIGKILL of every server process, restart on the
same state folder: zoo intact, training resumed from the checkpoint, new submissions accepted
(without TLS this time); a clean stop leaves no process behind; node authentication; ``submit``
without a server.

The service's logic (checks, rejections, duplicates, DP metadata, nodes that leave, a stalled
SuperLink, stop) is tested in process over a fake grid in tests/test_service.py; ``free-sim`` on
Flower's simulation engine in tests/test_study.py.

Ports come from binding port 0. Every process started here is stopped in a finalizer.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
slow = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost / 127.0.0.1 (Python cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "free-dfml test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                                     serialization.NoEncryption()))
    return d / "server.pem", d / "server.key", d / "ca.pem"


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def server_pids(state: Path) -> list[int]:
    """Every process of the server on ``state``: supervisor, superlink, superexec, serverapp."""
    rec = json.loads((state / "server.json").read_text()) if (state / "server.json").exists() else {}
    st = json.loads((state / "status.json").read_text()) if (state / "status.json").exists() else {}
    pids = [rec.get("pid"), rec.get("superlink_pid"), st.get("serverapp_pid")]
    todo = [p for p in pids if p]
    seen: list[int] = []
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += children(p)
    return [p for p in seen if alive(p)]


class Server:
    def __init__(self, state: Path, tls: tuple[Path, Path, Path] | None, log: Path):
        self.state, self.tls, self.port = state, tls, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, tls: bool = True) -> None:
        cmd = [str(BIN / "free-server"), "start", "--state", str(self.state), "--address", self.address,
               "--preset", "tiny", "--checkpoint-every", "2", "--threads", "1", "--device", "cpu"]
        if tls and self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1]), "--tls-ca", str(self.tls[2])]
        cmd += getattr(self, "start_args", [])
        self.with_tls = bool(tls and self.tls)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        end = time.time() + 180
        while time.time() < end:
            rec = json.loads((self.state / "server.json").read_text()) if (self.state / "server.json").exists() else {}
            if rec.get("pid") == self.proc.pid and rec.get("phase") == "running":
                return
            assert self.proc.poll() is None, f"free-server exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.3)
        raise AssertionError(f"free-server did not come up: {self.log.read_text()[-2000:]}")

    def submit(self, model: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
        cert = ["--root-cert", str(self.tls[2])] if self.with_tls else []
        return run(BIN / "free-client", "submit", "--model", model, "--server", self.address, *cert,
                   "--timeout", str(timeout), *extra, timeout=timeout + 60)

    def status(self) -> dict:
        r = run(BIN / "free-server", "status", "--state", self.state, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def shutdown(self) -> None:
        """``free-server stop`` if the supervisor still runs, then SIGKILL anything left."""
        if self.proc is not None and self.proc.poll() is None:
            run(BIN / "free-server", "stop", "--state", self.state, timeout=240)
        self.kill_all()

    def kill_all(self) -> None:
        for p in server_pids(self.state):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def parallel(fns):
    with ThreadPoolExecutor(len(fns)) as ex:
        return [f.result() for f in [ex.submit(fn) for fn in fns]]


@pytest.fixture(scope="module")
def models(tmp_path_factory, fake_dataset):
    """Client packages trained on the synthetic data set: 3 plain; 3 random-initialised (extra1-3);
    plus a truncated file."""
    from benchmarks.reliability import make_models
    from free_dfml.client.train import TrainConfig, train_client
    from free_dfml.common.package import save_package
    d = tmp_path_factory.mktemp("models")
    out = {}
    for i in range(3):
        pkg, _ = train_client(fake_dataset, list(range(4 * i, 4 * i + 4)),
                              TrainConfig(epochs=2, arch_kwargs={"width": 8}, seed=i))
        save_package(pkg, d / f"client{i}.safetensors")
        out[f"client{i}"] = d / f"client{i}.safetensors"
    for i, (path, _) in enumerate(make_models(3, d, seed=5), start=1):
        out[f"extra{i}"] = path
    data = out["client0"].read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.safetensors"
    return out


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


@slow
def test_node_authentication(tmp_path, models):
    """--node-auth: a registered key gets in, an unknown client is refused at the door."""
    srv = Server(tmp_path / "state", make_certs(tmp_path / "certs"), tmp_path / "server.log")
    key = tmp_path / "alice"
    kg = run(BIN / "free-client", "keygen", "--out", key)
    assert kg.returncode == 0, kg.stderr
    assert (tmp_path / "alice.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    try:
        srv.start_args = ["--node-auth"]
        srv.start()
        reg = run(BIN / "free-server", "register-node", "--state", srv.state, "--key", tmp_path / "alice.pub")
        assert reg.returncode == 0, reg.stderr
        ok, refused = parallel([lambda: srv.submit(models["client2"], "--auth-key", str(key)),
                                lambda: srv.submit(models["client1"], timeout=60)])
        assert ok.returncode == 0, ok.stderr
        assert refused.returncode != 0 and "registered keys" in refused.stderr, refused.stderr
        assert srv.status()["models"]["in_zoo"] == 1
    finally:
        srv.shutdown()


@slow
def test_submit_times_out_cleanly_without_a_server(tmp_path, models):
    port = free_port()
    t0 = time.time()
    r = run(BIN / "free-client", "submit", "--model", models["client0"], "--server", f"127.0.0.1:{port}",
            "--timeout", "4", timeout=60)
    assert r.returncode == 4
    assert "no answer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 40
    leftovers = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}"], capture_output=True, text=True).stdout.split()
    assert not [p for p in leftovers if alive(int(p))]


def test_submit_sends_again_when_the_supernode_drops_its_message(tmp_path, monkeypatch):
    """free-client's retry, with a stand-in SuperNode: the first attempt logs Flower's "Failed to
    send message" (an HTTP error it never retries), the second one is acknowledged."""
    from free_dfml.client import submit as sub
    monkeypatch.setattr(sub, "BACKOFF_S", (0.1,))
    marker = tmp_path / "tried"
    script = ("import pathlib, sys, time\n"
              "ack, marker = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
              "if not marker.exists():\n"
              "    marker.write_text('1')\n"
              "    print('ERROR :      Failed to send message 1a2b: HTTP 500', flush=True)\n"
              "else:\n"
              "    print('INFO :      Sent successfully', flush=True)\n"
              "    ack.write_text('{\"accepted\": true, \"model-id\": \"x\"}')\n"
              "time.sleep(60)\n")
    said: list[str] = []
    t0 = time.time()
    doc = sub.submit_with_retries(lambda ack: [sys.executable, "-c", script, str(ack), str(marker)], tmp_path,
                                  tmp_path / "supernode.log", 60, say=said.append)
    assert doc == {"accepted": True, "model-id": "x"}
    assert len(said) == 1 and "attempt 1 failed" in said[0] and "Failed to send message" in said[0]
    assert time.time() - t0 < 20          # both stand-ins stopped at once, not waited for
