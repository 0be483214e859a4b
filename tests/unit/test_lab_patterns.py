"""The lab's network patterns (`lab up --pattern`): parsing, refused combinations, and what
each pattern changes in the plan, decided before anything is built (no root)."""

from __future__ import annotations

import os

import pytest

from eastwest.cli import main
from eastwest.errors import ConfigError
from eastwest.lab.lab import workload_map
from eastwest.lab.patterns import parse
from eastwest.lab.plan import make_plan


def test_parse_takes_repeats_and_comma_lists_sorted_once():
    assert parse(None) == ()
    assert parse(["macvlan"]) == ("macvlan",)
    assert parse(["ipsec,host-network", "ipsec"]) == ("host-network", "ipsec")
    assert parse(["mesh"]) == ("mesh",)


@pytest.mark.parametrize(("values", "says"), [
    (["foo"], "unknown pattern; one of macvlan, host-network, ipsec, mesh"),
    (["mesh,macvlan"], "mesh with macvlan is not built"),
    (["host-network", "mesh"], "no pod namespace for a sidecar"),
    (["mesh,ipsec"], "mesh with ipsec is not built"),
    (["macvlan,"], "an empty pattern name"),
    (["macvlan", "host-network"], "cannot reach its own host"),
    (["ipsec,macvlan"], "no overlay between hosts to encrypt"),
])
def test_bad_patterns_name_the_flag_and_why(values, says):
    with pytest.raises(ConfigError) as err:
        parse(values)
    assert err.value.key == "--pattern" and says in err.value.reason


@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(ip_family="ipv6", patterns=("macvlan",)), "IPv4"),
    (dict(ip_family="dual", patterns=("ipsec",)), "IPv4"),
    (dict(services=True, patterns=("macvlan",)), "bypass their host's iptables"),
    (dict(services=True, patterns=("host-network",)), "not built"),
    (dict(ip_family="ipv6", patterns=("mesh",)), "IPv4"),
    (dict(ip_family="dual", services=False, patterns=("mesh",)), "IPv4"),
])
def test_patterns_refuse_what_they_cannot_be_combined_with(kwargs, says):
    with pytest.raises(ConfigError) as err:
        make_plan("ewp", 3, 3, 4789, **kwargs)
    assert err.value.key == "--pattern" and says in err.value.reason


def test_an_unknown_or_incompatible_pattern_exits_2_before_anything_is_built(capsys):
    for args in (["--pattern", "foo"], ["--pattern", "macvlan,ipsec"],
                 ["--pattern", "mesh", "--pattern", "ipsec"]):
        assert main(["lab", "up", "--name", "ewnever", *args]) == 2, args
        assert "--pattern" in capsys.readouterr().err
    assert not os.path.exists("/run/eastwest/lab/ewnever")


def test_no_pattern_leaves_the_default_lab_as_it_was():
    plain, none = make_plan("ewd", 3, 2, 4789), make_plan("ewd", 3, 2, 4789, patterns=())
    assert plain.inventory() == none.inventory()
    inv = plain.inventory()
    assert "patterns" not in inv and "attach" not in inv["pods"][0] and plain.overlay
    assert [h.underlay_prefix for h in plain.hosts] == [24, 24, 24]


def test_macvlan_pods_live_on_the_underlay_subnet():
    plan = make_plan("ewmv", 3, 2, 4789, patterns=("macvlan",))
    assert not plan.overlay and [h.underlay_prefix for h in plan.hosts] == [16, 16, 16]
    inv = plan.inventory()
    assert inv["patterns"] == ["macvlan"]
    pods = {p["name"]: p for p in inv["pods"]}
    assert pods["loadgen-1"]["ip"] == "10.213.1.10" and pods["api-1"]["ip"] == "10.213.2.11"
    assert all(p["attach"] == "macvlan" and p["host_if"] is None for p in inv["pods"])
    assert len({p["ip"] for p in inv["pods"]} | {h["underlay_ip"] for h in inv["hosts"]}) == 10
    # the same placement and MACs as the default lab: only the addresses moved
    default = make_plan("ewmv", 3, 2, 4789).inventory()["pods"]
    assert [(p["name"], p["host"], p["mac"]) for p in default] == [
        (p["name"], p["host"], p["mac"]) for p in inv["pods"]]


def test_host_network_moves_api_into_its_hosts_namespace():
    plan = make_plan("ewhn", 3, 2, 4789, patterns=("host-network",))
    inv = plan.inventory()
    api = next(p for p in inv["pods"] if p["service"] == "api")
    assert (api["netns"], api["ip"], api["attach"], api["host_if"]) == ("ewhn-h2", "10.244.2.1",
                                                                        "host", None)
    h2 = next(h for h in inv["hosts"] if h["name"] == "h2")
    assert h2["pod_netns"] == ["ewhn-h2-p2"]  # the host's own namespace is not listed twice
    assert all(p["attach"] == "veth" for p in inv["pods"] if p["service"] != "api")
    entry = next(e for e in workload_map(plan)["workloads"] if e["match"] == "10.244.2.1/32")
    assert (entry["name"], entry["host"]) == ("api", "h2")
    with pytest.raises(ConfigError) as err:  # api-1 and api-2 would both be on h2
        make_plan("ewhn", 3, 3, 4789, patterns=("host-network",))
    assert err.value.key == "--pods-per-host" and "api-2" in err.value.reason


def test_mesh_combines_with_services_and_gives_every_pod_a_sidecar():
    from eastwest.lab import mesh

    for services in (False, True):
        plan = make_plan("ewms", 3, 3, 4789, services=services, patterns=("mesh",))
        plan.extra["mesh"] = mesh.inventory(plan)
        inv = plan.inventory()
        mesh.mark_pods(inv)
        assert inv["patterns"] == ["mesh"] and bool(inv.get("cluster_services")) is services
        assert inv["mesh"]["pods"] == [p["name"] for p in inv["pods"]]  # the load generator too
        assert {p["sidecar"] for p in inv["pods"]} == {"ew-sidecar"}
        assert inv["mesh"]["outbound_port"] == 15001 and inv["mesh"]["inbound_port"] == 15006
    plain = make_plan("ewms", 3, 3, 4789).inventory()
    mesh.mark_pods(plain)
    assert "mesh" not in plain and not any("sidecar" in p for p in plain["pods"])
