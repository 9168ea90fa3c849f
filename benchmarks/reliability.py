"""Reliability of a real loopback deployment: concurrent submissions, submit latency, kill -9.

A real ``free-server start --preset tiny`` (flower-superlink + the FREE ServerApp) on loopback takes
``free-client submit`` processes (each a flower-supernode + ClientApp), as a user runs them:

1. **single**: ``reliability_single`` submits one after the other on an idle server; each one's
   wall time (command start to exit);
2. **burst**: for each N of ``reliability_bursts``, N distinct models submitted at once; counted:
   acknowledged (exit 0 with the package's id), rejected (exit 3), lost (neither: no answer or an
   error), acknowledged but missing from the zoo, duplicated (a model id twice in the zoo index);
   latency p50/p95, the burst's wall time and throughput, peak resident memory of every process
   of the run (the sum of VmRSS over the harness's process tree, sampled);
3. **kill loop**: ``reliability_kill_rounds`` rounds of: submit a few models, SIGKILL one of
   supervisor / SuperLink / ServerApp at a random moment, restart the server on the same state
   folder (when the supervisor died) or let it recover, and check that every model acknowledged
   so far is still in the zoo.

In the harness: ``python -m benchmarks.run --preset quick --only reliability`` (opt-in: it starts
real processes); the sizes per preset are :data:`SETTINGS` (``tiny``: a burst of 3, one kill
round, 5-7 minutes on 2 cores; ``quick``: bursts of 10 and 20, 3 kill rounds; ``paper``:
bursts of 10, 20 and 50, 10 kill rounds). Other sizes: the standalone command,
``python -m benchmarks.reliability --bursts 10,20 --single 5 --kill-rounds 3 --out FILE``.
Writes ``reliability.json`` and ``reliability.md`` beside the harness's results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.jobs import Job

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(n: int, out: Path, *, seed: int = 0, start: int = 0, width: int = 8) -> list[tuple[Path, str]]:
    """``n`` distinct random-initialised Conv4 packages (distinct seeds: distinct ids): (path, id)."""
    import torch

    from free_dfml.common.models import build_model
    from free_dfml.common.package import make_package, save_package
    out.mkdir(parents=True, exist_ok=True)
    res = []
    for i in range(start, start + n):
        torch.manual_seed(seed * 100003 + i)
        net = build_model("conv4", num_classes=5, in_channels=3, image_size=32, width=width)
        pkg = make_package(net, arch="conv4", arch_kwargs={"width": width}, num_classes=5,
                           input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.3,) * 3,
                           training={"note": "random init (reliability benchmark)"})
        path = out / f"m{i:04d}.safetensors"
        save_package(pkg, path)
        res.append((path, pkg.model_id))
    return res


def _children_map() -> dict[int, list[int]]:
    cm: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            cm.setdefault(ppid, []).append(int(d.name))
    return cm


def tree_rss_mb(root: int) -> float:
    """Sum of VmRSS over ``root`` and its descendants (shared pages counted in each process)."""
    cm, todo, total = _children_map(), [root], 0
    while todo:
        p = todo.pop()
        todo += cm.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class RssSampler:
    """Peak of :func:`tree_rss_mb` of this process's tree while in the ``with`` block."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak = every, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, tree_rss_mb(os.getpid()))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 2)


def pid_alive(pid: int | None) -> bool:
    from free_dfml.common.processes import pid_alive as alive
    return alive(pid)


# ------------------------------------------------------------------------------------------ server

class Server:
    """``free-server start`` on a state folder (its own session), as the tests and users run it."""

    def __init__(self, state: Path, *, threads: int = 1, extra: list[str] | None = None):
        self.state, self.port = Path(state), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.threads, self.extra = threads, list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.log = self.state.parent / (self.state.name + ".server.log")

    def start(self, timeout: float = 240) -> float:
        """Start and wait until it serves; returns the seconds it took."""
        t0 = time.time()
        cmd = [str(BIN / "free-server"), "start", "--state", str(self.state), "--address", self.address,
               "--preset", "tiny", "--threads", str(self.threads), "--device", "cpu", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while time.time() - t0 < timeout:
            rec = self.record()
            if rec.get("pid") == self.proc.pid and rec.get("phase") == "running":
                return time.time() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"free-server exited: {self.log.read_text()[-1500:]}")
            time.sleep(0.2)
        raise RuntimeError("free-server did not come up")

    def record(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "server.json").read_text())
        except (OSError, ValueError):
            return {}

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def pids(self) -> dict[str, int | None]:
        rec, st = self.record(), self.status()
        return {"supervisor": rec.get("pid"), "superlink": rec.get("superlink_pid"),
                "serverapp": st.get("serverapp_pid")}

    def all_pids(self) -> list[int]:
        cm = _children_map()
        todo = [p for p in self.pids().values() if p]
        seen: list[int] = []
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.append(p)
                todo += cm.get(p, [])
        return [p for p in seen if pid_alive(p)]

    def submit(self, model: Path, timeout: float = 180) -> dict[str, Any]:
        t0 = time.time()
        try:
            r = subprocess.run([str(BIN / "free-client"), "submit", "--model", str(model), "--server",
                                self.address, "--timeout", str(timeout)],
                               capture_output=True, text=True, timeout=timeout + 90)
            rc, out, err = r.returncode, r.stdout.strip(), r.stderr.strip()
        except subprocess.TimeoutExpired:
            rc, out, err = -1, "", "harness timeout"
        return {"rc": rc, "id": out.splitlines()[-1] if out else "", "err": err[-300:],
                "s": round(time.time() - t0, 2)}

    def zoo_ids(self) -> list[str]:
        """Model ids in the zoo index, in arrival order (with repeats, if any)."""
        ids = []
        try:
            for ln in (self.state / "zoo" / "index.jsonl").read_text().splitlines():
                try:
                    ids.append(json.loads(ln)["id"])
                except (ValueError, KeyError, TypeError):
                    pass
        except OSError:
            pass
        return ids

    def zoo_files(self) -> set[str]:
        return {p.stem for p in (self.state / "zoo" / "models").glob("*.safetensors")}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run([str(BIN / "free-server"), "stop", "--state", str(self.state)],
                           capture_output=True, timeout=240)
        self.kill_all()

    def kill_all(self) -> None:
        for p in self.all_pids():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


# ------------------------------------------------------------------------------------------ probes

def burst(srv: Server, models: list[tuple[Path, str]], timeout: float = 180) -> dict[str, Any]:
    """All ``models`` submitted at once; the counts and latencies."""
    zoo_before = srv.zoo_ids()
    t0 = time.time()
    with RssSampler() as rss, ThreadPoolExecutor(len(models)) as ex:
        results = list(ex.map(lambda m: srv.submit(m[0], timeout), models))
    wall = time.time() - t0
    time.sleep(1.0)
    zoo = srv.zoo_ids()
    files = srv.zoo_files()
    acked = [m for m, r in zip(models, results) if r["rc"] == 0 and r["id"] == m[1]]
    rejected = [r for r in results if r["rc"] == 3]
    lost = [r for m, r in zip(models, results) if not (r["rc"] == 0 and r["id"] == m[1]) and r["rc"] != 3]
    new = zoo[len(zoo_before):]
    lat = [r["s"] for r in results if r["rc"] == 0]
    return {
        "n": len(models), "acknowledged": len(acked), "rejected": len(rejected), "lost": len(lost),
        "acknowledged_missing_from_zoo": sum(1 for _, mid in acked if mid not in files),
        "duplicated": len(zoo) - len(set(zoo)), "zoo_new": len(new),
        "wall_s": round(wall, 1), "throughput_per_min": round(60 * len(acked) / wall, 1) if wall else None,
        "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "max_s": max(lat) if lat else None,
        "peak_rss_mb": round(rss.peak), "failures": [{"rc": r["rc"], "err": r["err"][-200:]} for r in lost][:5],
    }


def single(srv: Server, models: list[tuple[Path, str]], timeout: float = 180) -> dict[str, Any]:
    res = [srv.submit(m[0], timeout) for m in models]
    ok = [r["s"] for r, m in zip(res, models) if r["rc"] == 0 and r["id"] == m[1]]
    return {"n": len(models), "acknowledged": len(ok), "latencies_s": [r["s"] for r in res],
            "p50_s": pct(ok, 0.5), "p95_s": pct(ok, 0.95), "mean_s": round(statistics.mean(ok), 2) if ok else None,
            "failures": [r["err"][-200:] for r, m in zip(res, models) if not (r["rc"] == 0 and r["id"] == m[1])][:5]}


def kill_loop(srv: Server, pool: list[tuple[Path, str]], rounds: int, *, per_round: int = 2,
              seed: int = 0, log=print) -> dict[str, Any]:
    """Each round: ``per_round`` submits in flight, SIGKILL one server process at a random moment,
    recover (restart when the supervisor died), then every model acknowledged so far must be in
    the zoo. Models whose submit was cut off by the kill are submitted again next round."""
    rng = random.Random(seed)
    acked: set[str] = set()
    todo = list(pool)
    rows = []
    for rnd in range(rounds):
        batch, todo = todo[:per_round], todo[per_round:]
        victim = ("supervisor", "superlink", "serverapp")[rnd % 3]
        delay = rng.uniform(0.5, 8.0)
        with ThreadPoolExecutor(len(batch) + 1) as ex:
            futs = [ex.submit(srv.submit, m[0], 90) for m in batch]   # cut off by a kill: sent again later
            time.sleep(delay)
            pid = srv.pids().get(victim)
            killed = False
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                killed = True
            res = [f.result() for f in futs]
        for m, r in zip(batch, res):
            if r["rc"] == 0 and r["id"] == m[1]:
                acked.add(m[1])
            else:
                todo.append(m)        # try again later
        t0 = time.time()
        recovered = _recover(srv, victim)
        rec_s = time.time() - t0
        missing = sorted(acked - srv.zoo_files())
        row = {"round": rnd, "victim": victim, "at_s": round(delay, 1), "killed": killed,
               "acknowledged": sum(1 for m, r in zip(batch, res) if r["rc"] == 0), "recovered": recovered,
               "recover_s": round(rec_s, 1), "acknowledged_missing": len(missing)}
        rows.append(row)
        log(f"[reliability] kill round {rnd}: {row}")
    # after the loop the server still serves: one more submit
    final = srv.submit(todo[0][0], 180) if todo else None
    return {"rounds": rows, "acknowledged_total": len(acked),
            "acknowledged_lost": len(acked - srv.zoo_files()),
            "duplicated": len(srv.zoo_ids()) - len(set(srv.zoo_ids())),
            "serves_after": None if final is None else final["rc"] == 0}


def _recover(srv: Server, victim: str, timeout: float = 120) -> bool:
    """After a kill: a dead supervisor is restarted on the same state folder; otherwise wait for
    the server to serve again (the supervisor resubmits the ServerApp; a dead SuperLink stops it)."""
    end = time.time() + timeout
    while time.time() < end:
        if srv.proc is not None and srv.proc.poll() is not None:
            srv.kill_all()
            srv.start()
            return True
        st, rec = srv.status(), srv.record()
        if (st.get("run_id") == rec.get("run_id") and st.get("phase") in ("collecting", "training")
                and pid_alive(st.get("serverapp_pid")) and pid_alive(rec.get("superlink_pid"))):
            return True
        time.sleep(0.5)
    return False


# ------------------------------------------------------------------------------------------ run

def measure(work: Path, *, bursts=(10, 20), single_n: int = 5, kill_rounds: int = 3, seed: int = 0,
            log=print) -> dict[str, Any]:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    total = single_n + sum(bursts) + 2 * kill_rounds + 4
    models = make_models(total, work / "models", seed=seed)
    doc: dict[str, Any] = {"bursts": []}
    srv = Server(work / "state")
    try:
        doc["startup_s"] = round(srv.start(), 1)
        i = 0
        if single_n:
            doc["single"] = single(srv, models[i:i + single_n])
            i += single_n
            log(f"[reliability] single: {doc['single']}")
        for n in bursts:
            row = burst(srv, models[i:i + n], timeout=max(180, 20 * n))
            i += n
            doc["bursts"].append(row)
            log(f"[reliability] burst {n}: {row}")
        if kill_rounds:
            doc["kill_loop"] = kill_loop(srv, models[i:], kill_rounds, seed=seed, log=log)
    finally:
        srv.stop()
        doc["leftover_pids"] = srv.all_pids()
    return doc


# ------------------------------------------------------------------------------------------ harness

SETTINGS = {"tiny": dict(bursts=(3,), single_n=2, kill_rounds=1),
            "quick": dict(bursts=(10, 20), single_n=5, kill_rounds=3),
            "paper": dict(bursts=(10, 20, 50), single_n=10, kill_rounds=10)}


def run_section(ctx, deps) -> dict:
    from free_dfml.common.presets import canonical
    settings = SETTINGS[canonical(ctx.preset.name)]
    doc = measure(Path(ctx.work) / "reliability", seed=ctx.preset.study.seed, **settings)
    return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, **doc}


def jobs(p):
    return [Job("reliability", run_section, weight=0.5)]


def summarize(outcomes: dict, p) -> dict:
    o = outcomes.get("reliability")
    if o is None or not o.ok:
        return {"error": (o.error if o is not None else "not run")}
    return o.result


def markdown(sec: dict) -> str:
    if "error" in sec:
        return f"## Reliability\n\nfailed: {str(sec['error']).strip().splitlines()[-1]}\n"
    L = ["## Reliability (real loopback server, `free-server start --preset tiny`)", "",
         f"server start {sec.get('startup_s')} s; leftover processes after stop: {len(sec.get('leftover_pids') or [])}", ""]
    sg = sec.get("single") or {}
    if sg:
        L += [f"single submits on an idle server: {sg['acknowledged']}/{sg['n']} acknowledged, "
              f"p50 {sg['p50_s']} s, p95 {sg['p95_s']} s (latencies {sg['latencies_s']})", ""]
    if sec.get("bursts"):
        L += ["| N at once | acknowledged | rejected | lost | acked not in zoo | duplicated | p50 s | p95 s | "
              "wall s | per min | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in sec["bursts"]:
            L.append(f"| {b['n']} | {b['acknowledged']} | {b['rejected']} | {b['lost']} | "
                     f"{b['acknowledged_missing_from_zoo']} | {b['duplicated']} | {b['p50_s']} | {b['p95_s']} | "
                     f"{b['wall_s']} | {b['throughput_per_min']} | {b['peak_rss_mb']} |")
        L.append("")
    kl = sec.get("kill_loop")
    if kl:
        L += [f"kill -9 loop: {len(kl['rounds'])} rounds, {kl['acknowledged_total']} acknowledged, "
              f"{kl['acknowledged_lost']} acknowledged lost, {kl['duplicated']} duplicated, "
              f"serves afterwards: {kl['serves_after']}", "",
              "| round | killed | at s | acknowledged | recovered | recover s | acked missing |",
              "|---|---|---|---|---|---|---|"]
        for r in kl["rounds"]:
            L.append(f"| {r['round']} | {r['victim'] if r['killed'] else '(none: gone)'} | {r['at_s']} | "
                     f"{r['acknowledged']} | {r['recovered']} | {r['recover_s']} | {r['acknowledged_missing']} |")
        L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bursts", default="10,20")
    ap.add_argument("--single", type=int, default=5)
    ap.add_argument("--kill-rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("--work", default=None)
    a = ap.parse_args(argv)
    bursts = tuple(int(x) for x in a.bursts.split(",") if x.strip())
    with tempfile.TemporaryDirectory(prefix="free-rel-") as tmp:
        doc = measure(Path(a.work or tmp), bursts=bursts, single_n=a.single, kill_rounds=a.kill_rounds,
                      seed=a.seed)
    text = json.dumps(doc, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
