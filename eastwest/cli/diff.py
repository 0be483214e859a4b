"""`eastwest diff`: what changed between two windows."""

from __future__ import annotations

from typing import Any

from eastwest.cli._pending import register_pending


def register(sub: Any) -> None:
    register_pending(sub, "diff", "what changed between two windows", 9)
