"""`eastwest aggregator`: central ingest, correlation, store, graph and API."""

from __future__ import annotations

from typing import Any

from eastwest.cli._pending import register_pending


def register(sub: Any) -> None:
    register_pending(sub, "aggregator", "central ingest, correlation, store, graph and API", 5)
