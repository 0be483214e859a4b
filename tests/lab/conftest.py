"""Fixtures for lab tests: real namespaces, real processes, torn down even when a test fails.

Lab tests need root. Without it they FAIL (never skip): CI runs as root, and a lab layer that
quietly skipped would prove nothing."""

from __future__ import annotations

import pytest

from tests.conftest import require_root


@pytest.fixture(scope="module")
def lab_factory():
    """Builds labs on demand (`lab_factory(name=..., hosts=...)`), removes them all afterwards."""
    require_root()
    from eastwest.lab import Lab

    made: list[str] = []

    def make(**kwargs):
        name = kwargs.setdefault("name", "ewtest")
        Lab.down_by_name(name)  # a crashed earlier run must not break this one
        made.append(name)
        return Lab.up(**kwargs)

    yield make
    for name in made:
        Lab.down_by_name(name)
