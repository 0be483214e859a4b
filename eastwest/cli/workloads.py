"""`eastwest workloads`: workloads with upstreams and downstreams."""

from __future__ import annotations

from typing import Any

from eastwest.cli._pending import register_pending


def register(sub: Any) -> None:
    register_pending(sub, "workloads", "workloads with upstreams and downstreams", 9)
