"""Real servers and clients on loopback for the end-to-end tests (tests/test_federation.py,
tests/test_submit.py): free ports, TLS certificates made here, a ``free-server start`` process with
its status and process tree, ``free-client submit`` runs, and the client packages they submit.
Every process a test starts is stopped in its finalizer."""

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

BIN = Path(sys.executable).parent


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


def client_models(d: Path, dataset) -> dict[str, Path]:
    """Client packages trained on the synthetic data set: 3 plain (client0-2); 3 random-initialised
    (extra1-3); plus a truncated file."""
    from benchmarks.reliability import make_models
    from free_dfml.client.train import TrainConfig, train_client
    from free_dfml.common.package import save_package
    out = {}
    for i in range(3):
        pkg, _ = train_client(dataset, list(range(4 * i, 4 * i + 4)),
                              TrainConfig(epochs=2, arch_kwargs={"width": 8}, seed=i))
        save_package(pkg, d / f"client{i}.safetensors")
        out[f"client{i}"] = d / f"client{i}.safetensors"
    for i, (path, _) in enumerate(make_models(3, d, seed=5), start=1):
        out[f"extra{i}"] = path
    data = out["client0"].read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.safetensors"
    return out
