"""The free-dfml Flower ClientApp: answers the server's query with ONE model package.

The messages are those of :mod:`free_dfml.common.wire`. Deployment: the SuperNode's node config
names the package (``model-path``), the acknowledgement file (``ack-path``, where ``free-client
submit`` waits for it), ``verify`` (false: ``--no-verify``, the file is sent unchecked) and
``ready-path`` (a file where ``free-client submit`` writes the package's id once it has validated
it: the ClientApp waits for it, sends nothing before, and then reads the file's tensors without
torch, which keeps its process start short).
Simulation (``flwr run`` on a simulation federation): a virtual SuperNode has ``partition-id`` /
``num-partitions`` instead of a model path; it trains its own model on its own classes with the
run config's settings and publishes it (:func:`simulated_reply`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from free_dfml.common import wire
from free_dfml.common.files import atomic_write_bytes


def write_ack(msg: Message, context: Context) -> Message:
    """Store the server's acknowledgement where ``free-client submit`` waits for it."""
    path = context.node_config.get("ack-path")
    if path:
        atomic_write_bytes(Path(str(path)), json.dumps(wire.ack_document(msg), sort_keys=True).encode())
    return Message(RecordDict(), reply_to=msg)


# ------------------------------------------------------------------------------- deployment

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    path = context.node_config.get("model-path")
    if not path and "partition-id" in context.node_config:
        return simulated_reply(msg, context)
    if not path:
        return wire.error_reply(msg, "this SuperNode has no model-path in its node config")
    if context.node_config.get("verify") is False:
        return Message(wire.unverified_content(str(path)), reply_to=msg)
    ready = context.node_config.get("ready-path")
    if ready:
        model_id = wait_ready(Path(str(ready)))
        if model_id is None:
            return wire.error_reply(msg, "the client did not finish validating its package in time")
        reply = wire.checked_file_reply(msg, str(path), model_id)
        if reply is not None:
            return reply
    return wire.package_reply(msg, str(path))


READY_WAIT_S = 120.0


def wait_ready(path: Path, timeout: float = READY_WAIT_S) -> str | None:
    """The model id ``free-client submit`` writes to ``path`` once the package passed its checks."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            return str(json.loads(path.read_text())["model-id"])
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return None


@app.query(wire.ACK_ACTION)
def ack(msg: Message, context: Context) -> Message:
    return write_ack(msg, context)


def simulated_reply(msg: Message, context: Context) -> Message:
    """A virtual SuperNode of a simulation: train partition ``partition-id``'s model with the run
    config's client settings (:mod:`free_dfml.client.virtual_client`), then publish it."""
    from free_dfml.client.virtual_client import RUN_CONFIG_KEY, VirtualClients, train_partition
    from free_dfml.common.package import PackageError
    text = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(text, str):
        return wire.error_reply(msg, f"simulation run config has no '{RUN_CONFIG_KEY}' settings")
    try:
        pkg, _ = train_partition(VirtualClients.from_json(text), int(context.node_config["partition-id"]),
                                 int(context.node_config["num-partitions"]))
    except PackageError as e:
        return wire.error_reply(msg, f"client refused to send its model: {e}")
    return wire.package_reply(msg, pkg)
