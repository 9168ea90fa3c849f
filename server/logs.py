"""The server's log files in ``STATE/logs/``: a child process's output copied line by line to a
size-rotated file (``superlink.log``), and the supervisor's own lines (``server.log``, also on
stdout). The ServerApp's log (``serverapp.log``) is set up in its process (server/server_app.py)."""

from __future__ import annotations

import logging
import logging.handlers
import threading
import time
from pathlib import Path

from free_dfml.server.state import StateDir

LOG_BYTES = 10 * 2 ** 20         # a copied log rotates at this size, LOG_BACKUPS kept
LOG_BACKUPS = 3


def rotating_log(path: Path, max_bytes: int = LOG_BYTES, backups: int = LOG_BACKUPS) -> logging.Logger:
    """A logger writing bare lines to ``path``, rotated by size (``path.1`` ... ``path.N``)."""
    lg = logging.getLogger(f"free_dfml.file.{path}")
    if not lg.handlers:
        h = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        h.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg


def copy_lines(stream, path: Path) -> threading.Thread:
    """A daemon thread copying ``stream``'s lines (a child's stdout) to a size-rotated log file."""
    lg = rotating_log(path)

    def run() -> None:
        for raw in iter(stream.readline, b""):
            lg.info(raw.decode("utf-8", "replace").rstrip("\n"))
        stream.close()
    t = threading.Thread(target=run, name=f"log-{path.name}", daemon=True)
    t.start()
    return t


def log(state: StateDir, msg: str) -> None:
    """A line on stdout and in ``STATE/logs/server.log``."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}"
    print(line, flush=True)
    try:
        with open(state.logs_dir / "server.log", "a") as f:
            f.write(line + "\n")
    except OSError:
        pass
