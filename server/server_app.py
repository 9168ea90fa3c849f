"""The FREE Flower ServerApp: glue between Flower's Grid and the ingest service (server/service.py).

One ServerApp serves deployment (``free-server start`` -> ``flwr run``; settings from the run
config) and simulation (``free-sim`` -> :func:`make_server_app` with the settings baked in).
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from free_dfml.server.service import FreeServer, run_server
from free_dfml.server.settings import ServerSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: settings from the run config written by ``free-server start``."""
    settings = ServerSettings.from_run_config(dict(context.run_config))
    run_server(grid, settings, run_id=context.run_id, register_exit=True)


def make_server_app(settings: ServerSettings, on_done: Callable[[FreeServer], None] | None = None) -> ServerApp:
    """A ServerApp with ``settings`` baked in (simulation: the settings do not travel as a run config)."""
    sim_app = ServerApp()

    @sim_app.main()
    def sim_main(grid: Grid, context: Context) -> None:
        server = run_server(grid, settings, run_id=context.run_id)
        if on_done is not None:
            on_done(server)

    return sim_app
