"""Flags every query command shares: where the aggregator is (and its token), and how to print.

In:  the parser of one command.  Out: its `connection` and `output` flag groups; at run time an
`ApiClient` built from flags > environment > config file (eastwest/client.py) and the output
stream with colour decided once (eastwest/output.py).
"""

from __future__ import annotations

import argparse
import sys
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


def stdout_and_color(args: Any) -> tuple[TextIO, bool]:
    out = sys.stdout
    return out, color_enabled(out, getattr(args, "color", "auto"))
