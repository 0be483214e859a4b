"""Registers a subcommand whose component has not landed yet: it says which issue brings it
and exits 1, so nobody mistakes it for a working command."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register_pending(sub: Any, name: str, summary: str, issue: int) -> None:
    p = sub.add_parser(name, help=summary, description=f"{summary}\n\nNot in this build yet: "
                       f"it arrives with issue #{issue}.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(_args: argparse.Namespace) -> int:
        print(f"eastwest {name}: not available in this build yet (issue #{issue})", file=sys.stderr)
        return 1

    p.set_defaults(func=run)
