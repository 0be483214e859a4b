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

SUBCOMMANDS = ("collector", "aggregator", "flows", "graph", "workloads", "top", "diff", "policy",
               "lab", "demo", "completion")

DESCRIPTION = """\
eastwest: see which service talks to which, how much, how well and since when.

  collector   per-host agent: eBPF socket probes and VXLAN capture -> flow records
  aggregator  central service: ingest, one edge per connection, store, graph, web API
  flows       query stored and live flows with filters
  graph       the service dependency graph of a window
  workloads   workloads with their upstreams and downstreams
  top         top talkers by bytes, connections, failures, resets or retransmits
  diff        what changed between two windows
  policy      Kubernetes NetworkPolicy: check a set against traffic, suggest one from it
  lab         build a multi-host lab in network namespaces, drive it, record ground truth
  demo        the lab with collectors and an aggregator: live cross-host traffic in a minute
  completion  shell completion for bash or zsh

Run `eastwest <command> --help` for each command's flags."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, that command's flags and the others' names alone
    (a command's module, and what it imports, is loaded only when it runs: `collector --pcap`
    does not pay for the HTTP client of `flows`)."""
    parser = argparse.ArgumentParser(
        prog="eastwest", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"eastwest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of the commands above")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)  # a name only: this run is `only`
            continue
        module = importlib.import_module(f"eastwest.cli.{name}")
        module.register(sub)
    sub._choices_actions = []  # the description lists them once, aligned; not a second time
    return parser


def _target(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)parser that parses the end of `argv`: `eastwest lab up ...` -> `lab up`'s."""
    target = parser
    for token in argv:
        subs = [a for a in target._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            target = subs[0].choices[token]
    return target


def _dash_choices(parser: argparse.ArgumentParser) -> dict[str, frozenset[str]]:
    """Flags whose closed set of values has values that start with `-` (`--sort -bytes`)."""
    return {o: frozenset(str(c) for c in a.choices if str(c).startswith("-"))
            for a in parser._actions if a.choices and a.option_strings and a.nargs is None
            for o in a.option_strings if any(str(c).startswith("-") for c in a.choices)}


def join_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`--sort -bytes` as `--sort=-bytes`. argparse reads a separate value that starts with `-`
    as a flag (`expected one argument`), so for a flag whose choices start with `-` (or an
    unambiguous prefix of it, `--so`), the word after it is joined to it when it is one of
    them, or when it is no flag of the command either (`--sort -bogus` is then refused as an
    invalid choice, naming the choices). A flag after it (`--sort --limit 2`) and everything
    after `--` are left as they are."""
    target = _target(parser, argv)
    dashed = _dash_choices(target)
    if not dashed:
        return list(argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return out + list(argv[i:])
        flag = token if token in dashed else _long_prefix(target, token)
        if flag in dashed and i + 1 < len(argv) and (
                argv[i + 1] in dashed[flag] or _unknown_dashed(target, argv[i + 1])):
            out.append(f"{flag}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _unknown_dashed(parser: argparse.ArgumentParser, token: str) -> bool:
    """A word with a leading `-` that is no flag of `parser` (`-bogus`; not `-o`, `-ojson`,
    `--lim`, `--limit=2`)."""
    if not token.startswith("-") or token == "-":
        return False
    name = token.partition("=")[0]
    return not (
        name in parser._option_string_actions or _long_prefix(parser, name) is not None
        or (not token.startswith("--") and token[:2] in parser._option_string_actions))


def _long_prefix(parser: argparse.ArgumentParser, token: str) -> str | None:
    """The long flag `token` abbreviates (argparse's allow_abbrev), when exactly one."""
    if not token.startswith("--") or "=" in token:
        return None
    hits = [o for o in parser._option_string_actions if o.startswith(token)]
    return hits[0] if len(hits) == 1 else None


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but a flag a subcommand does not know is reported by that subcommand, with
    its usage (`eastwest flows: error: unrecognized arguments: --bogus`), exit 2; and a value
    with a leading `-` of a flag that has such choices is taken as written (`--sort -bytes`)."""
    argv = join_dash_values(parser, sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        _target(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def command_of(argv: Sequence[str]) -> str | None:
    """The command `argv` runs (its first word that is no flag), when it is one of ours."""
    first = next((t for t in argv if not t.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(command_of(sys.argv[1:] if argv is None else argv))
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
