"""What every free-dfml command line shares: the one-line user error and the runner that turns any
failure into one line on stderr and a non-zero exit (never a traceback), plus address parsing.

Used by ``free-client``, ``free-server`` and ``free-sim`` alike, so it lives with neither side.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path

import typer


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2 (1 for runtime failures)."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


def parse_address(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s]+):(\d+)", address.strip())
    if not m:
        raise CliError(f"address must be HOST:PORT, got {address!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise CliError(f"port must be in 1..65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_certificate(path: Path, option: str) -> None:
    """``path`` must hold a PEM certificate that TLS can load (``--root-cert``, ``--tls-cert``,
    ``--tls-ca``); else a one-line :class:`CliError` naming the option and the file, before
    anything is started (a bad file would otherwise surface as a connection timeout)."""
    import ssl
    if not path.is_file():
        raise CliError(f"{option}: no such file: {path}")
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise CliError(f"{option} {path} is not a readable PEM certificate ({_ssl_reason(e)})") from None


def check_private_key(cert: Path, key: Path, option: str) -> None:
    """``key`` must be the unencrypted PEM private key of the certificate ``cert`` (checked first
    with :func:`check_certificate`); else a one-line :class:`CliError` naming the file."""
    import ssl
    if not key.is_file():
        raise CliError(f"{option}: no such file: {key}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=b"")   # an encrypted key fails, never prompts
    except (ssl.SSLError, OSError, ValueError) as e:
        raise CliError(f"{option} {key} is not the unencrypted PEM private key of {cert} "
                       f"({_ssl_reason(e)})") from None


def _ssl_reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
    return " ".join(str(reason).split())[:120]


def run_cli(typer_app: typer.Typer, prog: str, argv: list[str] | None = None) -> int:
    """Run a typer app with one-line errors (no tracebacks, no usage boxes)."""
    import click
    cmd = typer.main.get_command(typer_app)
    try:
        rv = cmd.main(args=argv if argv is not None else sys.argv[1:], prog_name=prog, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except CliError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print(f"{prog}: aborted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ").strip()
        print(f"{prog}: error: {msg} (see {prog} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback for the user
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"{prog}: error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
