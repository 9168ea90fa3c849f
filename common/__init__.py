"""free_dfml.common: what client and server share (architectures, model packages, data, evaluation)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("free-dfml")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
