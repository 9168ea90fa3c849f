"""The pieces of ``free-server start`` that need no Flower process (server/supervisor.py); the
lifecycle itself runs in tests/test_federation.py."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from free_dfml.common import wire
from free_dfml.common.cli import CliError
from free_dfml.common.processes import pid_alive
from free_dfml.server import supervisor
from free_dfml.server.settings import ServerSettings
from free_dfml.server.state import StateDir

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib


def test_app_folder_names_the_components_and_carries_the_settings(tmp_path):
    settings = ServerSettings(state_dir=str(tmp_path), preset="tiny", free_config={"learner": {"width": 8}},
                              max_iterations=7, supervisor_pid=123)
    supervisor.write_app(tmp_path / "app", settings.to_run_config())
    doc = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    app = doc["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": wire.SERVERAPP_COMPONENT, "clientapp": wire.CLIENTAPP_COMPONENT}
    assert ServerSettings.from_run_config(app["config"]) == settings     # what the ServerApp reads back
    assert doc["project"]["name"] == supervisor.APP_NAME


def test_flower_home_and_superlink_command(tmp_path):
    state = StateDir(tmp_path / "state").create()
    supervisor.write_flwr_home(state, "127.0.0.1:9092", None)
    conf = tomllib.loads((state.flwr_home / "config.toml").read_text())
    assert conf["superlink"]["default"] == supervisor.CONNECTION
    assert conf["superlink"][supervisor.CONNECTION] == {"address": "127.0.0.1:9092", "insecure": True}
    ca = tmp_path / "ca.pem"
    supervisor.write_flwr_home(state, "127.0.0.1:9092", ca)
    assert tomllib.loads((state.flwr_home / "config.toml").read_text())["superlink"][supervisor.CONNECTION] == {
        "address": "127.0.0.1:9092", "root-certificates": str(ca)}
    plain = supervisor.Supervisor(state, ServerSettings(), "127.0.0.1", 9092, [None] * 3, 5).superlink_command()
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain
    # in memory (no SQLite lock for concurrent uploads to contend for) ...
    assert plain[plain.index("--database") + 1] == supervisor.IN_MEMORY_DB
    tls = [tmp_path / "c.pem", tmp_path / "k.pem", ca]
    cmd = supervisor.Supervisor(state, ServerSettings(), "0.0.0.0", 9092, tls, 5, node_auth=True).superlink_command()
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(ca) and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--database") + 1] == str(state.database)    # ... registrations persist


def test_wait_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        supervisor.wait_port("127.0.0.1", s.getsockname()[1], None, timeout=5)
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    with pytest.raises(CliError, match="exited with code 3"):
        supervisor.wait_port("127.0.0.1", 9, gone, timeout=5)


def test_stale_cleanup_leaves_processes_that_are_not_flower(tmp_path):
    state = StateDir(tmp_path / "state").create()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        state.write_server({"superlink_pid": other.pid, "serverapp_pid": other.pid})
        supervisor.cleanup_stale(state)
        assert pid_alive(other.pid)
    finally:
        other.kill()
        other.wait()


def test_busy_port_fails_at_once_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CliError, match=f"port {port} on 127.0.0.1 is already in use"):
            supervisor.check_port_free("127.0.0.1", port)
    supervisor.check_port_free("127.0.0.1", port)       # free again


def test_children_die_with_the_supervisor_and_stale_ones_are_stopped(tmp_path):
    """A child started with die_with_parent goes when its parent is SIGKILLed; a process a killed
    server left (its pid in server.json, a Flower command line) is stopped by the next start."""
    import os
    import signal
    import time
    code = ("import subprocess, sys, time\n"
            "from free_dfml.server.supervisor import die_with_parent\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=die_with_parent)\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert pid_alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    end = time.time() + 10
    while time.time() < end and pid_alive(child):
        time.sleep(0.1)
    assert not pid_alive(child)
    state = StateDir(tmp_path / "state").create()
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flower-superlink"])
    try:
        state.write_server({"superlink_pid": stale.pid})
        supervisor.cleanup_stale(state)
        assert stale.wait(5) is not None
    finally:
        stale.kill()


def test_superlink_log_rotates_by_size(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "for i in range(3000): print('x' * 99)"], stdout=subprocess.PIPE)
    supervisor.rotating_log(tmp_path / "s.log", max_bytes=100_000, backups=2)
    supervisor.copy_lines(proc.stdout, tmp_path / "s.log").join(30)
    proc.wait()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["s.log", "s.log.1", "s.log.2"]
    assert all(p.stat().st_size <= 100_000 for p in tmp_path.iterdir())
