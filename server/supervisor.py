"""The process side of ``free-server start``: a Flower SuperLink and the FREE ServerApp on a state
folder, supervised until a stop.

:class:`Supervisor` starts ``flower-superlink`` (database in the state folder), writes the Flower app
(``STATE/app/pyproject.toml``, the settings as its run config) and a private Flower home
(``STATE/flwr-home``), submits the ServerApp with ``flwr run``, waits until its status says it
serves, then resubmits it if it exits on its own, and restarts the SuperLink (then resubmits) if
that exits (3 times in a row at most). On SIGTERM/SIGINT it writes
``stop.request``, waits for the ServerApp to checkpoint, and stops the SuperLink with every
descendant. ``server.json`` records pids, address and phase throughout.

The SuperLink keeps its state in memory (no SQLite file whose write lock concurrent uploads
contend for; what the server accepted is durable in the state folder's zoo, not in the SuperLink),
except with node authentication, whose registrations must survive a restart
(``STATE/superlink.db``). It is started so that it dies with the supervisor (Linux
``PR_SET_PDEATHSIG``; its SuperExec and the ServerApp watch their parents), and a start on a state
folder first stops what a killed server left there (pids in ``server.json``). A busy
``--address`` fails at once, naming the port. The SuperLink's output goes to
``logs/superlink.log``, rotated by size.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import logging.handlers
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from free_dfml.common.cli import CliError
from free_dfml.common.processes import cmdline, descendants, pid_alive, stop_process_tree, terminate, venv_env, venv_exe
from free_dfml.common.wire import CLIENTAPP_COMPONENT, SERVERAPP_COMPONENT
from free_dfml.server.settings import ServerSettings
from free_dfml.server.state import StateDir, atomic_write_json

APP_NAME = "free-dfml-server"
CONNECTION = "free-server"       # the `flwr` connection name in STATE/flwr-home/config.toml
MAX_RESUBMITS = 3                # in a row, each within HEALTHY_S of the last
HEALTHY_S = 120.0
STOP_WAIT_S = 180.0              # how long a stop waits for the ServerApp's checkpoint
IN_MEMORY_DB = ":flwr-in-memory:"  # flwr's name for an in-memory SuperLink state
LOG_BYTES = 10 * 2 ** 20         # logs/superlink.log rotates at this size, LOG_BACKUPS kept
LOG_BACKUPS = 3


def rotating_log(path: Path, max_bytes: int = LOG_BYTES, backups: int = LOG_BACKUPS) -> logging.Logger:
    """A logger writing bare lines to ``path``, rotated by size (``path.1`` ... ``path.N``)."""
    lg = logging.getLogger(f"free_dfml.file.{path}")
    if not lg.handlers:
        h = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg


def copy_lines(stream, path: Path) -> threading.Thread:
    """A daemon thread copying ``stream``'s lines (a child's stdout) to a size-rotated log file."""
    lg = rotating_log(path)

    def run() -> None:
        for raw in iter(stream.readline, b""):
            lg.info(raw.decode("utf-8", "replace").rstrip("\n"))
        stream.close()
    t = threading.Thread(target=run, name=f"log-{path.name}", daemon=True)
    t.start()
    return t


def check_port_free(host: str, port: int) -> None:
    """A CliError naming the port when ``host:port`` cannot be bound (another server holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as e:
            what = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise CliError(f"port {port} on {host} {what}: choose another --address", 1) from None


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the process that started it dies (Linux; elsewhere
    the next start's stale-process cleanup stops it)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_port(host: str, port: int, proc: subprocess.Popen | None, timeout: float) -> None:
    end = time.time() + timeout
    h = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise CliError(f"flower-superlink exited with code {proc.returncode} (see the log)", 1)
        try:
            with socket.create_connection((h, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise CliError(f"flower-superlink did not open {host}:{port} within {timeout:.0f} s", 1)


def write_app(app_dir: Path, run_config: dict[str, Any], *, name: str = APP_NAME,
              description: str = "FREE server app (generated)",
              note: str = "Generated by `free-server start`; rewritten on every start.") -> None:
    """A Flower app folder for ``flwr run``: the installed FREE ServerApp/ClientApp as its components
    (nothing to install), ``run_config`` as its config."""
    import tomli_w
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": name, "version": "1.0.0", "description": description,
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "free-dfml",
            "components": {"serverapp": SERVERAPP_COMPONENT, "clientapp": CLIENTAPP_COMPONENT},
            "config": run_config}}},
    }
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    (app_dir / "README.md").write_text(note + "\n")


def write_flwr_home(state: StateDir, control: str, ca: Path | None) -> None:
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{control}"']
    if ca is not None:
        lines.append(f'root-certificates = "{ca}"')
    else:
        lines.append("insecure = true")
    state.flwr_home.mkdir(parents=True, exist_ok=True)
    (state.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def cleanup_stale(state: StateDir) -> None:
    """Processes a crashed server left behind on this folder (recorded in server.json): stop them."""
    rec = state.read_server() or {}
    stale = []
    for key in ("superlink_pid", "serverapp_pid"):
        p = rec.get(key)
        if p and pid_alive(p) and ("flower" in cmdline(p) or "flwr" in cmdline(p)):
            stale += [p] + descendants(p)
    st = state.read_status() or {}
    p = st.get("serverapp_pid")
    if p and pid_alive(p) and "flwr" in cmdline(p):
        stale.append(p)
    if stale:
        terminate(sorted(set(stale)), timeout=30)


def submit_run(state: StateDir, env: dict[str, str], timeout: float = 60) -> int:
    """``flwr run STATE/app``; the run id it reports."""
    cmd = [venv_exe("flwr"), "run", str(state.app_dir), CONNECTION, "--format", "json"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CliError("`flwr run` did not answer in time", 1) from None
    out = r.stdout + r.stderr
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', out) or re.search(r"run (\d+)", out)
    if r.returncode != 0 or not m:
        last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise CliError(f"`flwr run` failed: {last[0].strip()}", 1)
    return int(m.group(1))


def log(state: StateDir, msg: str) -> None:
    """A line on stdout and in ``STATE/logs/server.log``."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}"
    print(line, flush=True)
    try:
        with open(state.logs_dir / "server.log", "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def start_detached(state: StateDir, argv: list[str], timeout: float) -> dict[str, Any]:
    """``free-server ARGV`` (a foreground ``start``) in its own session; its ``server.json`` record
    once it runs."""
    state.create()
    out = state.logs_dir / "server.out"
    proc = subprocess.Popen([sys.executable, "-m", "free_dfml.server.cli", *argv], stdout=open(out, "ab"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=venv_env())
    end = time.time() + timeout + 30
    while time.time() < end:
        if proc.poll() is not None:
            tail = out.read_text(errors="replace").strip().splitlines()[-1:]
            raise CliError(f"server exited during startup: {tail[0] if tail else proc.returncode}", 1)
        rec = state.read_server() or {}
        if rec.get("pid") == proc.pid and rec.get("phase") == "running":
            return rec
        time.sleep(0.3)
    raise CliError(f"server did not come up within {timeout:.0f} s (see {out})", 1)


class Supervisor:
    """A foreground FREE server on ``state``; :meth:`run` returns the exit code once it stopped."""

    def __init__(self, state: StateDir, settings: ServerSettings, host: str, port: int,
                 tls: list[Path | None], timeout: float, node_auth: bool = False):
        self.state, self.settings, self.host, self.port = state, settings, host, port
        self.tls, self.timeout, self.node_auth = tls, timeout, node_auth
        self.signal: int | None = None
        self.superlink: subprocess.Popen | None = None
        self.run_id: int | None = None
        self.env = venv_env({"FLWR_HOME": str(state.flwr_home)})
        self.record: dict[str, Any] = {}

    @property
    def secure(self) -> bool:
        return all(self.tls)

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signum

    @property
    def database(self) -> str:
        """In memory, unless node registrations must persist (node authentication)."""
        return str(self.state.database) if self.node_auth else IN_MEMORY_DB

    def superlink_command(self) -> list[str]:
        cmd = [venv_exe("flower-superlink"), "--disable-runtime-dependency-installation",
               "--database", self.database, "--host", self.host, "--port", str(self.port)]
        if self.secure:
            cmd += ["--ssl-certfile", str(self.tls[0]), "--ssl-keyfile", str(self.tls[1]),
                    "--ssl-ca-certfile", str(self.tls[2])]
        else:
            cmd += ["--insecure"]
        if self.node_auth:
            cmd += ["--enable-supernode-auth"]
        return cmd

    def _update(self, **kw: Any) -> None:
        self.record.update(kw)
        self.state.write_server(self.record)

    def run(self) -> int:
        state = self.state
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        cleanup_stale(state)
        try:
            check_port_free(self.host, self.port)
        except CliError as e:
            log(state, f"error: {e}")
            return e.code
        state.clear_stop()
        state.write_pid()
        atomic_write_json(state.config_path, self.settings.to_dict())
        write_app(state.app_dir, self.settings.to_run_config())
        control_host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        control = f"[{control_host}]:{self.port}" if ":" in control_host else f"{control_host}:{self.port}"
        write_flwr_home(state, control, self.tls[2])
        self.record = {"pid": os.getpid(), "address": f"{self.host}:{self.port}", "tls": self.secure,
                       "node_auth": bool(self.node_auth), "state": str(state.root), "started_at": time.time(),
                       "phase": "starting"}
        self._start_superlink()
        code = 0
        try:
            self._start_serverapp()
            code = self._supervise()
        except CliError as e:
            log(state, f"error: {e}")
            code = e.code
        finally:
            self._stop()
        return code

    def _start_superlink(self) -> None:
        self.superlink = subprocess.Popen(self.superlink_command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env, preexec_fn=die_with_parent)
        copy_lines(self.superlink.stdout, self.state.logs_dir / "superlink.log")     # size-rotated
        self._update(superlink_pid=self.superlink.pid)

    def _start_serverapp(self) -> None:
        """SuperLink port open, run submitted, the ServerApp's status written: the server is up."""
        state, superlink = self.state, self.superlink
        wait_port(self.host, self.port, superlink, self.timeout)
        self.run_id = submit_run(state, self.env)
        self._update(run_id=self.run_id)
        end = time.time() + self.timeout
        while time.time() < end and self.signal is None:
            st = state.read_status() or {}
            if st.get("run_id") == self.run_id and st.get("phase") in ("collecting", "training"):
                break
            if superlink.poll() is not None:
                raise CliError("flower-superlink exited during startup (see logs/superlink.log)", 1)
            time.sleep(0.3)
        else:
            if self.signal is None:
                raise CliError(f"the FREE ServerApp did not start within {self.timeout:.0f} s "
                               "(see logs/superlink.log and logs/serverapp.log)", 1)
        self._update(phase="running", serverapp_pid=(state.read_status() or {}).get("serverapp_pid"))
        log(state, f"FREE server running on {self.host}:{self.port} ({'TLS' if self.secure else 'insecure'}), "
                   f"run {self.run_id}, state {state.root}")

    def _supervise(self) -> int:
        """Until a signal: resubmit the ServerApp when it exits on its own (killed included), restart
        the SuperLink (and resubmit) when it exits; 1 when either keeps happening (more than
        ``MAX_RESUBMITS`` times with less than ``HEALTHY_S`` of service in between)."""
        state = self.state
        resubmits = 0
        resubmitted_at = 0.0
        while self.signal is None:
            if self.superlink.poll() is not None:
                code = self.superlink.returncode
                resubmits = 0 if time.time() - resubmitted_at > HEALTHY_S else resubmits + 1
                if resubmits > MAX_RESUBMITS:
                    log(state, f"flower-superlink keeps exiting (code {code}); stopping")
                    return 1
                log(state, f"flower-superlink exited with code {code}; starting it again")
                stop_process_tree(self.superlink, timeout=10)     # its SuperExec, if still there
                self._start_superlink()
                wait_port(self.host, self.port, self.superlink, self.timeout)
                self.run_id = submit_run(state, self.env)
                resubmitted_at = time.time()
                self._update(run_id=self.run_id)
                continue
            st = state.read_status() or {}
            sp = st.get("serverapp_pid")
            if st.get("run_id") != self.run_id and time.time() - resubmitted_at < self.timeout:
                time.sleep(0.5)       # the resubmitted ServerApp has not written its status yet
                continue
            # gone without a stop request: exited, crashed or killed (its phase may still say running)
            if sp and not pid_alive(sp) and not state.stop_requested():
                resubmits = 0 if time.time() - resubmitted_at > HEALTHY_S else resubmits + 1
                if resubmits > MAX_RESUBMITS:
                    log(state, "the ServerApp keeps exiting; stopping")
                    return 1
                log(state, "the ServerApp exited; submitting it again")
                self.run_id = submit_run(state, self.env)
                resubmitted_at = time.time()
                self._update(run_id=self.run_id)
            time.sleep(0.5)
        return 0

    def _stop(self) -> None:
        """Ask the ServerApp to checkpoint (stop.request), wait for it, stop the SuperLink tree."""
        state, superlink = self.state, self.superlink
        log(state, "stopping: asking the ServerApp to checkpoint")
        self._update(phase="stopping")
        state.request_stop()
        end = time.time() + STOP_WAIT_S
        while time.time() < end and superlink.poll() is None:
            st = state.read_status() or {}
            sp = st.get("serverapp_pid")
            if st.get("phase") in ("stopped", "finished") or (sp and not pid_alive(sp)) or not sp:
                break
            time.sleep(0.3)
        left = stop_process_tree(superlink, timeout=20)
        state.clear_stop()
        self._update(phase="stopped", stopped_at=time.time(), leftover_pids=left)
        try:
            if state.read_pid() == os.getpid():
                state.pid_path.unlink()
        except FileNotFoundError:
            pass
        log(state, "FREE server stopped" + (f" (processes still alive: {left})" if left else ""))
