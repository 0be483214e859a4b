"""Shared fixtures. Layers: tests/unit (no root), tests/golden (captures -> records), tests/lab
(root + real namespaces + real eBPF). Lab tests never skip silently: without root they fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the captures the tests read live in the repository, with their provenance (README.md there)
CAPTURES = REPO / "tests" / "captures"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def pcaps() -> Path:
    """The folder of test captures: tests/captures (copied public captures and generated ones)."""
    return CAPTURES


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab and eBPF tests need root (CI runs as root); run `sudo make test`")
