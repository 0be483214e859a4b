"""`--dns` values: `scoped` becomes every --netns given by name (an inode cannot be opened by
name), duplicates are dropped in order, and bad values name their flag."""

from __future__ import annotations

import argparse

import pytest

from collector.main import dns_specs
from eastwest.errors import ConfigError


def args(dns: list[str], netns: list[str], timeout: float = 5.0, top: int = 10):
    return argparse.Namespace(dns=dns, netns=netns, dns_timeout=timeout, dns_top_names=top)


def test_scoped_expands_to_the_named_namespaces_in_order_once() -> None:
    got = dns_specs(args(["ewlab-h1-p1", "scoped", "ewlab-h1/eth0"],
                         ["ewlab-h1", "4026532000", "ewlab-h1-p1"]))
    assert got == ["ewlab-h1-p1", "ewlab-h1", "ewlab-h1/eth0"]


@pytest.mark.parametrize("a, flag", [
    (args(["scoped"], ["4026532000"]), "--dns"), (args(["x"], [], timeout=0), "--dns-timeout"),
    (args(["x"], [], top=0), "--dns-top-names")])
def test_bad_values_name_their_flag(a, flag) -> None:
    with pytest.raises(ConfigError) as err:
        dns_specs(a)
    assert err.value.key == flag
