"""`eastwest top`: top talkers over a window."""

from __future__ import annotations

from typing import Any

from eastwest.cli._pending import register_pending


def register(sub: Any) -> None:
    register_pending(sub, "top", "top talkers over a window", 9)
