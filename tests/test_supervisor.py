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
from free_dfml.server import logs, supervisor
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
    logs.rotating_log(tmp_path / "s.log", max_bytes=100_000, backups=2)
    logs.copy_lines(proc.stdout, tmp_path / "s.log").join(30)
    proc.wait()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["s.log", "s.log.1", "s.log.2"]
    assert all(p.stat().st_size <= 100_000 for p in tmp_path.iterdir())


STUB_SERVERAPP = """
import sys, time
from free_dfml.server.liveness import Liveness
from free_dfml.server.state import StateDir, atomic_write_json
state, run_id = StateDir(sys.argv[1]), int(sys.argv[2])
Liveness(state, run_id).beat()
atomic_write_json(state.status_path, {"run_id": run_id, "serverapp_pid": __import__("os").getpid(),
                                      "phase": "collecting", "started_at": time.time(),
                                      "link": {"last_error": "RuntimeError: Runtime task-token authentication failed."}})
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """A Supervisor on a stub SuperLink (a sleeping process) whose submissions start a stub ServerApp
    (a process that marks progress once, then never again); ``subs`` lists the run ids submitted."""
    import os
    state = StateDir(tmp_path / "state").create()
    procs, subs = [], []

    def serverapp(run_id: int) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", STUB_SERVERAPP, str(state.root), str(run_id)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
        return p

    def submit(st, env, timeout=60):
        subs.append(len(subs) + 2)
        serverapp(subs[-1])
        return subs[-1]
    monkeypatch.setattr(supervisor, "submit_run", submit)
    sup = supervisor.Supervisor(state, ServerSettings(state_dir=str(state.root), lost_after=5.0), "127.0.0.1", 9,
                                [None] * 3, timeout=5)
    sup.superlink = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sup.run_id = 1
    sup.record = {"pid": os.getpid(), "phase": "running"}
    first = serverapp(1)
    yield sup, state, first, subs
    for p in procs + [sup.superlink]:
        p.kill()
        p.wait()


def test_a_serverapp_without_progress_is_stopped_and_its_run_submitted_again(stubbed, capsys):
    """The lost-run check: a live ServerApp (frozen here, SIGSTOP) whose last progress is older
    than lost-after is stopped and the run resubmitted, the event (time, reason) recorded in
    server.json and shown by `free-server status`; a fresh one is left alone."""
    import os
    import signal
    import time

    from free_dfml.common.cli import run_cli
    from free_dfml.server.cli import app as server_cli
    from free_dfml.server.liveness import ALIVE_FILE
    sup, state, first, subs = stubbed
    assert sup.check() is None and subs == [] and first.poll() is None       # progress 0 s ago
    os.kill(first.pid, signal.SIGSTOP)
    old = time.time() - 100
    os.utime(state.root / ALIVE_FILE, (old, old))
    state.write_pid(sup.record["pid"])
    state.write_server({**sup.record, "run_id": 1})
    assert run_cli(server_cli, "free-server", ["status", "--state", str(state.root)]) == 0
    assert "the ServerApp has made none for 10" in capsys.readouterr().out    # said before it is acted on
    t0 = time.time()
    assert sup.check() is None
    assert time.time() - t0 < 3                 # SIGCONT + SIGTERM: no wait for the SIGKILL fallback
    assert first.wait(5) is not None and subs == [2] and sup.run_id == 2
    rec = state.read_server()
    assert rec["run_id"] == 2 and rec["phase"] == "running" and rec["recovery_count"] == 1
    (ev,) = rec["recoveries"]
    assert ev["run_id"] == 1 and ev["new_run_id"] == 2 and abs(ev["time"] - t0) < 5
    assert ev["reason"].startswith("the ServerApp made no progress for 10") and "lost-after 5 s" in ev["reason"]
    assert "task-token authentication failed" in ev["reason"]
    assert sup.check() is None and subs == [2]               # the new ServerApp made progress just now
    assert run_cli(server_cli, "free-server", ["status", "--state", str(state.root)]) == 0
    out = capsys.readouterr().out
    assert "run 1 -> 2: the ServerApp made no progress for 10" in out and "1 recovery since the server started" in out
    assert "has made none" not in out


def test_an_exited_serverapp_or_failed_resubmission_recovers_and_a_loop_of_them_stops(stubbed, monkeypatch):
    """A ServerApp that exited is resubmitted (the reason names the SuperLink's refusal of its runtime
    token when superlink.log has one since the run started); a resubmission that fails restarts the
    SuperLink and tries once more; past MAX_RESUBMITS quick recoveries the supervisor gives up (exit 1); the
    record keeps only the last RECOVERIES_KEEP events."""
    from free_dfml.server import liveness
    sup, state, first, subs = stubbed
    first.kill()
    first.wait()
    restarts = []
    monkeypatch.setattr(sup, "_restart_superlink", lambda: restarts.append(1))
    submit = supervisor.submit_run
    calls = {"n": 0}

    def failing_once(st, env, timeout=60):
        calls["n"] += 1
        if calls["n"] == 1:
            raise CliError("`flwr run` did not answer in time", 1)
        return submit(st, env, timeout)
    monkeypatch.setattr(supervisor, "submit_run", failing_once)
    assert sup.check() is None
    assert restarts == [1] and subs == [2] and sup.run_id == 2
    assert state.read_server()["recoveries"][-1]["reason"] == \
        "the ServerApp exited (phase collecting) (see logs/serverapp.log)"
    with open(sup.superlink_log, "a") as f:        # what flower-superlink logs when a run's token expired
        f.write("ERROR :     [/v1/runtime/get-nodes][ApiError:1008] Runtime task-token authentication failed.\n")
    supervisor.terminate([state.read_status()["serverapp_pid"]], timeout=5)
    assert sup.check() is None and sup.run_id == 3
    assert state.read_server()["recoveries"][-1]["reason"] == ("the ServerApp exited (phase collecting) after the "
                                                               "SuperLink refused its runtime token (its run failed)")
    monkeypatch.setattr(liveness, "RECOVERIES_KEEP", 2)
    for _ in range(supervisor.MAX_RESUBMITS - 1):
        st = state.read_status()
        supervisor.terminate([st["serverapp_pid"]], timeout=5)
        assert sup.check() is None
    supervisor.terminate([state.read_status()["serverapp_pid"]], timeout=5)
    assert sup.check() == 1                                  # it keeps happening: give up
    rec = state.read_server()
    assert rec["recovery_count"] == supervisor.MAX_RESUBMITS + 2 and len(rec["recoveries"]) == 2


def test_lost_after_zero_never_resubmits(stubbed):
    import os
    import time
    from free_dfml.server.liveness import ALIVE_FILE
    sup, state, first, subs = stubbed
    sup.settings.lost_after = 0
    old = time.time() - 1000
    os.utime(state.root / ALIVE_FILE, (old, old))
    assert sup.check() is None and subs == [] and first.poll() is None
