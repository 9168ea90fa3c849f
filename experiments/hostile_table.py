"""Issue 22's hostile table, re-measured: every row about input or configuration, and the lost run.

    .venv/bin/python -m experiments.hostile_table [--out experiments/results/reliability] [--no-wire]

Three parts, each against the real code path:

1. **admission** (in process): every package-borne row sent by its own node to the ingest service
   (``server/service.py``, the deployment's admission path: wire decode, package checks, policy,
   zoo) over the tests' fake grid, with the hostile packages of ``tests/hostile.py``; one honest
   node in the same poll; the 1 MiB and 10 MB client error reasons likewise. Recorded per row: the
   outcome, the reason (logged and acknowledged), the bytes stored;
2. **configuration** (real commands): ``free-server start`` with a mistyped ``[server]`` or ``[free]``
   value and on a busy ``--address``, ``free-client submit --root-cert`` a garbage file: exit code,
   the one line, seconds;
3. **wire** (a real loopback ``free-server start --preset tiny``, ``--checkpoint-every 2``): the
   ServerApp's log file, a refused runtime token (ServerApp frozen 65 s, past Flower's 60 s
   heartbeat patience, then resumed), resume after kill -9 of the ServerApp (``metrics.jsonl``
   rows not repeated), kill -9 of the supervisor (orphans), and on a second start of the same
   state folder with ``lost-after = 10`` a ServerApp frozen for good (the supervisor's lost-run
   check), then a submission to the recovered server.

Writes ``hostile-table.json`` and ``hostile-table.md`` (row, what the issue saw, outcome now, how
checked). About 5 minutes on 2 cores; one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS: list[dict[str, Any]] = []


def row(name: str, issue: str, outcome: str, checked: str, ok: bool, **detail: Any) -> None:
    ROWS.append({"row": name, "issue": issue, "outcome": outcome, "checked": checked, "ok": bool(ok),
                 "detail": detail})
    print(f"[{'ok' if ok else 'NOT OK'}] {name}: {outcome}", flush=True)


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.3) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


# ----------------------------------------------------------------------------------- 1. admission

# (row, what the issue saw, the hostile.PACKAGE_CASES replayed)
PACKAGE_ROWS = [
    ("normalisation std 1e-300 (0 in float32)", "accepted; training went NaN", ["tiny_std"]),
    ("normalisation mean 1e300 (inf in float32)", "accepted; training went NaN", ["huge_mean"]),
    ("every weight 3e38", "accepted (overflows in the first forward pass)",
     ["overflowing_weights", "overflowing_output"]),
    ("DP metadata epsilon -3", "accepted", ["negative_epsilon"]),
    ("DP metadata delta 5", "accepted", ["delta_out_of_range"]),
    ("a 512x512 input model", "accepted; trainer step 0.13 s -> 3.9-8.8 s", ["large_input"]),
    ("a 265 MB-class model", "accepted; trainer step 0.13 s -> 3.9-8.8 s", ["oversized_resnet", "costly_forward"]),
    ("class labels with control characters, ANSI escapes, NUL", "stored as given",
     ["control_labels", "bidi_label"]),
    ("a 900 kB free-form `training` field", "stored as given", ["big_training", "many_training_entries"]),
    ("unknown metadata keys", "silently dropped; accepted", ["unknown_keys"]),
    ("no `format` key", "accepted", ["no_format"]),
    ("metadata JSON nested about 1000 deep", "a RecursionError text reaches the client",
     ["deep_json", "moderately_deep_json"]),
]


def admission(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import hostile
    from flwr.app import Error, Message
    from flwr.supercore.task_identity import TaskIdentity
    from test_service import FakeGrid

    from free_dfml.common import limits, wire
    from free_dfml.server.service import FreeServer
    from free_dfml.server.settings import ServerSettings
    for name in ("_task_id", "_run_id", "_node_id"):      # as Flower sets them in a ServerApp process
        setattr(TaskIdentity, name, 1)

    def node(content=None, error: str | None = None):
        def handle(msg):
            if msg.metadata.message_type != wire.QUERY:
                return None
            if error is not None:
                return Message(Error(code=wire.ERR_INVALID_PACKAGE, reason=error), reply_to=msg)
            return Message(content, reply_to=msg)
        return handle

    grid = FakeGrid()
    cases = [c for _, _, cs in PACKAGE_ROWS for c in cs]
    made = {c: hostile.PACKAGE_CASES[c]() for c in cases}
    ids = {c: i for i, c in enumerate(cases, start=1)}
    for c in cases:
        grid.nodes[ids[c]] = node(hostile.as_content(made[c]))
    state, doc = hostile.valid()
    grid.nodes[100] = node(hostile.as_content(hostile.Hostile(state, doc, "")))     # one honest node
    reasons = {"1 MiB": 2 ** 20, "10 MB": 10_000_000}
    for i, n in enumerate(reasons.values(), start=200):
        grid.nodes[i] = node(error=hostile.huge_reason(n))
    srv = FreeServer(grid, ServerSettings(state_dir=str(work / "admission"), poll_interval=0.05, status_every=0.1,
                                          device="cpu", preset="tiny", train=False))
    t0 = time.time()
    srv.poll_once()
    srv.poll_once()
    seconds = time.time() - t0
    srv.write_status(force=True)
    log = {s["node"]: s for s in srv.state.submissions()}
    acks = {m.metadata.dst_node_id: wire.ack_document(m) for m in grid.sent if m.metadata.message_type != wire.QUERY}
    for name, issue, cs in PACKAGE_ROWS:
        got = [(c, log.get(ids[c], {}), acks.get(ids[c], {})) for c in cs]
        ok = all(e.get("event") == "rejected" and re.search(made[c].match, e.get("reason", ""))
                 and a.get("accepted") is False and a.get("reason") == e.get("reason") for c, e, a in got)
        outcome = "rejected: " + " | ".join(f"{e.get('reason')}" for _, e, _ in got)
        row(name, issue, outcome, f"in process: ingest service over a fake grid, tests/hostile.py {', '.join(cs)}; "
            "reason in submissions.jsonl and the ack", ok,
            cases={c: {"event": e.get("event"), "reason": e.get("reason"),
                       "reason_bytes": len((e.get("reason") or "").encode())} for c, e, _ in got})
    honest = log.get(100, {})
    subs_bytes = srv.state.submissions_path.stat().st_size
    status_bytes = srv.state.status_path.stat().st_size
    for (label, n), i in zip(reasons.items(), (200, 201)):
        e, a = log.get(i, {}), acks.get(i, {})
        stored = len((e.get("reason") or "").encode())
        ok = e.get("event") == "rejected" and stored <= limits.MAX_REASON_BYTES and (a.get("reason") or "").isprintable()
        row(f"a {label} rejection reason (client error text)", "kept whole: status.json 59 MB, rewritten every second",
            f"stored {stored} bytes in submissions.jsonl and the ack (cap {limits.MAX_REASON_BYTES}); "
            f"after all {len(cases) + 3} submissions: submissions.jsonl {subs_bytes} B, status.json {status_bytes} B",
            "in process: ingest service, tests/hostile.huge_reason (ANSI, NUL, newlines)", ok,
            sent_bytes=n, stored_reason_bytes=stored, ack_reason=a.get("reason"),
            submissions_jsonl_bytes=subs_bytes, status_json_bytes=status_bytes)
    # the byte cap on the payload itself: an honest package one byte over a lowered cap
    payload = sum(t.numel() * 4 for t in state.values())
    g2 = FakeGrid()
    g2.nodes[1] = node(hostile.as_content(hostile.Hostile(state, doc, "")))
    s2 = FreeServer(g2, ServerSettings(state_dir=str(work / "payload-cap"), device="cpu", preset="tiny", train=False,
                                       max_payload_bytes=payload - 1))
    s2.poll_once()
    (e,) = list(s2.state.submissions())
    ok = e["event"] == "rejected" and "max-payload-bytes" in e["reason"]
    row("package bytes over the cap", "a 265 MB ResNet-18 accepted (cap 256 MiB then)",
        f"rejected: {e['reason']} (default cap {limits.MAX_PACKAGE_BYTES // 2 ** 20} MiB, "
        f"{limits.MAX_PARAMETERS:,} values, {limits.MAX_FORWARD_MACS / 1e9:g} G MACs an image, "
        f"{limits.MAX_SIDE} px)", f"in process: an honest package, max-payload-bytes lowered to {payload - 1}", ok,
        payload_bytes=payload)
    row("honest control in the same poll", "-", f"{honest.get('event')} ({seconds:.1f} s for the whole poll)",
        "in process", honest.get("event") == "accepted", poll_seconds=round(seconds, 2))
    srv.shutdown()
    s2.shutdown()


# ------------------------------------------------------------------------------- 2. configuration

def run_cmd(args: list[str], timeout: float = 120) -> dict[str, Any]:
    t0 = time.time()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return {"rc": r.returncode, "s": round(time.time() - t0, 2), "lines": lines[-3:],
            "traceback": "Traceback" in r.stdout + r.stderr}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configuration(work: Path, model: Path) -> None:
    for name, text, key in (("`[server] min-models = \"lots\"`", '[server]\nmin-models = "lots"\n', "min-models"),
                            ("`[free] way = \"five\"`", '[free]\nway = "five"\n', "way")):
        cfg = work / f"cfg-{key}.toml"
        cfg.write_text(text)
        r = run_cmd([BIN / "free-server", "start", "--state", work / f"state-{key}", "--config", cfg,
                     "--address", f"127.0.0.1:{free_port()}", "--preset", "tiny"])
        ok = r["rc"] != 0 and len(r["lines"]) == 1 and key in r["lines"][0] and not r["traceback"]
        row(name, "starts, then fails on every poll" if key == "min-models" else "the error does not name the key",
            f"exit {r['rc']} after {r['s']} s: {r['lines'][-1] if r['lines'] else ''}",
            "real command: free-server start --config", ok, **r)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cmd([BIN / "free-server", "start", "--state", work / "state-busy", "--address", f"127.0.0.1:{port}",
                     "--preset", "tiny"])
    ok = r["rc"] != 0 and any(str(port) in ln for ln in r["lines"]) and not r["traceback"]
    row("`--address` on a port already in use", "the second server's run went to the first server's SuperLink",
        f"exit {r['rc']} after {r['s']} s: {r['lines'][-1] if r['lines'] else ''}",
        "real command: free-server start on a bound, listening port", ok, **r)
    garbage = work / "garbage.pem"
    garbage.write_bytes(os.urandom(512))
    r = run_cmd([BIN / "free-client", "submit", "--model", model, "--server", f"127.0.0.1:{free_port()}",
                 "--root-cert", garbage, "--timeout", "60"])
    ok = r["rc"] != 0 and r["s"] < 30 and any("--root-cert" in ln for ln in r["lines"]) and not r["traceback"]
    row("`--root-cert` a garbage file", "waits the full timeout",
        f"exit {r['rc']} after {r['s']} s (timeout 60): {r['lines'][-1] if r['lines'] else ''}",
        "real command: free-client submit --root-cert (512 random bytes)", ok, **r)


# ------------------------------------------------------------------------------------------ 3. wire

def wire_rows(work: Path, models: list[tuple[Path, str]]) -> None:
    from benchmarks.reliability import Server
    from free_dfml.common.processes import pid_alive
    state = work / "wire-state"
    cfg = work / "never-lost.toml"
    cfg.write_text("[server]\nlost-after = 0\n")
    srv = Server(state, threads=1, extra=["--checkpoint-every", "2", "--config", str(cfg)])
    try:
        up = srv.start()
        r = srv.submit(models[0][0])
        log = (state / "logs" / "serverapp.log")
        text = log.read_text(errors="replace") if log.exists() else ""
        ok = r["rc"] == 0 and "accepted model" in text
        line = next((ln for ln in text.splitlines() if "accepted model" in ln), "")
        row("ServerApp output", "sent to /dev/null", f"logs/serverapp.log ({log.stat().st_size if log.exists() else 0}"
            f" B after one submit; rotated at 10 MiB, 3 kept) holds the service's lines: `{line[:160]}`",
            "real loopback server: a submit, then the log file", ok, server_start_s=round(up, 1), submit=r)

        def iteration() -> int:
            return int((srv.status().get("training") or {}).get("iteration") or 0)
        wait_for(lambda: iteration() >= 3, 120)

        # a refused runtime token: the ServerApp frozen past Flower's heartbeat patience
        rec0, st0 = srv.record(), srv.status()
        app_pid, run0 = st0.get("serverapp_pid"), rec0.get("run_id")
        os.kill(app_pid, signal.SIGSTOP)
        time.sleep(65)
        t_cont = time.time()
        os.kill(app_pid, signal.SIGCONT)
        gone = wait_for(lambda: not pid_alive(app_pid), 60, 0.1)
        t_gone = time.time()
        serving = wait_for(lambda: (srv.status().get("run_id") == srv.record().get("run_id") != run0
                                    and srv.status().get("phase") in ("collecting", "training")), 120)
        t_serve = time.time()
        rec = srv.record()
        text = log.read_text(errors="replace")
        link_log = (state / "logs" / "superlink.log").read_text(errors="replace")
        refused = next((re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in link_log.splitlines()
                        if "task-token authentication failed" in ln), "")
        reason = (rec.get("recoveries") or [{}])[-1].get("reason") or ""
        ok = bool(gone and serving and refused) and models[0][1] in srv.zoo_files() and "refused" in reason
        row("the ServerApp's runtime token refused (frozen 65 s: the SuperLink failed its run)",
            "the server never served again", f"the ServerApp exited {t_gone - t_cont:.1f} s after it resumed "
            f"(superlink.log: `{refused[refused.find('[/v1'):] or 'no refusal logged'}`); run {run0} -> {rec.get('run_id')} serving "
            f"{t_serve - t_cont:.1f} s after; recovery recorded: {reason}; zoo kept",
            "real loopback server: SIGSTOP / SIGCONT of the ServerApp", ok,
            exit_s=round(t_gone - t_cont, 1), serving_s=round(t_serve - t_cont, 1), refused_in_log=refused[:300],
            recoveries=rec.get("recoveries"))

        # resume after kill -9 of the ServerApp: metrics.jsonl rows not repeated
        start_it = iteration()
        wait_for(lambda: iteration() >= start_it + 3, 120)
        app_pid = srv.status().get("serverapp_pid")
        killed_at = iteration()
        run1 = srv.record().get("run_id")
        os.kill(app_pid, signal.SIGKILL)
        wait_for(lambda: srv.record().get("run_id") != run1 and iteration() >= killed_at + 3, 180)
        rows_ = [json.loads(ln) for ln in (state / "logs" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        its = [int(r_["iteration"]) for r_ in rows_]
        ok = its == sorted(set(its)) and max(its) >= killed_at + 3
        row("resume after kill -9 mid-training", "metrics.jsonl repeats the iterations that were redone",
            f"killed at iteration {killed_at}, resumed to {max(its)}: {len(its)} rows, "
            f"{len(its) - len(set(its))} repeated", "real loopback server: SIGKILL of the ServerApp "
            "(--checkpoint-every 2), then metrics.jsonl", ok, killed_at=killed_at, iterations=its)

        # kill -9 of the supervisor alone
        pids = srv.pids()
        tree = srv.all_pids()
        t_kill = time.time()
        os.kill(pids["supervisor"], signal.SIGKILL)
        srv.proc.wait(10)
        left = wait_for(lambda: not [p for p in tree if pid_alive(p)], 30, 0.2)
        ok = bool(left)
        row("kill -9 of the supervisor alone", "the SuperLink keeps listening, orphaned",
            f"all {len(tree) - 1} child processes gone {time.time() - t_kill:.1f} s later" if ok else
            f"left: {[p for p in tree if pid_alive(p)]}", "real loopback server: SIGKILL of free-server start, "
            "then its process tree", ok, tree=len(tree))
    finally:
        srv.kill_all()

    # a second start on the same folder, lost-after 10 s: a ServerApp frozen for good
    cfg2 = work / "lost-after.toml"
    cfg2.write_text("[server]\nlost-after = 10\n")
    srv = Server(state, threads=1, extra=["--checkpoint-every", "2", "--config", str(cfg2)])
    try:
        up = srv.start()
        zoo_before = srv.zoo_files()
        wait_for(lambda: (state / "serverapp.alive").exists() and srv.status().get("run_id") == srv.record()["run_id"], 60)
        app_pid, run0 = srv.status().get("serverapp_pid"), srv.record().get("run_id")
        t_stop = time.time()
        os.kill(app_pid, signal.SIGSTOP)
        ev = wait_for(lambda: [e for e in srv.record().get("recoveries") or [] if e.get("run_id") == run0], 90, 0.2)
        t_seen = (ev[-1]["time"] - t_stop) if ev else None
        serving = wait_for(lambda: (srv.status().get("run_id") == srv.record().get("run_id") != run0
                                    and srv.status().get("phase") in ("collecting", "training")), 120)
        t_serve = time.time() - t_stop
        status_text = run_cmd([BIN / "free-server", "status", "--state", state])["lines"]
        r = srv.submit(models[1][0])
        ok = bool(ev and serving) and not pid_alive(app_pid) and zoo_before <= srv.zoo_files() and r["rc"] == 0
        row("a ServerApp frozen for good (lost run; not in the issue's table)", "-",
            f"noticed {t_seen:.1f} s after the freeze (lost-after 10 s): {ev[-1]['reason'] if ev else '-'}; "
            f"run {run0} -> {srv.record().get('run_id')} serving {t_serve:.1f} s after; zoo kept; "
            f"a new submit acknowledged (rc {r['rc']}, {r['s']} s)" if ev else "not noticed",
            "real loopback server restarted on the same state folder with [server] lost-after = 10, "
            "SIGSTOP of the ServerApp; free-server status", ok,
            noticed_s=t_seen, serving_s=round(t_serve, 1), start_s=round(up, 1), submit=r,
            status_lines=status_text)
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------- report

def markdown(doc: dict[str, Any]) -> str:
    out = ["# Issue 22's hostile table, re-measured", "",
           f"- command: `{doc['command']}` (commit `{doc['commit'][:12]}`, {doc['started']})",
           f"- machine: {doc['machine']}; load average {doc['load_start']} at start, {doc['load_end']} at end; "
           f"{doc['seconds']:.0f} s in all", f"- rows as expected: {sum(r['ok'] for r in doc['rows'])} of "
           f"{len(doc['rows'])}", "",
           "| row | the issue saw | outcome now | how checked | as expected |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        cells = [r["row"], r["issue"], r["outcome"], r["checked"], "yes" if r["ok"] else "**no**"]
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "reliability")
    ap.add_argument("--no-wire", action="store_true", help="skip the loopback-server rows")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    t0 = time.time()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hostile-table-") as tmp:
        work = Path(tmp)
        from benchmarks.reliability import make_models
        models = make_models(2, work / "models", seed=22)
        admission(work)
        configuration(work, models[0][0])
        if not args.no_wire:
            wire_rows(work, models)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    doc = {"command": "python -m experiments.hostile_table" + (" --no-wire" if args.no_wire else ""),
           "commit": commit or "?", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
           "machine": f"{cpu}, {os.cpu_count()} cores", "load_start": [round(x, 1) for x in load0],
           "load_end": [round(x, 1) for x in os.getloadavg()], "seconds": round(time.time() - t0, 1), "rows": ROWS}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile-table.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out / "hostile-table.md").write_text(markdown(doc))
    print(f"{sum(r['ok'] for r in ROWS)} of {len(ROWS)} rows as expected; {args.out}/hostile-table.md")
    return 0 if all(r["ok"] for r in ROWS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
