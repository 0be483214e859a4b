"""`eastwest flows`: query stored and live flows."""

from __future__ import annotations

from typing import Any

from eastwest.cli._pending import register_pending


def register(sub: Any) -> None:
    register_pending(sub, "flows", "query stored and live flows", 9)
