"""Flags every query command shares: where the aggregator is (and its token), and how to print.

In:  the parser of one command.  Out: its `connection` and `output` flag groups; at run time an
`ApiClient` built from flags > environment > config file (eastwest/client.py) and the stream the
results go to, with colour decided once (eastwest/output.py).

Stdout carries results only, and only the results of a query that succeeded: `results()` holds
what a command writes until the command is done, so a failure at any point (the first request,
a later page, a body of the wrong shape, a bad line of a file) leaves stdout empty and says why
on stderr alone (`eastwest flows -o json | jq length` never reads `[]` for an unreachable
aggregator). Live sources (`--follow`, `--input-file -`) are the exception by nature: each flow
is written when it arrives, so a failure after some flows leaves those lines (whole lines).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from eastwest.client import DEFAULT_SERVER, SERVER_ENV, TOKEN_ENV, ApiClient, resolve_settings
from eastwest.output import COLOR_MODES, color_enabled

CONNECTION_HELP = (f"Server and token come from these flags, else ${SERVER_ENV} / ${TOKEN_ENV}, "
                   "else ~/.config/eastwest/config.yaml (keys: server, token, token_file, "
                   f"ca_file, timeout), else {DEFAULT_SERVER} without a token.")


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("aggregator", CONNECTION_HELP)
    g.add_argument("--server", metavar="URL", help=f"aggregator URL (default {DEFAULT_SERVER})")
    g.add_argument("--token", metavar="TOKEN",
                   help=f"read token (prefer ${TOKEN_ENV} or --token-file: flags show in ps)")
    g.add_argument("--token-file", metavar="FILE",
                   help=f"file with the read token (bare, or {TOKEN_ENV}=... / "
                   "EASTWEST_READ_TOKEN=...)")
    g.add_argument("--config", metavar="FILE",
                   help="config file (default ~/.config/eastwest/config.yaml)")
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify an https aggregator")
    g.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for an answer "
                   "(default 10)")


def add_output_flags(p: argparse.ArgumentParser, formats: tuple[str, ...],
                     default: str = "table") -> None:
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", choices=formats, default=default, metavar="FORMAT",
                   help=f"one of {', '.join(formats)} (default {default})")
    g.add_argument("--color", choices=COLOR_MODES, default="auto",
                   help="colour: auto (only on a terminal, never with NO_COLOR), always, never")


def client_from_args(args: argparse.Namespace) -> ApiClient:
    settings = resolve_settings(server=args.server, token=args.token, token_file=args.token_file,
                                config=args.config, ca_file=args.ca_file, timeout=args.timeout)
    return ApiClient(settings)


HELD_IN_MEMORY = 8 << 20  # held results beyond this wait in an unlinked temporary file


@contextmanager
def results(args: Any, *, live: bool = False) -> Iterator[tuple[TextIO, bool]]:
    """Where a query command writes its results, and whether in colour (decided for stdout).

    What is written reaches stdout when the block ends without an exception, and never
    otherwise; `live` writes straight to stdout (a stream: each flow as it arrives)."""
    out = sys.stdout
    color = color_enabled(out, getattr(args, "color", "auto"))
    if live:
        yield out, color
        return
    spool = tempfile.SpooledTemporaryFile(max_size=HELD_IN_MEMORY)  # noqa: SIM115 (closed below)
    with io.TextIOWrapper(spool, encoding="utf-8", errors="surrogateescape", newline="") as held:
        yield held, color
        held.seek(0)
        shutil.copyfileobj(held, out)
    out.flush()
