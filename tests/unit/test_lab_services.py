"""The lab's Kubernetes-style Services as data: placement, ClusterIPs, kube-proxy's rules, refusals,
and the PROXY line that lets a server's ledger name what its client dialled. No root needed; the
rules are proven in a kernel by tests/lab/test_lab_services.py."""

from __future__ import annotations

import pytest

from eastwest.errors import ConfigError
from eastwest.lab.app import Dial, parse_proxy, proxy_line
from eastwest.lab.plan import check, cluster_services, make_plan
from eastwest.lab.services import ruleset


def placement(plan):
    return [(p.name, p.host, p.slot, p.ip) for p in plan.pods]


def test_without_services_the_placement_is_as_it_always_was():
    # written out from the placement of before --services (slot by slot, host by host)
    assert placement(make_plan("ewx", 3, 2, 4789)) == [
        ("loadgen-1", "h1", 0, "10.244.1.10"), ("frontend-1", "h1", 1, "10.244.1.11"),
        ("api-1", "h2", 1, "10.244.2.11"), ("db-1", "h3", 1, "10.244.3.11"),
        ("cache-1", "h1", 2, "10.244.1.12"), ("auth-1", "h2", 2, "10.244.2.12"),
        ("resolver-1", "h3", 2, "10.244.3.12")]
    four = placement(make_plan("ewx", 4, 3, 4789))
    assert four[7:10] == [("frontend-2", "h3", 2, "10.244.3.12"), ("api-2", "h4", 2, "10.244.4.12"),
                          ("db-2", "h1", 3, "10.244.1.13")]
    assert "cluster_services" not in make_plan("ewx", 3, 2, 4789).inventory()


def test_services_spread_replicas_over_hosts():
    plan = make_plan("ewx", 3, 3, 4789, services=True)
    hosts = {}
    for p in plan.pods:
        hosts.setdefault(p.service, []).append(p.host)
    assert hosts["frontend"] == ["h1", "h3"] and hosts["api"] == ["h2", "h1"]
    assert hosts["db"] == ["h3", "h2"]
    assert sorted(p.slot for p in plan.pods if p.host == "h2") == [1, 2, 3]


def test_cluster_services_have_ips_ports_backends_and_one_nodeport():
    plan = make_plan("ewx", 3, 3, 4789, services=True)
    svcs = {s["name"]: s for s in cluster_services(plan)}
    assert [s["cluster_ip"] for s in svcs.values()] == [f"10.96.0.{10 + i}" for i in range(6)]
    fe = svcs["frontend"]
    assert (fe["port"], fe["target_port"]) == (80, 8080)  # port 80 -> targetPort 8080
    assert (svcs["db"]["port"], svcs["db"]["target_port"]) == (5432, 5432)
    assert [b["pod"] for b in fe["backends"]] == ["frontend-1", "frontend-2"]
    # the NodePort on h2 leads only to the frontend on a third host (the client is on h1)
    assert fe["node_port"] == {"port": 30080, "host": "h2", "ip": "10.213.0.2", "backends": [
        {"pod": "frontend-2", "ip": "10.244.3.13", "port": 8080, "host": "h3"}]}
    assert all(s["node_port"] is None for n, s in svcs.items() if n != "frontend")
    assert plan.inventory()["cluster_services"] == list(svcs.values())


def test_the_nodeport_host_is_the_first_with_a_frontend_on_a_third_host():
    plan = make_plan("ewx", 4, 2, 4789, services=True)  # frontends on h1 and h2
    fe = cluster_services(plan)[0]
    assert [b["host"] for b in fe["backends"]] == ["h1", "h2"]
    assert fe["node_port"]["host"] == "h3" and fe["node_port"]["ip"] == "10.213.0.3"
    assert [b["pod"] for b in fe["node_port"]["backends"]] == ["frontend-2"]
    assert "--dport 30080" in ruleset(plan, "h3") and "--dport 30080" not in ruleset(plan, "h2")


def test_ruleset_is_kube_proxys_shape():
    plan = make_plan("ewx", 3, 3, 4789, services=True)
    h2 = ruleset(plan, "h2").splitlines()
    assert h2[0] == "*nat" and h2[-1] == "COMMIT"
    rules = [r for r in h2 if r.startswith("-A ")]
    assert rules[:3] == ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
                         "-A POSTROUTING -j KUBE-POSTROUTING"]
    assert ("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-FRONTEND"
            in rules)
    assert "-A KUBE-SERVICES -d 10.96.0.15/32 -p udp -m udp --dport 53 -j KUBE-SVC-RESOLVER" in rules
    # two endpoints: the first with probability 1/2, the last unconditionally
    assert [r for r in rules if r.startswith("-A KUBE-SVC-API ")] == [
        "-A KUBE-SVC-API -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-API-1",
        "-A KUBE-SVC-API -j KUBE-SEP-API-2"]
    assert "-A KUBE-SEP-FRONTEND-1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:8080" in rules
    # the NodePort jump is KUBE-SERVICES' last rule, then the NodePort marks for masquerade
    svc_rules = [r for r in rules if r.startswith("-A KUBE-SERVICES ")]
    assert svc_rules[-1] == "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    assert rules[-4:] == [
        "-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-FRONTEND",
        "-A KUBE-EXT-FRONTEND -j KUBE-MARK-MASQ",
        "-A KUBE-EXT-FRONTEND -j KUBE-NPSEP-FRONTEND-2",
        "-A KUBE-NPSEP-FRONTEND-2 -p tcp -m tcp -j DNAT --to-destination 10.244.3.13:8080"]
    assert "-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE" in rules
    # every chain jumped to is declared
    declared = {r[1:].split()[0] for r in h2 if r.startswith(":")}
    targets = {r.split(" -j ")[1].split()[0] for r in rules} - {"DNAT", "MARK", "MASQUERADE"}
    assert targets <= declared
    # the NodePort is on h2 only
    assert "KUBE-NODEPORTS -p" not in ruleset(plan, "h1")
    assert "KUBE-NODEPORTS -p" not in ruleset(plan, "h3")


def test_three_backends_are_equally_likely():
    plan = make_plan("ewx", 3, 5, 4789, services=True)
    rules = ruleset(plan, "h1").splitlines()
    fe = [r for r in rules if r.startswith("-A KUBE-SVC-FRONTEND ")]
    assert len(fe) == 3
    assert "--probability 0.33333333333" in fe[0] and "--probability 0.50000000000" in fe[1]
    assert "statistic" not in fe[2]


@pytest.mark.parametrize(("args", "flag"), [
    ((3, 3, "ipv6"), "--ip-family"),
    ((3, 3, "dual"), "--ip-family"),
    ((2, 5, "ipv4"), "--hosts"),
    ((3, 2, "ipv4"), "--pods-per-host"),
])
def test_plans_that_cannot_hold_services_are_refused(args, flag):
    hosts, pods, family = args
    with pytest.raises(ConfigError) as err:
        make_plan("ewx", hosts, pods, 4789, family, services=True)
    assert err.value.key == flag
    assert "--services" in str(err.value)


def test_without_the_shift_replicas_would_share_hosts():
    check(make_plan("ewx", 3, 3, 4789, services=True))
    with pytest.raises(ConfigError, match="backends on 2 hosts"):
        check(make_plan("ewx", 3, 3, 4789))  # the placement of old: frontend-1, -2 both on h1


def test_proxy_line_round_trips():
    d = Dial(None, 8080, "10.96.0.10", 80, "service", "frontend")
    line = proxy_line("TCP4", "10.244.1.10", 40000, d)
    assert line == b"PROXY TCP4 10.244.1.10 10.96.0.10 40000 80\r\n"
    assert parse_proxy(line) == {"protocol": "tcp", "client_ip": "10.244.1.10",
                                 "client_port": 40000, "dialled_ip": "10.96.0.10",
                                 "dialled_port": 80}
    assert parse_proxy(proxy_line("UDP4", "10.244.1.10", 5, d))["protocol"] == "udp"
