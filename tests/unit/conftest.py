"""Guards for the unit tests."""

from __future__ import annotations

import pytest

import aggregator.correlate as correlate_module


@pytest.fixture(autouse=True)
def _correlator_ids_restored():
    """The reference correlator draws connection ids from `aggregator.correlate.uuid`; the
    differential tests put a counter in its place (tests/unit/correlate_workloads.py `Pair`).
    Whatever a test leaves there is put back, so later tests get random ids again (counter ids
    made a later test's connections collide with ids told before)."""
    saved = correlate_module.uuid
    yield
    correlate_module.uuid = saved
