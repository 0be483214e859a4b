"""Shared fixtures. Layers: tests/unit (no root), tests/golden (captures -> records), tests/lab
(root + real namespaces + real eBPF). Lab tests never skip silently: without root they fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# CI lays shared/ beside the clone; EASTWEST_PCAPS points elsewhere when it is not
PCAPS = Path(os.environ.get("EASTWEST_PCAPS", REPO.parent / "shared" / "pcaps"))
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def pcaps() -> Path:
    if not PCAPS.is_dir():
        pytest.fail(f"the shared captures are missing: {PCAPS}")
    return PCAPS


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab and eBPF tests need root (CI runs as root); run `sudo make test`")
