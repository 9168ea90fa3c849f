"""The federation end to end, with real processes on loopback (CPU).

One FREE server (``free-server start``: flower-superlink + the FREE ServerApp via ``flwr run``,
TLS with certificates generated here) takes submissions from ``free-client submit`` processes
(each a flower-supernode + ClientApp). Covered: three clients accepted with ids; what crossed the
wire was only the weights + metadata records; a truncated file and a NaN-weight model rejected
with their reasons while the server keeps serving; an identical model stored once; a DP-trained
model accepted with its epsilon in the status while FREE trains on a zoo mixing DP and non-DP
teachers; SIGKILL of every server process, restart on the same state folder: zoo intact, training
resumed from the checkpoint, new submissions accepted (without TLS this time); a clean stop leaves
no process behind; a SuperLink that stops answering leaves status.json live and stop prompt;
``free-sim`` with 4 clients writes its artefacts.

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
    """Client packages trained on the synthetic data set: 3 plain, 1 DP; plus a truncated and a NaN file."""
    from safetensors.torch import save_file

    from free_dfml.client.train import TrainConfig, train_client
    from free_dfml.common.package import save_package
    d = tmp_path_factory.mktemp("models")
    out = {}
    for i in range(3):
        pkg, _ = train_client(fake_dataset, list(range(4 * i, 4 * i + 4)),
                              TrainConfig(epochs=2, arch_kwargs={"width": 8}, seed=i))
        save_package(pkg, d / f"client{i}.safetensors")
        out[f"client{i}"] = d / f"client{i}.safetensors"
    pkg, _ = train_client(fake_dataset, list(range(12, 16)),
                          TrainConfig(epochs=1, arch_kwargs={"width": 8}, seed=7, dp_epsilon=0.5,
                                      dp_delta=1e-4, max_grad_norm=1.0))
    assert pkg.meta.dp is not None and pkg.meta.arch_kwargs["norm"] == "gn"
    save_package(pkg, d / "dp.safetensors")
    out["dp"] = d / "dp.safetensors"
    data = out["client0"].read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.safetensors"
    bad, _ = train_client(fake_dataset, list(range(16, 20)), TrainConfig(epochs=1, arch_kwargs={"width": 8}, seed=9))
    state = {k: v.clone() for k, v in bad.state.items()}
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(d / "nan.safetensors"), metadata={"free_dfml": bad.meta.to_json()})
    out["nan"] = d / "nan.safetensors"
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    srv = Server(d / "state", make_certs(d / "certs"), d / "server.log")
    srv.start()
    yield srv
    srv.shutdown()


@slow
def test_three_clients_accepted_over_tls(server, models):
    t0 = time.time()
    results = parallel([lambda m=models[f"client{i}"]: server.submit(m) for i in range(3)])
    for r in results:
        assert r.returncode == 0, r.stderr
    ids = [r.stdout.strip().splitlines()[-1] for r in results]
    assert all(len(i) == 64 for i in ids) and len(set(ids)) == 3
    from free_dfml.common.package import load_package
    assert ids == [load_package(models[f"client{i}"]).model_id for i in range(3)]
    st = server.status()
    assert st["running"] and st["server"]["tls"]
    assert st["models"]["accepted"] == 3 and st["models"]["in_zoo"] == 3
    assert sorted(a["id"] for a in st["accepted"]) == sorted(ids)
    human = run(BIN / "free-server", "status", "--state", server.state)
    assert "3 accepted" in human.stdout
    print(f"three TLS submissions in parallel: {time.time() - t0:.1f} s")


@slow
def test_only_weights_and_metadata_cross_the_wire(server, models):
    """What the ServerApp received from each ClientApp (logged from the received Message content)."""
    subs = [json.loads(ln) for ln in (server.state / "submissions.jsonl").read_text().splitlines()]
    accepted = [s for s in subs if s["event"] == "accepted"]
    assert len(accepted) >= 3
    for s in accepted:
        assert s["wire"] == {"array_records": ["model"], "config_records": ["meta"], "metric_records": [],
                             "meta_fields": ["model-id", "package"], "arrays": s["wire"]["arrays"]}
    # and the encoder itself
    from free_dfml.client.client_app import package_to_content
    from free_dfml.common.package import load_package
    content = package_to_content(load_package(models["client0"]))
    assert set(content.keys()) == {"model", "meta"}
    assert set(content.config_records["meta"].keys()) == {"package", "model-id"}
    assert not content.metric_records


@slow
def test_bad_models_rejected_duplicate_stored_once_dp_accepted(server, models):
    # a client validates before sending: the truncated file never leaves without --no-verify
    local = run(BIN / "free-client", "submit", "--model", models["truncated"], "--server", server.address)
    assert local.returncode == 1 and "invalid package" in local.stderr
    before = server.status()
    r_trunc, r_nan, r_dup, r_dp = parallel([
        lambda: server.submit(models["truncated"], "--no-verify"),
        lambda: server.submit(models["nan"], "--no-verify"),
        lambda: server.submit(models["client0"]),
        lambda: server.submit(models["dp"]),
    ])
    assert r_trunc.returncode == 3, r_trunc.stderr
    assert "rejected by the server" in r_trunc.stderr and "missing tensor" in r_trunc.stderr
    assert r_nan.returncode == 3, r_nan.stderr
    assert "non-finite" in r_nan.stderr
    assert r_dup.returncode == 0, r_dup.stderr
    from free_dfml.common.package import load_package
    assert r_dup.stdout.strip() == load_package(models["client0"]).model_id
    assert "already in the zoo" in r_dup.stderr
    assert r_dp.returncode == 0, r_dp.stderr
    st = server.status()
    assert st["running"]                                   # still serving
    assert st["models"]["rejected"] == before["models"]["rejected"] + 2
    assert st["models"]["in_zoo"] == 4                     # 3 + DP; the duplicate stored once
    assert st["models"]["resubmissions"] == 1
    assert len(list((server.state / "zoo" / "models").glob("*.safetensors"))) == 4
    reasons = " | ".join(r["reason"] for r in st["rejected"])
    assert "missing tensor" in reasons and "non-finite" in reasons
    dp_meta = load_package(models["dp"]).meta.dp
    assert st["dp_epsilons"] == [pytest.approx(dp_meta["epsilon"])]
    assert "DP epsilon" in run(BIN / "free-server", "status", "--state", server.state).stdout
    # FREE keeps training on the mixed DP / non-DP zoo
    it0 = st["training"]["iteration"]
    end = time.time() + 60
    while time.time() < end:
        st = server.status()
        if st["training"]["iteration"] >= it0 + 4:
            break
        time.sleep(1)
    assert st["training"]["error"] is None
    assert st["training"]["iteration"] >= it0 + 4
    assert st["training"]["last_metrics"]["zoo_size"] == 4


@slow
def test_sigkill_then_resume_on_same_state(server, models):
    end = time.time() + 60
    while time.time() < end:
        ck = server.status()["training"].get("last_checkpoint") or {}
        if ck.get("iteration", 0) >= 2:
            break
        time.sleep(0.5)
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
    end = time.time() + 60
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
def test_stalled_superlink_status_stays_live_and_stop_checkpoints(tmp_path, models):
    """The SuperLink stops answering (SIGSTOP): FREE keeps training and status.json keeps saying so;
    `free-server stop` checkpoints that training without waiting for the SuperLink."""
    srv = Server(tmp_path / "state", None, tmp_path / "server.log")
    srv.start(tls=False)
    superlink = json.loads((srv.state / "server.json").read_text())["superlink_pid"]
    try:
        r = srv.submit(models["client0"])
        assert r.returncode == 0, r.stderr
        end = time.time() + 90
        while time.time() < end and srv.status()["training"].get("iteration", 0) < 1:
            time.sleep(0.5)
        os.kill(superlink, signal.SIGSTOP)
        stalled_at = srv.status()["training"]["iteration"]
        end = time.time() + 90
        while time.time() < end:
            st = srv.status()
            if st["link"]["stalled_s"] and st["training"]["iteration"] >= stalled_at + 2:
                break
            time.sleep(1)
        assert st["link"]["stalled_s"] >= 5, st["link"]
        assert st["training"]["iteration"] >= stalled_at + 2      # status.json still follows training
        assert st["phase"] == "training" and st["running"]
        assert "SuperLink has not answered" in run(BIN / "free-server", "status", "--state", srv.state).stdout
        stop = run(BIN / "free-server", "stop", "--state", srv.state, "--timeout", "100", timeout=160)
        assert stop.returncode == 0, stop.stderr
        final = json.loads((srv.state / "status.json").read_text())
        assert final["phase"] == "stopped"
        ck = json.loads((srv.state / "checkpoints" / "checkpoint.json").read_text())
        assert ck["iteration"] == final["training"]["iteration"] >= st["training"]["iteration"]
        assert "stop requested while waiting on the SuperLink" in (srv.state / "logs" / "serverapp.log").read_text()
        time.sleep(1)
        assert not server_pids(srv.state)
    finally:
        try:
            os.kill(superlink, signal.SIGCONT)
        except ProcessLookupError:
            pass
        srv.kill_all()


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


@slow
def test_free_sim_four_clients(tmp_path):
    out = tmp_path / "sim"
    t0 = time.time()
    r = run(BIN / "free-sim", "run", "--clients", "4", "--preset", "tiny", "--iterations", "2", "--episodes", "3",
            "--out", out, timeout=900)   # a bound on a hang, not a speed check (it once ran past 420 s
    # on two cores shared with a benchmark)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("metrics.jsonl", "results.json", "results.md", "accuracy.png", "recovered.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert doc["clients"]["accepted"] == 4 and doc["zoo_size"] == 4
    assert doc["free_iterations"] == 2
    assert set(doc["results"]) >= {"free", "random", "average"}
    assert set(doc["results"]["free"]) == {"1shot", "5shot"}
    events = [json.loads(ln)["event"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("submission") == 4 and "iteration" in events and "eval" in events
    print(f"free-sim 4 clients: {time.time() - t0:.1f} s")


def test_wire_checks_in_process(fake_dataset):
    """The ServerApp's checks on a reply's content (no processes: RecordDicts built here)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from free_dfml.client.client_app import package_to_content
    from free_dfml.client.train import TrainConfig, train_client
    from free_dfml.common.package import PackageError
    from free_dfml.server.server_app import content_to_package
    pkg, _ = train_client(fake_dataset, [0, 1, 2], TrainConfig(epochs=1, arch_kwargs={"width": 4}))
    good = package_to_content(pkg)
    assert content_to_package(good).model_id == pkg.model_id
    size = sum(len(a.data) for a in good.array_records["model"].values())
    with pytest.raises(PackageError, match="over the"):
        content_to_package(good, max_bytes=size // 2)              # payload cap
    extra = package_to_content(pkg)
    extra["stats"] = MetricRecord({"loss": 0.1})
    with pytest.raises(PackageError, match="exactly"):
        content_to_package(extra)                                    # nothing but weights + metadata
    more = package_to_content(pkg)
    more.config_records["meta"]["note"] = "hi"
    with pytest.raises(PackageError, match="unexpected metadata"):
        content_to_package(more)
    wrong_id = package_to_content(pkg)
    wrong_id.config_records["meta"]["model-id"] = "0" * 64
    with pytest.raises(PackageError, match="model-id"):
        content_to_package(wrong_id)
    f64 = package_to_content(pkg)
    k = sorted(f64.array_records["model"])[0]
    f64.array_records["model"][k] = Array(pkg.state[k].double().numpy())
    with pytest.raises(PackageError, match="float32"):
        content_to_package(f64)
    bad_meta = package_to_content(pkg)
    bad_meta.config_records["meta"]["package"] = "{not json"
    with pytest.raises(PackageError, match="JSON"):
        content_to_package(bad_meta)
    shape = package_to_content(pkg)
    shape.array_records["model"][k] = Array(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(PackageError, match="shape"):
        content_to_package(shape)
    assert isinstance(good, RecordDict) and isinstance(good.array_records["model"], ArrayRecord)
    assert isinstance(good.config_records["meta"], ConfigRecord)


def test_shutdown_from_two_threads_waits_for_the_checkpoint_and_tolerates_reentry(tmp_path, monkeypatch):
    """The watchdog and the main loop may both call shutdown(): the second caller returns only once
    the first has stopped training and written the final status. flwr's SIGTERM handler runs in the
    main thread and may interrupt a shutdown() already running there: that call returns at once."""
    import threading

    from free_dfml.server.server_app import FreeServer, ServerSettings

    srv = FreeServer(None, ServerSettings(state_dir=str(tmp_path / "state"), train=False))
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
    assert json.loads((tmp_path / "state" / "status.json").read_text())["phase"] == "stopped"
    first.join(5)
    assert not first.is_alive()
