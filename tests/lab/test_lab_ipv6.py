"""The lab in `--ip-family ipv6`: IPv6 pods over an IPv6 underlay (the VXLAN's VTEPs are IPv6).
One lab and one run of the demo application for the module (tests/lab/ipfamily.py), checked as
exactly as the IPv4 lab tests check theirs: the truth against the servers, the socket probes,
the wire view and the aggregator."""

from __future__ import annotations

import pytest

from tests.lab import ipfamily

pytestmark = [pytest.mark.lab, pytest.mark.bpf]


@pytest.fixture(scope="module")
def run(lab_factory, tmp_path_factory):
    lab = lab_factory(name="ewsix", hosts=3, pods_per_host=2, ip_family="ipv6")
    yield from ipfamily.run_once(lab, tmp_path_factory.mktemp("ewsix"), seed=61)


def test_inventory_and_truth_are_ipv6(run):
    inv = run.lab.inventory
    assert (inv["ip_family"], inv["underlay_family"]) == ("ipv6", 6)
    assert all(h["underlay_ip"].startswith("fd00:ed::") for h in inv["hosts"])
    assert all(p["ip"] == p["ip6"] and p["ip4"] is None for p in inv["pods"])
    assert {t["family"] for t in run.truth} == {6}
    ipfamily.check_truth_against_ledger(run)


def test_socket_probes_exact_on_ipv6(run):
    ipfamily.check_socket_probes(run)


def test_wire_exact_on_an_ipv6_underlay(run):
    ipfamily.check_wire(run)


def test_aggregator_graph_and_flows_exact_on_ipv6(run):
    ipfamily.check_aggregator(run)


def test_aggregator_without_a_map_names_ipv6_ends_by_their_observers(run, tmp_path):
    ipfamily.check_names_without_a_map(run, tmp_path)
