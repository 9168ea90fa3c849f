"""``free-client submit`` against real processes on loopback: node authentication (a registered
key gets in, an unknown client is refused), no server (a clean timeout, nothing left running), and
the retry when Flower's SuperNode drops a message (a stand-in SuperNode). Helpers:
tests/loopback.py; the federation with one long-running server: tests/test_federation.py.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from loopback import BIN, Server, alive, client_models, free_port, make_certs, parallel, run

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory, fake_dataset):
    return client_models(tmp_path_factory.mktemp("models"), fake_dataset)


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
