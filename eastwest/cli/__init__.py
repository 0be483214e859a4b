"""The `eastwest` command.

Each subcommand lives in its own module here (`eastwest/cli/<name>.py`) with a
`register(subparsers)` that declares its flags and a handler that imports its component only
when it runs: `eastwest flows --help` never imports bcc or scapy.

Exit codes: 0 success, 1 the work failed (a clear one-line error on stderr), 2 usage error
(argparse, or a ConfigError naming the flag and its value), 130 interrupted. Stdout carries
results only: a query command that fails prints nothing there (eastwest/cli/_common.py
`results`; a live stream keeps the whole lines it printed before).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from eastwest import __version__
from eastwest.errors import ConfigError, EastwestError

SUBCOMMANDS = ("collector", "aggregator", "flows", "graph", "workloads", "top", "diff", "lab", "demo",
               "completion")

DESCRIPTION = """\
eastwest: see which service talks to which, how much, how well and since when.

  collector   per-host agent: eBPF socket probes and VXLAN capture -> flow records
  aggregator  central service: ingest, one edge per connection, store, graph, web API
  flows       query stored and live flows with filters
  graph       the service dependency graph of a window
  workloads   workloads with their upstreams and downstreams
  top         top talkers by bytes, connections, failures or retransmits
  diff        what changed between two windows
  lab         build a multi-host lab in network namespaces, drive it, record ground truth
  demo        the lab with collectors and an aggregator: live cross-host traffic in a minute
  completion  shell completion for bash or zsh

Run `eastwest <command> --help` for each command's flags."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eastwest", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"eastwest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of the commands above")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"eastwest.cli.{name}")
        module.register(sub)
    sub._choices_actions = []  # the description lists them once, aligned; not a second time
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but a flag a subcommand does not know is reported by that subcommand, with
    its usage (`eastwest flows: error: unrecognized arguments: --bogus`), exit 2."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = parser
        for token in sys.argv[1:] if argv is None else argv:  # descend: eastwest lab up ...
            subs = [a for a in target._actions if isinstance(a, argparse._SubParsersAction)]
            if subs and token in subs[0].choices:
                target = subs[0].choices[token]
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `eastwest ... | head`: the reader left, not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("eastwest: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:  # a flag or setting with a bad value: a usage error
        print(f"eastwest {args.command}: {exc}", file=sys.stderr)
        return 2
    except EastwestError as exc:
        print(f"eastwest {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
