"""`eastwest lab policy apply`'s plan (no root: the iptables text, not its installation; the
lab test tests/lab/test_policy_lab.py installs it): which lab pods may reach which on which
ports, decided by eastwest/policy/semantics.py, and the chains that enforce it."""

from __future__ import annotations

import pytest
import yaml

from eastwest.lab.lab import workload_map
from eastwest.lab.plan import make_plan
from eastwest.lab.policy import Allow, plan
from eastwest.policy.load import load_text


@pytest.fixture
def inventory(tmp_path):
    p = make_plan("ewxdu", 3, 2, 4789)
    p.state_dir = str(tmp_path)
    (tmp_path / "workloads.yaml").write_text(yaml.safe_dump(workload_map(p)))
    return p.inventory()


def policies(text: str):
    return load_text(text, "test.yaml")


DB = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}, {port: 6000, endPort: 6010}, {protocol: UDP, port: 5432}]
"""


def test_only_what_the_policy_allows_reaches_an_isolated_pod(inventory) -> None:
    got = plan(inventory, policies(DB))
    assert got.ingress_isolated == ["db-1"] and got.egress_isolated == []
    assert got.allows == [Allow("api-1", "db-1", "TCP", 5432, 5432),
                          Allow("api-1", "db-1", "TCP", 6000, 6010),
                          Allow("api-1", "db-1", "UDP", 5432, 5432)]
    h3 = got.rules[("ewxdu-h3", 4)]  # db-1 lives on h3, slot 1 (veth vp1)
    assert "-A EW-POLICY -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT" in h3
    assert "-A EW-POLICY -m physdev --physdev-out vp1 --physdev-is-bridged -j EW-I0-db-1" in h3
    assert "-A EW-I0-db-1 -s 10.244.2.11/32 -p tcp -m tcp --dport 6000:6010 -j RETURN" in h3
    assert h3.index("--dport 5432 -j RETURN") < h3.index("-A EW-I0-db-1 -j DROP")
    assert "EW-I" not in got.rules[("ewxdu-h1", 4)]  # nothing isolated there


def test_egress_isolation_is_enforced_on_the_clients_host(inventory) -> None:
    text = DB.replace("name: db", "name: fe").replace("app: db", "app: frontend").replace(
        "ingress:", "policyTypes: [Egress]\n  egress:").replace("from:", "to:")
    got = plan(inventory, policies(text))
    assert got.egress_isolated == ["frontend-1"] and got.ingress_isolated == []
    assert {(a.client, a.server) for a in got.allows} == {("frontend-1", "api-1")}
    h1 = got.rules[("ewxdu-h1", 4)]
    assert "--physdev-in vp1 --physdev-is-bridged -j EW-E1-frontend-1" in h1  # loadgen is 0
    assert "-A EW-E1-frontend-1 -d 10.244.2.11/32 -p tcp -m tcp --dport 5432 -j RETURN" in h1


def test_an_allow_all_rule_is_one_range_and_deny_all_is_none(inventory) -> None:
    allow_all = policies(DB.replace("""  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}, {port: 6000, endPort: 6010}, {protocol: UDP, port: 5432}]""", "  - {}"))
    tcp = [a for a in plan(inventory, allow_all).allows if a.protocol == "TCP"]
    assert len(tcp) == 6 and all((a.lo, a.hi, a.server) == (1, 65535, "db-1") for a in tcp)
    deny_all = policies(DB.split("  ingress:")[0].replace("{matchLabels: {app: db}}", "{}")
                        + "  policyTypes: [Ingress]\n")
    got = plan(inventory, deny_all)
    # every pod of shop; loadgen (load) and resolver (platform) are not selected
    assert got.allows == [] and got.ingress_isolated == ["frontend-1", "api-1", "db-1",
                                                         "cache-1", "auth-1"]


def test_a_dual_stack_lab_gets_ip6tables_rules_for_the_ipv6_addresses(tmp_path) -> None:
    p = make_plan("ewxdu", 3, 2, 4789, "dual")
    p.state_dir = str(tmp_path)
    (tmp_path / "workloads.yaml").write_text(yaml.safe_dump(workload_map(p)))
    got = plan(p.inventory(), policies(DB))
    v4, v6 = got.rules[("ewxdu-h3", 4)], got.rules[("ewxdu-h3", 6)]
    assert "-A EW-I0-db-1 -s 10.244.2.11/32 -p tcp -m tcp --dport 5432 -j RETURN" in v4
    assert "-A EW-I0-db-1 -s fd00:ee::2:11/128 -p tcp -m tcp --dport 5432 -j RETURN" in v6
    assert "10.244." not in v6 and "fd00:" not in v4
    # neighbour discovery passes before any pod chain (else no IPv6 address is ever resolved)
    nd = "-A EW-POLICY -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-solicitation -j ACCEPT"
    assert v6.index(nd) < v6.index("-j EW-I0-db-1") and "icmp6" not in v4
