"""Runs the aggregator app under uvicorn, programmatically, until SIGINT/SIGTERM.

In:  `AggregatorSettings`.  Out: a serving process; exit code 0 after a clean stop (the store is
closed by the app's lifespan, so every acknowledged batch is on disk before exit).

The listening socket is bound first, before the store is opened and before "serving" is
printed, and handed to uvicorn: an address already in use (another aggregator), not on this
host, or refused is one line naming `--listen` (eastwest.errors.BusyError / ConfigError, exit 1
or 2 through eastwest/cli), never "serving ..." followed by uvicorn's `[Errno 98]`.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
from dataclasses import replace

import uvicorn

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from eastwest.errors import BusyError, ConfigError

SWITCH_INTERVAL_S = 0.0005
LISTEN_BACKLOG = 2048  # uvicorn's default


def bind(host: str, port: int) -> socket.socket:
    """The listening socket of `--listen host:port` (as uvicorn would bind it: SO_REUSEADDR,
    IPv6 when the host is an IPv6 address), or an error naming the flag and what to do."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)  # now: a second aggregator's bind fails here, not later
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BusyError(f"--listen {where}: address already in use (another aggregator? "
                            f"`ss -ltnp 'sport = :{port}'`)") from None
        if exc.errno == errno.EACCES:
            raise BusyError(f"--listen {where}: permission denied (a port below 1024 needs root "
                            "or CAP_NET_BIND_SERVICE)") from None
        if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            raise ConfigError("--listen", where, "not an address of this host") from None
        raise BusyError(f"--listen {where}: cannot listen: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def serve(settings: AggregatorSettings, *, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s aggregator %(levelname)s %(message)s")
    sock = bind(settings.host, settings.port)
    if settings.port == 0:  # an ephemeral port: say which one
        settings = replace(settings, port=sock.getsockname()[1])
    # The ack path (uvicorn, decode, DuckDB insert) releases the GIL for most of its work and
    # needs it back often; the correlation worker runs Python without pause. At CPython's
    # default 5 ms switch interval every hand-back waited up to 5 ms: 0.5 ms doubled the
    # acknowledged rate (bench/bench_transport.py, docs/benchmarks.md).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        app = create_app(settings)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port,
            log_level="info" if verbose else "warning", access_log=verbose,
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None, lifespan="on",
            timeout_graceful_shutdown=10,
        )
        server = uvicorn.Server(config)
        print(f"eastwest aggregator: serving {settings.base_url} (data in {settings.data_dir}, "
              f"API docs {settings.base_url}/docs)", file=sys.stderr, flush=True)
        run_until_stopped(server, sock)
    finally:
        sock.close()
    return 0


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown (see run_until_stopped)."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped


def run_until_stopped(server: uvicorn.Server, sock: socket.socket | None = None) -> None:
    """Run until SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes). uvicorn shuts down gracefully
    (the lifespan closes the store), then re-raises the signal it stopped on; that is our
    normal, clean end, so it ends here and the command exits 0, not 130 or -15."""
    before = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run(sockets=None if sock is None else [sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, before)
