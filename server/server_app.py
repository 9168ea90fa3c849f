"""The FREE Flower ServerApp: glue between Flower's Grid and the ingest service (server/service.py).

The same ``app`` serves a deployment (``free-server start`` -> ``flwr run`` on the server's
SuperLink) and a simulation (``free-sim`` -> ``flwr run`` on a simulation SuperLink); its settings
come from the run config (:meth:`ServerSettings.from_run_config`).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from free_dfml.server.service import run_server
from free_dfml.server.settings import ServerSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Settings from the run config; stop and checkpoint on flwr's exit signals."""
    settings = ServerSettings.from_run_config(dict(context.run_config))
    run_server(grid, settings, run_id=context.run_id, register_exit=True)
