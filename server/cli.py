"""``free-server``: run a FREE server (a Flower SuperLink + the FREE ServerApp) on a state folder.

    free-server start    [--state DIR] [--address HOST:PORT] [--tls-cert F --tls-key F --tls-ca F]
                         [--insecure] [--config FILE] [--device auto|cpu|cuda] [--preset P]
                         [--max-iterations N] [--checkpoint-every N] [--min-models N] [--detach]
                         [--require-dp] [--max-epsilon E]
    free-server status   [--state DIR] [--json]
    free-server stop     [--state DIR] [--timeout S]
    free-server evaluate [--state DIR] --data glyphs|DIR|cifar-fs:PATH [--split auto|all|test|...] [--shot 1]
                         [--episodes N] [--baselines] [--seed S] [--split-seed S] [--threads N] [--json] [--out F]
    free-server export   [--state DIR] --out FILE
    free-server register-node [--state DIR] --key CLIENT.pub [--name NAME]   (with start --node-auth)
    free-server quarantine list|release ID|delete ID [--state DIR]

``start`` runs in the foreground (``--detach``: in the background, returning once the server is
up): it starts ``flower-superlink`` with its database in the state folder, submits the FREE
ServerApp with ``flwr run`` (FLWR_HOME inside the state folder), and supervises both until
SIGTERM/SIGINT (``free-server stop``), when the ServerApp checkpoints and everything is stopped.
Starting again on the same folder resumes: the zoo is kept and training continues from the
last checkpoint. Bad input gives a one-line error and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from free_dfml.common.cli import (CliError, check_certificate, check_private_key, is_loopback, parse_address,
                                  run_cli)
from free_dfml.common.processes import pid_alive, venv_env, venv_exe
from free_dfml.server.settings import load_config_file, settings_from
from free_dfml.server.state import StateDir, atomic_write_json, read_json

DEFAULT_STATE = "free-server-state"
DEFAULT_ADDRESS = "127.0.0.1:9092"


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a federated FREE server: collect client models into a zoo and meta-learn from it.")

QUIET_SHOWN_S = 5.0     # `status` says so when the ServerApp has made no progress this long
STATE_OPT = typer.Option(DEFAULT_STATE, "--state", help="state folder (zoo, checkpoints, SuperLink database, logs)")


# ------------------------------------------------------------------------------- commands

@app.command()
def start(
    state_dir: Path = STATE_OPT,
    address: str = typer.Option(DEFAULT_ADDRESS, "--address", help="HOST:PORT the SuperLink listens on"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="server certificate (PEM)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="server private key (PEM)"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA certificate (PEM) that signed --tls-cert"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback address without TLS"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML/JSON server settings (+ \\[free] table)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto|cpu|cuda (default auto)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="preset whose FREE settings to use: tiny|demo|quick|paper (default quick)"),
    max_iterations: Optional[int] = typer.Option(None, "--max-iterations", help="stop training after N (0: never)"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="checkpoint every N iterations"),
    min_models: Optional[int] = typer.Option(None, "--min-models", help="models in the zoo before training starts"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for training"),
    node_auth: bool = typer.Option(False, "--node-auth",
                                   help="accept only SuperNodes whose public key was registered (register-node)"),
    require_dp: bool = typer.Option(False, "--require-dp", help="refuse models without DP metadata"),
    max_epsilon: Optional[float] = typer.Option(None, "--max-epsilon",
                                                help="refuse models with DP epsilon above E (and non-DP ones)"),
    screen: bool = typer.Option(False, "--screen",
                                help="screen every model before training uses it; quarantine failures"),
    detach: bool = typer.Option(False, "--detach", help="run in the background; return once the server is up"),
    startup_timeout: float = typer.Option(60.0, "--startup-timeout", help="seconds to wait for the server to come up"),
) -> None:
    """Start the SuperLink + FREE ServerApp on a state folder (resuming what it holds)."""
    host, port = parse_address(address)
    if device is not None and device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise CliError(f"--device must be auto, cpu or cuda, got {device!r}")
    tls = [tls_cert, tls_key, tls_ca]
    if any(tls) and not all(tls):
        raise CliError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    if all(tls):        # a bad file fails now, naming it, not when a client connects
        check_certificate(tls_ca, "--tls-ca")
        check_certificate(tls_cert, "--tls-cert")
        check_private_key(tls_cert, tls_key, "--tls-key")
    if all(tls) and insecure:
        raise CliError("--insecure conflicts with the --tls-* options")
    if node_auth and not all(tls):
        raise CliError("--node-auth needs TLS (--tls-cert/--tls-key/--tls-ca)")
    if not all(tls) and not is_loopback(host) and not insecure:
        raise CliError(f"refusing to serve {host} without TLS: give --tls-cert/--tls-key/--tls-ca "
                       "(or --insecure if you really mean it)")
    state = StateDir(state_dir)
    if state.root.exists() and not state.root.is_dir():
        raise CliError(f"state path is not a folder: {state.root}")
    running = state.running_pid() if state.exists() else None
    if running and running != os.getpid():
        raise CliError(f"a server is already running on {state.root} (pid {running})", 1)
    cfg_doc = load_config_file(config) if config is not None else {}
    if threads is not None and threads < 0:
        raise CliError("--threads must be >= 0")
    if not startup_timeout > 0:
        raise CliError(f"--startup-timeout must be > 0, got {startup_timeout:g}")
    settings = settings_from(state, cfg_doc, device=device, preset=preset, max_iterations=max_iterations,
                             checkpoint_every=checkpoint_every, min_models=min_models, threads=threads,
                             require_dp=require_dp or None, max_epsilon=max_epsilon, screen=screen or None)
    from free_dfml.server.supervisor import Supervisor, start_detached
    if detach:
        rec = start_detached(state, [a for a in sys.argv[1:] if a != "--detach"], startup_timeout)
        print(f"FREE server running (pid {rec['pid']}) on {rec.get('address')}, run {rec.get('run_id')}, "
              f"state {state.root}")
        return
    state.create()
    settings.supervisor_pid = os.getpid()
    code = Supervisor(state, settings, host, port, [Path(p).resolve() if p else None for p in tls], startup_timeout,
                      node_auth=node_auth).run()
    if code:
        raise typer.Exit(code)


@app.command()
def status(state_dir: Path = STATE_OPT,
           as_json: bool = typer.Option(False, "--json", help="print the status as JSON")) -> None:
    """Models accepted/rejected, training progress, last evaluation, uptime."""
    state = _existing_state(state_dir)
    st = state.read_status() or {}
    rec = state.read_server() or {}
    pid = state.running_pid()
    from free_dfml.server.liveness import quiet_for
    quiet = quiet_for(state, rec.get("run_id")) if pid else None     # the live ServerApp's time without progress
    doc = {**st, "running": bool(pid), "server": rec, "serverapp_quiet_s": round(quiet[0], 1) if quiet else None}
    ev_file = read_json(state.root / "last_evaluation.json")
    if ev_file and (not doc.get("last_evaluation") or ev_file.get("time", 0) > doc["last_evaluation"].get("time", 0)):
        doc["last_evaluation"] = ev_file
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
        return
    models = st.get("models", {})
    tr = st.get("training", {})
    print(f"state      {state.root}")
    print(f"server     {'running (pid %d) on %s%s' % (pid, rec.get('address'), ' TLS' if rec.get('tls') else '') if pid else 'not running'}")
    if st:
        print(f"phase      {st.get('phase')}   uptime {st.get('uptime_s', 0):.0f} s   run {st.get('run_id')}")
        cats = ", ".join(f"{k} {v}" for k, v in sorted((models.get("rejected_by_category") or {}).items()))
        print(f"models     {models.get('accepted', 0)} accepted, {models.get('rejected', 0)} rejected"
              f"{' (' + cats + ')' if cats else ''}, "
              f"{models.get('resubmissions', 0)} resubmitted, {models.get('in_zoo', 0)} in the zoo")
        listed = st.get("accepted", [])
        if models.get("accepted", 0) > len(listed):
            print(f"  ({models['accepted'] - len(listed)} earlier accepted model(s) not listed: "
                  "submissions.jsonl holds them all)")
        for a in listed:
            dp = f"  DP epsilon={a['dp_epsilon']:.3g}" if a.get("dp_epsilon") is not None else ""
            print(f"  + {a['id'][:16]}  {a.get('arch')}  {a.get('num_classes')} classes{dp}")
        for r in st.get("rejected", [])[-10:]:
            print(f"  - rejected{' (' + r['category'] + ')' if r.get('category') else ''}: {r.get('reason')}")
        if st.get("quarantined"):
            print(f"quarantine {len(st['quarantined'])} model(s), never trained on (free-server quarantine)")
        for q in st.get("quarantined", []):
            print(f"  ! {q['id'][:16]}  {q.get('reason')}  {json.dumps(q.get('scores') or {}, sort_keys=True)}")
        stalled = (st.get("link") or {}).get("stalled_s") or 0
        if stalled:
            print(f"link       the SuperLink has not answered for {stalled:.0f} s (training goes on)")
        if (st.get("link") or {}).get("heartbeat_restarts"):
            print(f"link       Flower's task heartbeat stopped and was started again "
                  f"{st['link']['heartbeat_restarts']} time(s)")
        if (st.get("link") or {}).get("last_error"):
            print(f"link       the last poll failed: {st['link']['last_error']}")
        it = tr.get("iteration", 0)
        print(f"training   iteration {it}" + (" (running)" if tr.get("running") else "") +
              (f"  error: {tr['error']}" if tr.get("error") else ""))
        ck = tr.get("last_checkpoint")
        if ck:
            print(f"checkpoint iteration {ck.get('iteration')}")
        ev = doc.get("last_evaluation")     # the newer of status.json's and `evaluate`'s
        if ev:
            print(f"evaluation {json.dumps({k: v for k, v in ev.items() if k != 'time'}, default=str)}")
    else:
        print("no status yet")
    if quiet and quiet[0] >= QUIET_SHOWN_S:
        lost = (st.get("settings") or {}).get("lost_after")
        print(f"progress   the ServerApp has made none for {quiet[0]:.0f} s"
              + (f" (it is submitted again past lost-after {lost:g} s)" if lost else ""))
    if pid and rec.get("phase") == "recovering":
        print("recovery   the run was lost: the ServerApp is being submitted again")
    for r in (rec.get("recoveries") or [])[-3:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("time") or 0))
        print(f"recovered  {when}  run {r.get('run_id')} -> {r.get('new_run_id', '?')}: {r.get('reason')}")
    if rec.get("recovery_count"):
        n = rec["recovery_count"]
        print(f"           {n} recover{'y' if n == 1 else 'ies'} since the server started (server.json lists the last)")


@app.command()
def stop(state_dir: Path = STATE_OPT,
         timeout: float = typer.Option(200.0, "--timeout", help="seconds to wait for a clean stop")) -> None:
    """Stop the server running on the state folder (it checkpoints first)."""
    state = _existing_state(state_dir)
    pid = state.running_pid()
    if not pid:
        print(f"no server is running on {state.root}")
        return
    os.kill(pid, signal.SIGTERM)
    end = time.time() + timeout
    while time.time() < end and pid_alive(pid):
        time.sleep(0.3)
    if pid_alive(pid):
        raise CliError(f"server (pid {pid}) did not stop within {timeout:.0f} s", 1)
    st = state.read_status() or {}
    print(f"FREE server stopped: {st.get('models', {}).get('in_zoo', 0)} model(s) in the zoo, "
          f"training iteration {st.get('training', {}).get('iteration', 0)}")


@app.command("register-node")
def register_node(state_dir: Path = STATE_OPT,
                  key: Path = typer.Option(..., "--key", help="the client's public key (OpenSSH ECDSA, from free-client keygen)"),
                  name: Optional[str] = typer.Option(None, "--name", help="a name for the node")) -> None:
    """Allow a client's SuperNode to connect (the server must run with --node-auth)."""
    state = _existing_state(state_dir)
    if not key.is_file():
        raise CliError(f"no such file: {key}")
    if not state.running_pid():
        raise CliError(f"no server is running on {state.root}", 1)
    if not (state.read_server() or {}).get("node_auth"):
        raise CliError("the server was not started with --node-auth", 1)
    cmd = [venv_exe("flwr"), "supernode", "register", str(key.resolve()), "free-server", "--format", "json"]
    if name:
        cmd += ["--name", name]
    r = subprocess.run(cmd, env=venv_env({"FLWR_HOME": str(state.flwr_home)}), capture_output=True, text=True,
                       timeout=60)
    out = (r.stdout + r.stderr).strip()
    m = re.search(r'"node-id"\s*:\s*"?(\d+)', out)
    if r.returncode != 0 or not m:
        msg = re.sub(r"[\u2500-\u257f]", "", out)
        msg = " ".join(msg.split())[:300] or "no output"
        raise CliError(f"registration failed: {msg}", 1)
    print(f"registered {key} as node {m.group(1)}")


quarantine_app = typer.Typer(no_args_is_help=True, help="Models kept in the zoo but never trained on.")
app.add_typer(quarantine_app, name="quarantine")


def _quarantine(state_dir: Path):
    from free_dfml.server.quarantine import Quarantine
    return Quarantine.of_zoo(_existing_state(state_dir).zoo_dir)


@quarantine_app.command("list")
def quarantine_list(state_dir: Path = STATE_OPT,
                    as_json: bool = typer.Option(False, "--json", help="print the entries as JSON")) -> None:
    """Quarantined models with their reason and scores."""
    rows = _quarantine(state_dir).entries()
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        print("no quarantined models")
    for r in [] if as_json else rows:
        print(f"{r['id']}  {r.get('source')}  {r.get('reason')}  {json.dumps(r.get('scores') or {}, sort_keys=True)}")


@quarantine_app.command("release")
def quarantine_release(model_id: str = typer.Argument(..., help="model id (or a unique prefix)"),
                       state_dir: Path = STATE_OPT) -> None:
    """Use a quarantined model for training again (a running server: from its next iteration)."""
    from free_dfml.server.quarantine import QuarantineError
    try:
        mid = _quarantine(state_dir).release(model_id)
    except QuarantineError as e:
        raise CliError(str(e), 1) from None
    print(f"released {mid}: training uses it from its next iteration")


@quarantine_app.command("delete")
def quarantine_delete(model_id: str = typer.Argument(..., help="model id (or a unique prefix)"),
                      state_dir: Path = STATE_OPT) -> None:
    """Delete a quarantined model's package from the zoo (it is refused if sent again)."""
    from free_dfml.server.quarantine import QuarantineError
    from free_dfml.server.zoo import Zoo
    q = _quarantine(state_dir)
    try:
        mid = q.delete(model_id, Zoo(StateDir(state_dir).zoo_dir))
    except QuarantineError as e:
        raise CliError(str(e), 1) from None
    print(f"deleted {mid} from the zoo")


def _existing_state(state_dir: Path) -> StateDir:
    state = StateDir(state_dir)
    if not state.root.is_dir():
        raise CliError(f"no state folder at {state.root}")
    return state


def load_trainer(state: StateDir, device: str = "auto"):
    from free_dfml.server.checkpoint import CheckpointError
    from free_dfml.server.trainer import FreeTrainer
    try:
        return FreeTrainer.from_state(state, device)
    except FileNotFoundError as e:
        raise CliError(str(e), 1) from None
    except (CheckpointError, KeyError, ValueError) as e:
        raise CliError(f"cannot load the checkpoint: {e}", 1) from None


@app.command()
def evaluate(
    state_dir: Path = STATE_OPT,
    data: str = typer.Option(..., "--data", help="glyphs | DIR | folder:DIR[?split=FILE.json] | cifar-fs:PATH"),
    split: str = typer.Option("auto", "--split",
                              help="all | train | val | test | auto (default): every class of a folder without "
                                   "split file, else the test split (a folder's split.json, glyphs, CIFAR-FS)"),
    way: Optional[int] = typer.Option(None, "--way", min=2, help="default: the meta-learner's"),
    shot: int = typer.Option(1, "--shot", min=1),
    episodes: int = typer.Option(200, "--episodes", min=1),
    seed: int = typer.Option(0, "--seed", help="seed of the episodes"),
    split_seed: int = typer.Option(0, "--split-seed",
                                   help="seed of the data: a folder's 64/16/20 class split, the glyph rendering"),
    images_per_class: Optional[int] = typer.Option(
        None, "--images-per-class", min=1, help="glyphs: images rendered a class (default 40; the demo renders "
                                                "100); folders: the first N files of each class"),
    baselines: bool = typer.Option(False, "--baselines",
                                   help="also score a random start and the zoo average on the same episodes, "
                                        "with FREE's paired differences"),
    threads: int = typer.Option(0, "--threads", min=0,
                                help="torch threads (0: torch's default; the last digits depend on it)"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file to write (default: STATE/last_evaluation.json, "
                                                             "which free-server status shows)"),
    as_json: bool = typer.Option(False, "--json", help="print the result document as JSON instead of text"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Few-shot evaluation of the current meta-learner (from the last checkpoint).

    The first output line names the data used (data set, split, classes, images)."""
    from free_dfml.server.evaluation import EvalSpec, EvaluationError, data_line, evaluate_trainer, print_report
    spec = EvalSpec(data=data, split=split, way=way, shot=shot, episodes=episodes, seed=seed,
                    split_seed=split_seed, images_per_class=images_per_class, baselines=baselines)
    try:
        spec.check()
    except EvaluationError as e:
        raise CliError(str(e)) from None
    state = _existing_state(state_dir)
    target = out if out is not None else state.root / "last_evaluation.json"
    if target.is_dir() or not target.parent.is_dir():
        raise CliError(f"--out must be a file in an existing folder: {target}")
    if threads:
        import torch
        torch.set_num_threads(threads)
    trainer = load_trainer(state, device)
    try:
        doc = evaluate_trainer(trainer, spec, progress=not as_json and sys.stdout.isatty(),
                               on_data=None if as_json else (lambda info: print(data_line(info), flush=True)))
    except EvaluationError as e:
        raise CliError(str(e)) from None
    atomic_write_json(target, doc)
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print_report(doc)
        print(f"wrote {target}")


@app.command()
def export(state_dir: Path = STATE_OPT,
           out: Path = typer.Option(..., "--out", help="where to write the meta-learner package (.safetensors)"),
           device: str = typer.Option("cpu", "--device")) -> None:
    """Write the meta-learner as a model package (adaptation settings in its metadata)."""
    state = _existing_state(state_dir)
    if out.exists() and out.is_dir():
        raise CliError(f"--out is a folder: {out}")
    trainer = load_trainer(state, device)
    from free_dfml.common.package import save_package
    pkg = trainer.export()
    model_id = save_package(pkg, out)
    t = pkg.meta.training
    print(f"exported the meta-learner (iteration {trainer.iteration}, {t.get('way')}-way, adapt "
          f"{t.get('adapt_steps')} steps at lr {t.get('inner_lr')}) to {out}  id {model_id[:16]}")


def main() -> None:
    sys.exit(run_cli(app, "free-server"))


if __name__ == "__main__":
    main()
