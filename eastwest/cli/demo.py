"""`eastwest demo`: lab + collectors + aggregator with live traffic."""

from __future__ import annotations

from typing import Any

from eastwest.cli._pending import register_pending


def register(sub: Any) -> None:
    register_pending(sub, "demo", "lab + collectors + aggregator with live traffic", 5)
