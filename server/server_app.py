"""The FREE Flower ServerApp: glue between Flower's Grid and the ingest service (server/service.py).

The same ``app`` serves a deployment (``free-server start`` -> ``flwr run`` on the server's
SuperLink) and a simulation (``free-sim`` -> ``flwr run`` on a simulation SuperLink); its settings
come from the run config (:meth:`ServerSettings.from_run_config`). :func:`run_server` sets up the
ServerApp process around the service: its log file, Flower's object-pull backoff, and the exit
handler that stops training and checkpoints on Flower's exit signals.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from free_dfml.server.service import LOG, FreeServer
from free_dfml.server.settings import ServerSettings
from free_dfml.server.state import StateDir

LOG_BYTES = 10 * 2 ** 20     # logs/serverapp.log rotates at this size, LOG_BACKUPS kept
LOG_BACKUPS = 3

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Settings from the run config; stop and checkpoint on flwr's exit signals."""
    settings = ServerSettings.from_run_config(dict(context.run_config))
    run_server(grid, settings, run_id=context.run_id, register_exit=True)


def setup_logging(state: StateDir, *, flower: bool = False) -> None:
    """The service's log goes to ``STATE/logs/serverapp.log``, rotated by size (once per process).
    ``flower``: Flower's own log lines in this process go there too, and so does any uncaught
    exception (a deployed ServerApp's output is otherwise discarded by Flower's SuperExec)."""
    state.logs_dir.mkdir(parents=True, exist_ok=True)
    if any(getattr(h, "_free_dfml", False) for h in LOG.handlers):
        return
    fh = logging.handlers.RotatingFileHandler(state.logs_dir / "serverapp.log", maxBytes=LOG_BYTES,
                                              backupCount=LOG_BACKUPS, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    fh._free_dfml = True  # type: ignore[attr-defined]
    LOG.addHandler(fh)
    LOG.setLevel(logging.INFO)
    if flower:
        logging.getLogger("flwr").addHandler(fh)

        def uncaught(kind, value, tb, _prev=sys.excepthook):
            LOG.critical("uncaught exception", exc_info=(kind, value, tb))
            _prev(kind, value, tb)
        sys.excepthook = uncaught
        threading.excepthook = lambda a: LOG.critical("uncaught exception in thread %s", a.thread,
                                                      exc_info=(a.exc_type, a.exc_value, a.exc_traceback))


def short_object_pull_backoff(initial: float = 0.1, cap: float = 1.0) -> None:
    """Flower pulls a message's objects with an exponential backoff from 1 s to 10 s while they are
    still being uploaded, so a reply pulled just before its upload finished waited up to 15 s
    more; retry from 0.1 s, capped at 1 s (the number of tries and the total time are Flower's)."""
    from flwr.supercore.inflatable import inflatable_utils
    inflatable_utils.pull_objects.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap)


def run_server(grid, settings: ServerSettings, *, run_id: int | None = None,
               register_exit: bool = False) -> FreeServer:
    if register_exit:                   # in a Flower ServerApp process
        short_object_pull_backoff()
    server = FreeServer(grid, settings, run_id=run_id)
    setup_logging(server.state, flower=bool(settings.supervisor_pid))
    if register_exit:
        # flwr-serverapp turns SIGTERM/SIGINT (and its parent's death, and a runtime token the
        # SuperLink refuses) into a graceful exit that runs the registered exit handlers: stop
        # training and checkpoint there, before Flower's 5 s force-exit timer starts (a checkpoint
        # can take longer; runner.stop bounds the wait)
        from flwr.supercore.exit import add_exit_handler
        add_exit_handler(server.shutdown, run_before_force_exit=True)
    server.serve()
    return server
