"""The process side of ``free-client submit``: a SuperNode whose ClientApp answers the server's query
with the package, until the acknowledgement arrives, retried when an attempt fails on the way.

An attempt starts ``python -m free_dfml.client.supernode`` (flower-supernode with a short idle
poll) and waits for the acknowledgement file its ClientApp writes. It is given up, the SuperNode
tree stopped, and a new attempt started after a short backoff, when the SuperNode reports that
it could not send the reply or receive the query (Flower drops such a message and never retries
it: an HTTP error of an overloaded SuperLink), or when the reply went out but no acknowledgement
came for ``ACK_WAIT_S``. Resending is safe: the server stores a model under its content id, so a
model that did arrive the first time is acknowledged as already in the zoo. Everything is
bounded by the caller's ``timeout``.

The package is validated in a child process (:func:`start_validation`: torch is imported there
and gone with it, so a waiting client holds none of it in memory) before the first SuperNode
starts; the ClientApp sends nothing until the command has written the validated id to the node's
``ready-path`` file (:func:`write_ready`). The SuperNode starts only once the package passed: a
node that joined and was asked before that could, on a loaded machine, wait long enough to miss
Flower's heartbeats.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from free_dfml.common.cli import CliError
from free_dfml.common.processes import stop_process_tree, venv_env

# SuperNode log lines after which the message is gone for this SuperNode
TRANSIENT = ("Failed to send message", "Failed to receive message", "Failed to push", "Failed to pull")
SENT = "Sent successfully"
ACK_WAIT_S = 60.0          # reply sent, no acknowledgement this long: send again
BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
STOP_WAIT_S = 3.0          # SIGTERM, then SIGKILL after this long


@dataclass
class Attempt:
    """What one SuperNode run ended with: ``ack`` (the document), or why it was given up."""
    ack: dict | None = None
    retry: str | None = None


def last_error(text: str) -> str:
    """The SuperNode log's most telling error line (Flower's exit report, else the last ERROR)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):     # Flower's exit report: "ERROR : Exit Code: N" + an explanation line
        if "Exit Code:" in ln and i + 1 < len(lines):
            return f"{ln.split('ERROR')[-1].strip(' :')}: {lines[i + 1]}"[:300]
    errs = [ln for ln in lines if "ERROR" in ln or "Error" in ln]
    return (errs or lines or [""])[-1][:300]


def transient_failure(text: str) -> str | None:
    """The SuperNode log line that says a message was dropped, if any."""
    for ln in text.splitlines():
        if any(t in ln for t in TRANSIENT):
            return re.sub(r"\x1b\[[0-9;]*m", "", ln).strip()[:300]
    return None


def start_validation(model: Path) -> subprocess.Popen:
    """``python -m free_dfml.client.submit --validate FILE`` in the background (see :func:`validate_main`)."""
    return subprocess.Popen([sys.executable, "-m", "free_dfml.client.submit", "--validate", str(model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def validation_result(proc: subprocess.Popen) -> dict | None:
    """None while the validation runs; then ``{"id": ...}`` or ``{"error": ...}``."""
    if proc.poll() is None:
        return None
    out, err = proc.communicate()
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"validation failed: {(err.strip().splitlines() or ['no output'])[-1][:300]}"}


def write_ready(path: Path, model_id: str) -> None:
    """Tell the ClientApp that the package was validated, and its id."""
    from free_dfml.common.files import atomic_write_bytes
    atomic_write_bytes(path, json.dumps({"model-id": model_id}).encode())


def validate_main(path: str) -> int:
    from free_dfml.common.package import PackageError, load_package
    try:
        doc = {"id": load_package(path).model_id}
    except PackageError as e:
        doc = {"error": str(e)}
    print(json.dumps(doc), flush=True)
    return 0


def run_attempt(cmd: list[str], ack: Path, log_path: Path, env: dict, cwd: str, end: float,
                ack_wait: float = ACK_WAIT_S, gate=None) -> Attempt:
    """One SuperNode until the acknowledgement, a dropped message, or ``end``; stopped as a tree.
    ``gate()`` is called on every turn until it returns True (it may raise to give up)."""
    with open(log_path, "ab") as log:
        start = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    sent_at = None
    done = False
    try:
        while time.time() < end:
            if gate is not None and gate():
                gate = None
            if ack.exists():
                try:
                    doc = json.loads(ack.read_text())
                    done = True
                    return Attempt(ack=doc)
                except json.JSONDecodeError:
                    pass            # written atomically; a partial read is retried
            text = _read_from(log_path, start)
            bad = transient_failure(text)
            if bad:
                return Attempt(retry=bad)
            if sent_at is None and SENT in text:
                sent_at = time.time()
            if sent_at is not None and time.time() - sent_at > ack_wait:
                return Attempt(retry=f"no acknowledgement {ack_wait:.0f} s after the reply was sent")
            if proc.poll() is not None:
                tail = last_error(text)
                hint = (" (a server with node authentication accepts only registered keys: "
                        "--auth-key, free-server register-node)" if "Exit Code: 305" in tail else "")
                raise CliError(f"flower-supernode exited with code {proc.returncode}"
                               + (f": {tail}" if tail else "") + hint, 1)
            time.sleep(0.1)
        return Attempt()
    finally:
        # acknowledged: nothing left to wait for (the server does not need the ack's empty reply),
        # so no graceful exit either
        left = stop_process_tree(proc, timeout=0.3 if done else STOP_WAIT_S)
        if left:
            print(f"free-client: warning: SuperNode processes still alive: {left}", file=sys.stderr)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def submit_with_retries(cmd_for, workdir: Path, log_path: Path, timeout: float, gate=None,
                        say=lambda s: print(s, file=sys.stderr)) -> dict | None:
    """Attempts until an acknowledgement (its document) or ``timeout`` (None). ``cmd_for(ack_path)``
    gives the SuperNode command of an attempt; ``gate`` as in :func:`run_attempt`, for every attempt."""
    end = time.time() + timeout
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL: how often the SuperExec looks for a message to start a
    # ClientApp for (Flower's default 1 s)
    env = venv_env({"FLWR_HOME": str(workdir / "flwr-home"), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
    n = 0
    while time.time() < end:
        ack = workdir / f"ack{n}.json"
        res = run_attempt(cmd_for(ack), ack, log_path, env, str(workdir), end, gate=gate)
        if res.ack is not None:
            return res.ack
        if res.retry is None:
            return None                     # out of time
        pause = BACKOFF_S[min(n, len(BACKOFF_S) - 1)] * random.uniform(0.7, 1.3)
        n += 1
        if time.time() + pause >= end:
            return None
        say(f"free-client: attempt {n} failed ({res.retry}); sending again in {pause:.1f} s")
        time.sleep(pause)
    return None


def supernode_command(host: str, port: int, node_config: str, runtime_port: int, root_cert: Path | None,
                      auth_key: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "free_dfml.client.supernode", "--superlink", f"{host}:{port}",
           "--node-config", node_config, "--port", str(runtime_port)]
    cmd += ["--root-certificates", str(root_cert.resolve())] if root_cert is not None else ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key.resolve())]
    return cmd


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--validate":
        raise SystemExit(validate_main(sys.argv[2]))
    raise SystemExit("usage: python -m free_dfml.client.submit --validate FILE")
