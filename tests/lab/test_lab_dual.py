"""The lab in `--ip-family dual`: pods with an IPv4 and an IPv6 address over an IPv4 underlay;
the demo application calls over both (each load generator connection's call tree over one
family, drawn from the seed). One lab and one run for the module (tests/lab/ipfamily.py),
checked as exactly as the IPv4 lab tests: the truth against the servers, the socket probes, the
wire view and the aggregator, whose edges join a pod's two addresses into one workload."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.lab import ipfamily

pytestmark = [pytest.mark.lab, pytest.mark.bpf]


@pytest.fixture(scope="module")
def run(lab_factory, tmp_path_factory):
    lab = lab_factory(name="ewdual", hosts=3, pods_per_host=2, ip_family="dual")
    yield from ipfamily.run_once(lab, tmp_path_factory.mktemp("ewdual"), seed=62)


def test_both_families_on_every_edge_and_the_truth_says_which(run):
    inv = run.lab.inventory
    assert (inv["ip_family"], inv["underlay_family"]) == ("dual", 4)
    assert all(p["ip"] == p["ip4"] and p["ip6"] for p in inv["pods"])
    per_edge = Counter((t["client_pod"], t["server_pod"], t["protocol"], t["family"])
                       for t in run.truth if t["outcome"] != "refused")
    for c, s, proto, _ in list(per_edge):
        assert per_edge[(c, s, proto, 4)] and per_edge[(c, s, proto, 6)], (c, s, proto)
    ipfamily.check_truth_against_ledger(run)


def test_socket_probes_exact_on_both_families(run):
    ipfamily.check_socket_probes(run)


def test_wire_exact_for_both_inner_families(run):
    ipfamily.check_wire(run)


def test_aggregator_one_edge_per_workload_pair_over_both_families(run):
    ipfamily.check_aggregator(run)


def test_aggregator_without_a_map_names_both_families_by_their_observers(run, tmp_path):
    ipfamily.check_names_without_a_map(run, tmp_path)
