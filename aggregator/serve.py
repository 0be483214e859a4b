"""Runs the aggregator app under uvicorn, programmatically, until SIGINT/SIGTERM.

In:  `AggregatorSettings`.  Out: a serving process; exit code 0 after a clean stop (the store is
closed by the app's lifespan, so every acknowledged batch is on disk before exit).
"""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings

SWITCH_INTERVAL_S = 0.0005


def serve(settings: AggregatorSettings, *, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s aggregator %(levelname)s %(message)s")
    # The ack path (uvicorn, decode, DuckDB insert) releases the GIL for most of its work and
    # needs it back often; the correlation worker runs Python without pause. At CPython's
    # default 5 ms switch interval every hand-back waited up to 5 ms: 0.5 ms doubled the
    # acknowledged rate (bench/bench_transport.py, docs/benchmarks.md).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info" if verbose else "warning",
        access_log=verbose, ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None, lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    print(f"eastwest aggregator: serving {settings.base_url} (data in {settings.data_dir}, "
          f"API docs {settings.base_url}/docs)", file=sys.stderr, flush=True)
    run_until_stopped(server)
    return 0


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown (see run_until_stopped)."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped


def run_until_stopped(server: uvicorn.Server) -> None:
    """Run until SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes). uvicorn shuts down gracefully
    (the lifespan closes the store), then re-raises the signal it stopped on; that is our
    normal, clean end, so it ends here and the command exits 0, not 130 or -15."""
    before = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, before)
