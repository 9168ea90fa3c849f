"""The FREE ingest service: asks every node for its model, checks and stores the replies in the zoo,
acknowledges them, runs the trainer, and keeps ``status.json`` current. Plain Python over a
:class:`Grid` (Flower's ``Grid`` in the ServerApp, a fake one in the tests).

Loop (every ``poll-interval`` seconds), in the calling thread (the ServerApp's main thread):

1. ``grid.get_node_ids()``; every node not heard from yet gets a ``query`` message asking for its
   model (:func:`~free_dfml.common.wire.query_message`);
2. replies are pulled; each is checked with :func:`~free_dfml.common.wire.content_to_package`,
   stored with :meth:`Zoo.add` (an identical model gets its existing id), logged to
   ``submissions.jsonl``, and acknowledged (accepted + id, or rejected + reason);
   a query whose node has left for ``NODE_GONE_S`` is forgotten, and so is an unanswered ack;
3. once the zoo holds ``min-models`` models the FREE trainer starts in a background thread
   (:class:`~free_dfml.server.training_runner.TrainerRunner`), resuming the state folder's checkpoint;
4. ``status.json`` is rewritten (atomically) every ``status-every`` seconds.

Replies are pulled one message id per call in a small pool of worker threads, and a poll waits at
most ``PULL_WAIT_S`` for them: a reply whose upload stalled (its sender died half-way; Flower's
pull then waits for the missing objects until its push session expires) holds one worker, not
the loop, so other nodes are still asked, checked and acknowledged. A reply that Flower itself
turned into an error (its objects never arrived) is a transport failure, not the client's
answer: it is logged, not counted, and the node is asked again while it stays connected; so is a
node whose query has waited ``REASK_S``.

Every Flower call to the SuperLink goes through flwr's retry invoker, which retries a failed or
timed-out call (30 s per attempt) for as long as it takes. A watchdog thread therefore covers the
main loop while it waits: once a poll has lasted ``LINK_STALL_S`` seconds it keeps ``status.json``
current (training goes on; ``link.stalled_s`` says how long the SuperLink has not answered), and a
stop request during the wait stops training and checkpoints without waiting for the SuperLink.
The service stops on ``stop.request``, on :meth:`FreeServer.shutdown` (flwr's exit handler for
SIGTERM/SIGINT) and when the supervisor process is gone. After every poll that succeeded and every
reply it handled, it marks its progress in ``STATE/serverapp.alive`` (server/liveness.py): the
supervisor stops and resubmits a ServerApp that has made none for ``lost-after`` seconds. Flower's
task heartbeat sender in the ServerApp process, whose thread ends on an HTTP error it does not
retry (the SuperLink then fails the run 60 s later), is started again at the next poll.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Iterable, Protocol

from flwr.app import Message

from free_dfml.common.limits import applied, bounded_reason
from free_dfml.common.package import PackageError
from free_dfml.common.processes import pid_alive
from free_dfml.common.wire import (TRANSPORT_ERRORS, ack_message, content_to_package, describe_content,
                                   query_message)
from free_dfml.server.liveness import HeartbeatWatch, Liveness
from free_dfml.server.policy import admission_refusal
from free_dfml.server.settings import ServerSettings
from free_dfml.server.state import StateDir, build_status, read_json
from free_dfml.server.training_runner import TrainerRunner
from free_dfml.server.zoo import Zoo

LOG = logging.getLogger("free_dfml.server")
NODE_GONE_S = 60.0        # forget a pending query whose node has left for this long
LINK_STALL_S = 5.0        # a poll running this long counts as a stalled SuperLink link
REASK_S = 600.0           # a connected node whose query has had no reply this long is asked again
PULL_WAIT_S = 2.0         # a poll waits this long for its reply pulls; slower ones finish later
PULL_WORKERS = 8


class Grid(Protocol):
    """The part of Flower's ``flwr.serverapp.Grid`` the service uses."""

    def get_node_ids(self) -> Iterable[int]:
        """The nodes connected now."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send messages (``dst_node_id`` set); their ids, in order ("" for one not sent)."""

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived to these messages (``metadata.reply_to_message_id``)."""


class FreeServer:
    SHUTDOWN_WAIT_S = 150.0     # a second shutdown() caller waits this long for the first
    LINK_STALL_S = LINK_STALL_S

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
        self._last_error: str | None = None       # the last failed poll's error, until one succeeds
        self.liveness = Liveness(self.state, run_id)
        self.heartbeat = HeartbeatWatch()          # Flower's task heartbeat, restarted if it died
        self._watchdog: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(PULL_WORKERS, thread_name_prefix="free-pull")
        self._pulling: dict[str, Future] = {}     # message id -> its pull in flight

    # ------------------------------------------------------------------------------ replies
    def handle_reply(self, reply: Message, node_id: int) -> dict[str, Any]:
        """Check, store and log one reply under the configured admission caps (the max-* settings)."""
        with applied(self.settings.limits()):
            return self._handle_reply(reply, node_id)

    def _handle_reply(self, reply: Message, node_id: int) -> dict[str, Any]:
        self.replies += 1
        entry: dict[str, Any] = {"node": node_id}
        if reply.has_error():
            outcome = {"accepted": False, "reason": f"client error: {reply.error.reason}"}
        else:
            entry["wire"] = describe_content(reply.content)
            try:
                pkg = content_to_package(reply.content, max_bytes=self.settings.max_payload_bytes)
                dp = pkg.meta.dp or {}
                entry.update(arch=pkg.meta.arch, num_classes=pkg.meta.num_classes,
                             dp_epsilon=dp.get("epsilon"), dp_delta=dp.get("delta"))
                refusal = admission_refusal(pkg, self.settings, self.zoo)    # the operator's policy
                if refusal:
                    outcome = {"accepted": False, "category": refusal[0], "reason": refusal[1]}
                else:
                    model_id, new = self.zoo.add(pkg)
                    outcome = {"accepted": True, "model_id": model_id, "new": new}
            except PackageError as e:
                outcome = {"accepted": False, "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - never let one reply take the server down
                outcome = {"accepted": False, "reason": f"server could not store the model: {type(e).__name__}: {e}"}
        if "reason" in outcome:               # a client's error text may be megabytes of anything
            outcome["reason"] = bounded_reason(outcome["reason"])
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
            for reply in self._pull(list(self.pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in self.pending:
                    continue
                node_id, _ = self.pending.pop(mid)
                if reply.has_error() and reply.error.code in TRANSPORT_ERRORS:
                    # Flower's own error (the reply's objects never arrived): ask the node again
                    LOG.warning("node %s: reply lost in transport (%s); asking again", node_id,
                                bounded_reason(reply.error.reason, 200))
                    continue
                outcome = self.handle_reply(reply, node_id)
                self.liveness.beat()
                self.heard[node_id] = outcome
                ack_ids = list(self.grid.push_messages([ack_message(node_id, outcome)]))
                self.acks.update((a, now) for a in ack_ids if a)
        # forget queries to nodes that left; ask again a node that is still there but never answered
        for mid, (n, sent) in list(self.pending.items()):
            if now - self.node_last_seen.get(n, sent) > NODE_GONE_S or now - sent > REASK_S:
                del self.pending[mid]
        if self.acks:   # collect the (empty) ack replies so they do not pile up
            for r in self._pull(list(self.acks)):
                self.acks.pop(r.metadata.reply_to_message_id, None)
            for mid, sent in list(self.acks.items()):   # a node that left without answering its ack
                if now - sent > NODE_GONE_S:
                    del self.acks[mid]
        self.runner.maybe_start(force=self.collected())

    def _pull(self, message_ids: list[str]) -> list[Message]:
        """The replies that have arrived to ``message_ids``: one pull per id in the worker pool,
        waited for at most ``PULL_WAIT_S``; a pull still running is collected by a later poll."""
        for mid in message_ids:
            if mid not in self._pulling:
                self._pulling[mid] = self._pool.submit(lambda m=mid: list(self.grid.pull_messages([m])))
        wait([self._pulling[m] for m in message_ids], timeout=PULL_WAIT_S)
        out: list[Message] = []
        for mid in message_ids:
            fut = self._pulling[mid]
            if fut.done():
                del self._pulling[mid]
                try:
                    out += fut.result()
                except Exception as e:  # noqa: BLE001 - transient SuperLink trouble: pulled again next poll
                    LOG.warning("pulling the reply to %s failed: %s: %s", mid[:12], type(e).__name__, e)
        return out

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
        return {"last_ok": self._last_poll_ok, "last_error": self._last_error,
                "heartbeat_restarts": self.heartbeat.restarts,
                "stalled_s": round(waited, 1) if waited >= self.LINK_STALL_S else 0.0}

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
        """One ServerApp per state folder: an exclusive lock held until :meth:`serve` returns."""
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
        LOG.info("FREE server: state %s, %d model(s) in the zoo, %d Flower heartbeat sender(s) watched",
                 self.state.root, len(self.zoo), len(self.heartbeat.senders))
        self.write_status(force=True)
        self._watchdog = threading.Thread(target=self._watch, name="free-link-watchdog", daemon=True)
        self._watchdog.start()
        try:
            while not self.should_stop():
                if self.heartbeat.check():
                    LOG.warning("Flower's task heartbeat had stopped (an error it does not retry): started again")
                self._poll_since = time.time()
                try:
                    self.poll_once()
                    self._last_poll_ok, self._last_error = time.time(), None
                    self.liveness.beat()
                except Exception as e:  # noqa: BLE001 - transient SuperLink trouble: keep going
                    self._last_error = bounded_reason(f"{type(e).__name__}: {e}", 200)
                    LOG.error("poll failed: %s", self._last_error)
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
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._lock_file.close()      # releases the state folder's lock

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
