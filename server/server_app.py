"""The FREE ServerApp: collects model packages from SuperNodes into the zoo and trains FREE on it.

One ServerApp serves deployment (``free-server start`` -> ``flwr run``; settings from the run
config) and simulation (``free-sim`` -> :func:`make_server_app` with the settings baked in).

Loop (every ``poll-interval`` seconds), in the process's main thread:

1. ``grid.get_node_ids()``; every node not heard from yet gets a ``query`` message asking for its
   model (``request: {protocol, max-bytes}``);
2. replies are pulled; each is checked (only the ``model`` ArrayRecord and the ``meta``
   ConfigRecord; float32 numpy arrays, no pickle; total payload under ``max-payload-bytes``),
   validated with :func:`package_from_tensors`, stored with :meth:`Zoo.add` (an identical model
   gets its existing id), logged to ``submissions.jsonl``, and acknowledged with a
   ``query.ack`` message (accepted + id, or rejected + reason);
3. once the zoo holds ``min-models`` models the FREE trainer starts in a background thread
   (resuming the state folder's checkpoint when there is one) and keeps training while models
   arrive; it checkpoints every ``checkpoint-every`` iterations, and on stop (``stop.request``,
   SIGTERM/SIGINT, the supervisor's death);
4. ``status.json`` is rewritten (atomically) every ``status-every`` seconds.

Every call to the SuperLink goes through flwr's retry invoker, which retries a failed or timed-out
call (30 s per attempt) for as long as it takes. A watchdog thread therefore covers the main
loop while it waits: once a poll has lasted ``LINK_STALL_S`` seconds it keeps ``status.json``
current (training goes on; ``link.stalled_s`` says how long the SuperLink has not answered), and a
stop request during the wait stops training and checkpoints without waiting for the SuperLink.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from free_dfml.client.client_app import (ACK_ACTION, ID_FIELD, META_FIELDS, META_KEY, MODEL_KEY,
                                         PACKAGE_FIELD, PROTOCOL)
from free_dfml.common.package import (MAX_HEADER_BYTES, MAX_PACKAGE_BYTES, ModelPackage, PackageError,
                                      package_from_tensors)
from free_dfml.common.processes import pid_alive
from free_dfml.server.state import StateDir, build_status, read_json
from free_dfml.server.zoo import Zoo

LOG = logging.getLogger("free_dfml.server")
MAX_ARRAYS = 4096
NODE_GONE_S = 60.0        # forget a pending query whose node has left for this long
LINK_STALL_S = 5.0        # a poll running this long counts as a stalled SuperLink link


# ------------------------------------------------------------------------------------ settings

@dataclass
class ServerSettings:
    state_dir: str = "free-server-state"
    poll_interval: float = 0.5
    status_every: float = 1.0
    checkpoint_every: int = 20
    min_models: int = 1                 # models in the zoo before FREE starts training
    max_payload_bytes: int = MAX_PACKAGE_BYTES
    device: str = "auto"
    train: bool = True
    preset: str = "quick"               # FreeConfig preset
    free_config: dict[str, Any] = field(default_factory=dict)   # FreeConfig overrides
    max_iterations: int = 0             # 0: train as long as the server runs
    expected_models: int = 0            # simulation: replies to wait for before finishing
    finish_when_done: bool = False      # simulation: return once expected models + max_iterations are done
    collect_timeout: float = 0.0        # simulation: stop waiting for replies after this (0: forever)
    supervisor_pid: int = 0             # deployment: stop when this process is gone
    eval_data: str = ""                 # optional dataset for in-training evaluation (eval_every)
    eval_split: str = "val"
    eval_episodes: int = 50
    threads: int = 0                    # torch threads for training (0: leave as is)


    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "ServerSettings":
        kw: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in rc:
                continue
            v = rc[key]
            if f.name == "free_config":
                v = json.loads(v) if isinstance(v, str) and v.strip() else {}
            kw[f.name] = v
        s = cls(**kw)
        s.max_payload_bytes = int(s.max_payload_bytes)
        return s

    def to_run_config(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "free_config":
                v = json.dumps(v, sort_keys=True)
            out[f.name.replace("_", "-")] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def free_config_for(settings: ServerSettings, zoo: Zoo):
    """The FreeConfig: preset + overrides; image size/channels from the first zoo model if not set."""
    from free_dfml.server.trainer import FreeConfig
    over = dict(settings.free_config)
    ids = zoo.ids()
    if ids:
        c, h, _ = zoo.meta(ids[0]).input_shape
        over.setdefault("image_size", h)
        over.setdefault("channels", c)
    return FreeConfig.preset(settings.preset, **over)


# ---------------------------------------------------------------------------------- the wire

def content_to_package(content: RecordDict, *, max_bytes: int = MAX_PACKAGE_BYTES) -> ModelPackage:
    """Check a reply's content and validate it into a package; raises PackageError with the reason."""
    arrays_keys = set(content.array_records.keys())
    config_keys = set(content.config_records.keys())
    metric_keys = set(content.metric_records.keys())
    if arrays_keys != {MODEL_KEY} or config_keys != {META_KEY} or metric_keys:
        raise PackageError(
            f"reply must hold exactly the '{MODEL_KEY}' arrays and the '{META_KEY}' config; got arrays "
            f"{sorted(arrays_keys)}, configs {sorted(config_keys)}, metrics {sorted(metric_keys)}")
    arrays = content.array_records[MODEL_KEY]
    meta = content.config_records[META_KEY]
    extra = sorted(set(meta.keys()) - META_FIELDS)
    if extra:
        raise PackageError(f"unexpected metadata field(s) {extra}")
    doc = meta.get(PACKAGE_FIELD)
    if not isinstance(doc, str):
        raise PackageError(f"metadata field '{PACKAGE_FIELD}' must be a JSON string")
    if len(doc) > MAX_HEADER_BYTES:
        raise PackageError(f"metadata is {len(doc)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if len(arrays) > MAX_ARRAYS:
        raise PackageError(f"{len(arrays)} arrays, over the limit of {MAX_ARRAYS}")
    total = sum(len(a.data) for a in arrays.values()) + len(doc)
    if total > max_bytes:
        raise PackageError(f"payload is {total} bytes, over the {max_bytes}-byte limit")
    state: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        if arr.stype != "numpy.ndarray":
            raise PackageError(f"tensor {name!r} has serialization {arr.stype!r}, expected numpy.ndarray")
        if arr.dtype != "float32":
            raise PackageError(f"tensor {name!r} has dtype {arr.dtype}, expected float32")
        try:
            nd = arr.numpy()            # np.load(allow_pickle=False): never unpickles
        except Exception as e:         # noqa: BLE001 - any decoding problem is a bad package
            raise PackageError(f"tensor {name!r} cannot be decoded: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if nd.dtype != np.float32 or tuple(nd.shape) != tuple(arr.shape):
            raise PackageError(f"tensor {name!r} does not match its declared dtype/shape")
        state[name] = torch.from_numpy(np.ascontiguousarray(nd).copy())
    try:
        meta_doc = json.loads(doc)
    except json.JSONDecodeError:
        raise PackageError("metadata is not valid JSON") from None
    pkg = package_from_tensors(state, meta_doc)
    claimed = meta.get(ID_FIELD)
    if claimed is not None and claimed != pkg.model_id:
        raise PackageError("metadata model-id does not match the weights (corrupted in transit?)")
    return pkg


def describe_content(content: RecordDict) -> dict[str, Any]:
    """What a reply held (record names and metadata fields): logged with every submission."""
    d: dict[str, Any] = {"array_records": sorted(content.array_records.keys()),
                         "config_records": sorted(content.config_records.keys()),
                         "metric_records": sorted(content.metric_records.keys())}
    if META_KEY in content.config_records:
        d["meta_fields"] = sorted(content.config_records[META_KEY].keys())
    if MODEL_KEY in content.array_records:
        d["arrays"] = len(content.array_records[MODEL_KEY])
    return d


def query_message(node_id: int, max_bytes: int) -> Message:
    return Message(RecordDict({"request": ConfigRecord({"protocol": PROTOCOL, "max-bytes": int(max_bytes)})}),
                   dst_node_id=node_id, message_type="query")


def ack_message(node_id: int, outcome: dict[str, Any]) -> Message:
    rec = {"accepted": bool(outcome["accepted"]), "model-id": str(outcome.get("model_id") or ""),
           "new": bool(outcome.get("new", False)), "reason": str(outcome.get("reason") or "")}
    return Message(RecordDict({"ack": ConfigRecord(rec)}), dst_node_id=node_id,
                   message_type=f"query.{ACK_ACTION}")


# ------------------------------------------------------------------------------------ training

class TrainerRunner:
    """FREE in a background thread; starts once the zoo holds enough models."""

    def __init__(self, zoo: Zoo, settings: ServerSettings, state: StateDir):
        self.zoo, self.settings, self.state = zoo, settings, state
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.trainer = None
        self.error: str | None = None
        self.resumed = False
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_evaluation: dict[str, Any] | None = None
        self.done = False
        self._lock = threading.Lock()
        self._metrics_path = state.logs_dir / "metrics.jsonl"

    @property
    def iteration(self) -> int:
        return int(self.trainer.iteration) if self.trainer is not None else self._checkpoint_iteration()

    def _checkpoint_iteration(self) -> int:
        info = read_json(self.state.checkpoint_dir / "checkpoint.json") or {}
        return int(info.get("iteration", 0))

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def maybe_start(self, force: bool = False) -> None:
        """Start once the zoo holds ``min-models`` models (``force``: as soon as it holds one)."""
        s = self.settings
        need = 1 if force else max(1, s.min_models)
        if not s.train or self.thread is not None or self.error or len(self.zoo) < need:
            return
        try:
            from free_dfml.server.trainer import FreeTrainer
            cfg = free_config_for(s, self.zoo)
            eval_data = None
            if s.eval_data:
                from free_dfml.common.datasets import open_dataset
                eval_data = open_dataset(s.eval_data, image_size=cfg.image_size,
                                         grayscale=cfg.channels == 1).split(s.eval_split)
            if s.threads:
                torch.set_num_threads(int(s.threads))
            self.trainer = FreeTrainer(self.zoo, cfg, state_dir=self.state.checkpoint_dir, device=s.device,
                                       eval_data=eval_data, eval_episodes=s.eval_episodes)
            self.resumed = self.trainer.resume()
            LOG.info("FREE trainer ready (%s, iteration %d)", "resumed from checkpoint" if self.resumed
                     else "fresh", self.trainer.iteration)
        except Exception as e:  # noqa: BLE001 - keep serving; status shows the reason
            self.error = f"{type(e).__name__}: {e}"
            LOG.error("FREE trainer could not start: %s\n%s", self.error, traceback.format_exc())
            return
        self.thread = threading.Thread(target=self._loop, name="free-trainer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        s, t = self.settings, self.trainer
        try:
            while not self.stop_event.is_set():
                if s.max_iterations and t.iteration >= s.max_iterations:
                    break
                m = t.step()
                with self._lock:
                    self.last_metrics = m
                    ev = {k: v for k, v in m.items() if k.startswith("eval_")}
                    if ev:
                        self.last_evaluation = {"iteration": t.iteration, "time": time.time(), **ev}
                with open(self._metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(m, default=str) + "\n")
                if s.checkpoint_every and t.iteration % s.checkpoint_every == 0:
                    self._checkpoint()
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            LOG.error("FREE training stopped on an error: %s\n%s", self.error, traceback.format_exc())
        finally:
            self._checkpoint()
            self.done = True

    def _checkpoint(self) -> None:
        if self.trainer is None:
            return
        try:
            path = self.trainer.checkpoint()
            self.last_checkpoint = {"iteration": self.trainer.iteration, "time": time.time(), "path": str(path)}
            from free_dfml.common.package import atomic_write_bytes
            atomic_write_bytes(self.state.checkpoint_dir / "checkpoint.json",
                               json.dumps(self.last_checkpoint).encode())
        except Exception as e:  # noqa: BLE001
            LOG.error("checkpoint failed: %s", e)

    def stop(self, timeout: float = 120.0) -> None:
        """Stop training and checkpoint (the training thread checkpoints on its way out)."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                LOG.warning("trainer did not stop within %.0f s; last periodic checkpoint kept", timeout)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            m = dict(self.last_metrics)
        return {"enabled": self.settings.train, "running": self.running(), "iteration": self.iteration,
                "resumed": self.resumed, "error": self.error, "last_metrics": m,
                "last_checkpoint": self.last_checkpoint or read_json(self.state.checkpoint_dir / "checkpoint.json"),
                "max_iterations": self.settings.max_iterations, "min_models": self.settings.min_models}


# ------------------------------------------------------------------------------------- serving

class FreeServer:
    SHUTDOWN_WAIT_S = 150.0     # a second shutdown() caller waits this long for the first

    def __init__(self, grid: Grid, settings: ServerSettings, *, run_id: int | None = None):
        self.grid, self.settings, self.run_id = grid, settings, run_id
        self.state = StateDir(settings.state_dir).create()
        self._lock_state()
        self.zoo = Zoo(self.state.zoo_dir)
        self.runner = TrainerRunner(self.zoo, settings, self.state)
        self.stop_event = threading.Event()
        self.heard: dict[int, dict[str, Any]] = {}
        self.pending: dict[str, tuple[int, float]] = {}    # message id -> (node id, sent at)
        self.acks: dict[str, float] = {}                  # ack message id -> sent at
        self.node_last_seen: dict[int, float] = {}
        self.replies = 0
        self.started_at = time.time()
        self.phase = "collecting"
        self._last_status = 0.0
        # re-entrant: flwr's SIGTERM handler runs shutdown() in the main thread, which may be inside
        # write_status() or shutdown() already
        self._status_lock = threading.RLock()
        self._shut_lock = threading.RLock()
        self._shut = False
        self._shut_by: int | None = None          # the thread running shutdown()
        self._shut_done = threading.Event()
        self._poll_since: float | None = None     # when the poll in progress began (None: none)
        self._last_poll_ok: float | None = None
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------------------ replies
    def handle_reply(self, reply: Message, node_id: int) -> dict[str, Any]:
        self.replies += 1
        entry: dict[str, Any] = {"node": node_id}
        if reply.has_error():
            outcome = {"accepted": False, "reason": f"client error: {reply.error.reason}"}
        else:
            entry["wire"] = describe_content(reply.content)
            try:
                pkg = content_to_package(reply.content, max_bytes=self.settings.max_payload_bytes)
                model_id, new = self.zoo.add(pkg)
                outcome = {"accepted": True, "model_id": model_id, "new": new}
                entry.update(arch=pkg.meta.arch, num_classes=pkg.meta.num_classes,
                             dp_epsilon=(pkg.meta.dp or {}).get("epsilon"), dp_delta=(pkg.meta.dp or {}).get("delta"))
            except PackageError as e:
                outcome = {"accepted": False, "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - never let one reply take the server down
                outcome = {"accepted": False, "reason": f"server could not store the model: {type(e).__name__}: {e}"}
        self.state.log_submission({"event": "accepted" if outcome["accepted"] else "rejected", **entry,
                                   **{k: v for k, v in outcome.items() if k != "accepted"}})
        if outcome["accepted"]:
            LOG.info("node %s: accepted model %s (%s)", node_id, outcome["model_id"][:12],
                     "new" if outcome["new"] else "already in the zoo")
        else:
            LOG.info("node %s: rejected: %s", node_id, outcome["reason"])
        return outcome

    # ---------------------------------------------------------------------------------- loop
    def poll_once(self) -> None:
        now = time.time()
        nodes = list(self.grid.get_node_ids())
        for n in nodes:
            self.node_last_seen[n] = now
        waiting = {n for n, _ in self.pending.values()}
        new = [n for n in nodes if n not in self.heard and n not in waiting]
        if new:
            ids = list(self.grid.push_messages([query_message(n, self.settings.max_payload_bytes) for n in new]))
            for mid, n in zip(ids, new):
                if mid:
                    self.pending[mid] = (n, now)
                    LOG.info("node %s: asked for its model", n)
        if self.pending:
            for reply in self.grid.pull_messages(list(self.pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in self.pending:
                    continue
                node_id, _ = self.pending.pop(mid)
                outcome = self.handle_reply(reply, node_id)
                self.heard[node_id] = outcome
                ack_ids = list(self.grid.push_messages([ack_message(node_id, outcome)]))
                self.acks.update((a, now) for a in ack_ids if a)
        # forget queries to nodes that left
        for mid, (n, sent) in list(self.pending.items()):
            if now - self.node_last_seen.get(n, sent) > NODE_GONE_S:
                del self.pending[mid]
        if self.acks:   # collect the (empty) ack replies so they do not pile up
            for r in self.grid.pull_messages(list(self.acks)):
                self.acks.pop(r.metadata.reply_to_message_id, None)
            for mid, sent in list(self.acks.items()):   # a node that left without answering its ack
                if now - sent > NODE_GONE_S:
                    del self.acks[mid]
        self.runner.maybe_start(force=self.collected())

    def collected(self) -> bool:
        """Simulation: every expected client has answered (or the collect timeout passed)."""
        s = self.settings
        if not s.expected_models:
            return False
        if len(self.heard) >= s.expected_models:
            return True
        return bool(s.collect_timeout and time.time() - self.started_at > s.collect_timeout)

    def finished(self) -> bool:
        s = self.settings
        if not s.finish_when_done:
            return False
        collected = self.collected() if s.expected_models else True
        if not collected:
            return False
        if not s.train:
            return True
        if self.runner.error:
            return True
        if self.runner.thread is None:
            return len(self.zoo) == 0     # nothing to train on: done
        return self.runner.done

    def link(self) -> dict[str, Any]:
        """The SuperLink link as the main loop sees it: last good poll, and how long the poll in
        progress has waited once that passes ``LINK_STALL_S`` (else 0)."""
        since = self._poll_since
        waited = time.time() - since if since is not None else 0.0
        return {"last_ok": self._last_poll_ok,
                "stalled_s": round(waited, 1) if waited >= LINK_STALL_S else 0.0}

    def write_status(self, force: bool = False) -> None:
        with self._status_lock:
            self._write_status(force)

    def _write_status(self, force: bool) -> None:
        now = time.time()
        if not force and now - self._last_status < self.settings.status_every:
            return
        self._last_status = now
        ev_file = read_json(self.state.root / "last_evaluation.json")
        last_eval = self.runner.last_evaluation or ev_file
        if ev_file and self.runner.last_evaluation and ev_file.get("time", 0) > self.runner.last_evaluation.get("time", 0):
            last_eval = ev_file
        doc = build_status(self.state, phase=self.phase, started_at=self.started_at, run_id=self.run_id,
                           zoo_size=len(self.zoo), training=self.runner.summary(),
                           last_evaluation=last_eval, pending=len(self.pending),
                           extra={"serverapp_pid": os.getpid(), "settings": self.settings.to_dict(),
                                  "link": self.link()})
        try:
            self.state.write_status(doc)
        except OSError as e:
            LOG.error("cannot write status.json: %s", e)

    def should_stop(self) -> bool:
        if self.stop_event.is_set() or self.state.stop_requested():
            return True
        sp = self.settings.supervisor_pid
        if sp and not pid_alive(sp):
            LOG.warning("supervisor %s is gone: stopping", sp)
            return True
        return False

    def _lock_state(self, wait: float = 60.0) -> None:
        """One ServerApp per state folder: an exclusive lock held for the life of the process."""
        import fcntl
        self._lock_file = open(self.state.root / "serverapp.lock", "a+")
        end = time.time() + wait
        while True:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if time.time() > end:
                    raise RuntimeError(f"another ServerApp holds {self.state.root}/serverapp.lock") from None
                time.sleep(0.5)

    def _watch(self) -> None:
        """While a poll waits on the SuperLink for ``LINK_STALL_S`` or more: keep status.json current,
        and honour a stop request (checkpoint, phase ``stopped``) without waiting for the poll."""
        warned = False
        while not self._shut_done.wait(min(1.0, self.settings.status_every)):
            stalled = self.link()["stalled_s"]
            if not stalled:
                warned = False
                continue
            if not warned:
                LOG.warning("the SuperLink has not answered for %.0f s; training goes on", stalled)
                warned = True
            if self.should_stop():
                LOG.warning("stop requested while waiting on the SuperLink: stopping without it")
                self.shutdown()
                return
            self.write_status()

    def serve(self) -> None:
        LOG.info("FREE server: state %s, %d model(s) in the zoo", self.state.root, len(self.zoo))
        self.write_status(force=True)
        self._watchdog = threading.Thread(target=self._watch, name="free-link-watchdog", daemon=True)
        self._watchdog.start()
        try:
            while not self.should_stop():
                self._poll_since = time.time()
                try:
                    self.poll_once()
                    self._last_poll_ok = time.time()
                except Exception as e:  # noqa: BLE001 - transient SuperLink trouble: keep going
                    LOG.error("poll failed: %s: %s", type(e).__name__, e)
                finally:
                    self._poll_since = None
                if self.runner.running():
                    self.phase = "training"
                if self.finished():
                    self.phase = "finished"
                    break
                self.write_status()
                time.sleep(self.settings.poll_interval)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop training, checkpoint, write the final status. Called from the main loop, flwr's exit
        handler or the watchdog; a second caller in another thread waits for the first to finish (in
        the same thread, e.g. a signal handler interrupting it, it returns at once)."""
        with self._shut_lock:
            first = not self._shut
            self._shut = True
            if first:
                self._shut_by = threading.get_ident()
        if not first:
            if self._shut_by != threading.get_ident():
                self._shut_done.wait(self.SHUTDOWN_WAIT_S)
            return
        try:
            if self.phase != "finished":
                self.phase = "stopping"
            self.write_status(force=True)
            self.runner.stop()
            if self.phase != "finished":
                self.phase = "stopped"
            self.write_status(force=True)
            LOG.info("FREE server %s at iteration %d", self.phase, self.runner.iteration)
        finally:
            self._shut_done.set()


def _setup_logging(state: StateDir) -> None:
    state.logs_dir.mkdir(parents=True, exist_ok=True)
    if any(getattr(h, "_free_dfml", False) for h in LOG.handlers):
        return
    fh = logging.FileHandler(state.logs_dir / "serverapp.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    fh._free_dfml = True  # type: ignore[attr-defined]
    LOG.addHandler(fh)
    LOG.setLevel(logging.INFO)


def run_server(grid: Grid, settings: ServerSettings, *, run_id: int | None = None,
               register_exit: bool = False) -> FreeServer:
    server = FreeServer(grid, settings, run_id=run_id)
    _setup_logging(server.state)
    if register_exit:
        # flwr-serverapp turns SIGTERM/SIGINT (and its parent's death) into a graceful exit that
        # runs the registered exit handlers: stop training and checkpoint there.
        from flwr.supercore.exit import add_exit_handler
        add_exit_handler(server.shutdown)
    server.serve()
    return server


# --------------------------------------------------------------------------------------- apps

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: settings from the run config written by ``free-server start``."""
    settings = ServerSettings.from_run_config(dict(context.run_config))
    run_server(grid, settings, run_id=context.run_id, register_exit=True)


def make_server_app(settings: ServerSettings, on_done: Callable[[FreeServer], None] | None = None) -> ServerApp:
    """A ServerApp with ``settings`` baked in (simulation: run_simulation takes no run config)."""
    sim_app = ServerApp()

    @sim_app.main()
    def sim_main(grid: Grid, context: Context) -> None:
        server = run_server(grid, settings, run_id=context.run_id)
        if on_done is not None:
            on_done(server)

    return sim_app
