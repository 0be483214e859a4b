"""Shared fixtures. Layers: tests/unit (no root), tests/golden (captures -> records), tests/lab
(root + real namespaces + real eBPF), tests/image (root + podman: the container image built and
run as deployed). Lab and image tests never skip silently: without root they fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _no_neighbour_resolution() -> None:
    """A frame built in a test never asks the network for a MAC address: scapy fills an unset
    Ether destination by sending an ARP request or an IPv6 neighbour solicitation on this host's
    real interfaces and waiting for an answer (slow, and traffic outside the lab). Without its
    resolvers an unset destination is the broadcast address; tests that care set their MACs."""
    import scapy.layers.l2  # noqa: F401 - creates conf.neighbor
    from scapy.config import conf

    conf.neighbor.resolve = lambda l2, l3: None  # resolvers registered later never run


_no_neighbour_resolution()
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


def pytest_collection_finish(session: pytest.Session) -> None:
    """The container image's first build (~90 s of mostly waiting on dpkg, pip and podman)
    starts in the background as soon as the suite is collected, when tests/image is part of it:
    it overlaps the modules before it, and tests/image waits for it (tests/image/build.py)."""
    if session.config.option.collectonly or session.config.option.setupplan:
        return
    if any(item.nodeid.startswith("tests/image/") for item in session.items):
        from tests.image import build

        build.start_early()
