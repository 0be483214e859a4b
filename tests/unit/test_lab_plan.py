"""The lab's plan: placement, addresses and inventory, decided before anything is built."""

from __future__ import annotations

import pytest

from eastwest.cli import main
from eastwest.errors import ConfigError
from eastwest.lab.plan import SERVICES, make_plan


def test_default_plan_spreads_services_over_hosts():
    plan = make_plan("ewlab", 3, 2, 4789)
    by_service = {p.service: p for p in plan.pods}
    assert [p.name for p in plan.pods] == ["loadgen-1", "frontend-1", "api-1", "db-1", "cache-1",
                                           "auth-1", "resolver-1"]
    assert by_service["frontend"].host != by_service["api"].host != by_service["db"].host
    assert by_service["api"].ip == "10.244.2.11" and by_service["api"].netns == "ewlab-h2-p1"
    assert by_service["loadgen"].ip == "10.244.1.10" and by_service["loadgen"].slot == 0
    assert len({p.mac for p in plan.pods}) == len(plan.pods)
    assert [h.underlay_ip for h in plan.hosts] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]


def test_extra_pods_become_replicas():
    plan = make_plan("ewlab", 3, 3, 8472)
    assert sorted(p.name for p in plan.pods if p.service in ("frontend", "api", "db")) == [
        "api-1", "api-2", "db-1", "db-2", "frontend-1", "frontend-2"]


def test_inventory_has_the_contract_fields():
    plan = make_plan("ewx", 2, 3, 4789)
    plan.state_dir = "/run/eastwest/lab/ewx"
    inv = plan.inventory()
    assert set(inv["hosts"][0]) >= {"name", "netns", "underlay_if", "underlay_ip", "pod_netns"}
    assert set(inv["pods"][0]) >= {"name", "netns", "ip", "host", "service", "namespace"}
    assert inv["workload_map"] == "/run/eastwest/lab/ewx/workloads.yaml"
    assert inv["hosts"][0]["pod_netns"] == ["ewx-h1-p0", "ewx-h1-p1", "ewx-h1-p2", "ewx-h1-p3"]
    assert {p["service"] for p in inv["pods"]} == {s.name for s in SERVICES} | {"loadgen"}


@pytest.mark.parametrize(("kwargs", "flag"), [
    (dict(name="Bad_Name", hosts=3, pods_per_host=2, vxlan_port=4789), "--name"),
    (dict(name="ewlab", hosts=1, pods_per_host=6, vxlan_port=4789), "--hosts"),
    (dict(name="ewlab", hosts=2, pods_per_host=2, vxlan_port=4789), "--pods-per-host"),
    (dict(name="ewlab", hosts=3, pods_per_host=2, vxlan_port=0), "--vxlan-port"),
])
def test_bad_sizes_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as err:
        make_plan(**kwargs)
    assert err.value.key == flag


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["lab", "up", "--vxlan-port", "1234"])
    assert err.value.code == 2
    assert "--vxlan-port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["lab", "traffic"])  # --duration and --truth are required
    assert err.value.code == 2


def test_flows_help_imports_neither_bcc_nor_scapy():
    import subprocess
    import sys

    code = ("import sys\nfrom eastwest.cli import main\n"
            "try:\n    main(['flows', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('bcc', 'scapy', 'collector.probes') if m in sys.modules]\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- IP families (--ip-family) ----------------------------------------------------------------
def test_ipv4_is_the_default_and_unchanged():
    plan = make_plan("ewlab", 3, 2, 4789)
    inv = plan.inventory()
    assert (plan.ip_family, plan.underlay_family) == ("ipv4", 4)
    assert (inv["ip_family"], inv["underlay_family"]) == ("ipv4", 4)
    api = plan.pod("api-1")
    assert (api.ip, api.ip4, api.ip6, api.ips) == ("10.244.2.11", "10.244.2.11", None, ["10.244.2.11"])


def test_ipv6_plan_has_ipv6_pods_and_an_ipv6_underlay():
    import ipaddress

    plan = make_plan("ewlab", 3, 2, 4789, "ipv6")
    assert [h.underlay_ip for h in plan.hosts] == ["fd00:ed::1", "fd00:ed::2", "fd00:ed::3"]
    assert plan.underlay_family == 6 and plan.hosts[0].underlay_prefix == 64
    api = plan.pod("api-1")
    assert (api.ip, api.ip4, api.ip6, api.ips) == ("fd00:ee::2:11", None, "fd00:ee::2:11",
                                                   ["fd00:ee::2:11"])
    for p in plan.pods:  # unique local, in the pods' /48, one /64 segment, RFC 5952 text
        a = ipaddress.IPv6Address(p.ip)
        assert a in ipaddress.IPv6Network("fd00:ee::/64") and str(a) == p.ip and a.is_private
    assert len({p.ip for p in plan.pods}) == len(plan.pods)
    inv = plan.inventory()
    assert (inv["ip_family"], inv["underlay_family"]) == ("ipv6", 6)
    assert inv["pods"][0]["ip"] == inv["pods"][0]["ip6"] == "fd00:ee::1:10"


def test_dual_plan_keeps_ipv4_primary_and_an_ipv4_underlay():
    plan = make_plan("ewlab", 3, 2, 4789, "dual")
    assert [h.underlay_ip for h in plan.hosts] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    api = plan.pod("api-1")
    assert (api.ip, api.ip6, api.ips) == ("10.244.2.11", "fd00:ee::2:11",
                                          ["10.244.2.11", "fd00:ee::2:11"])
    inv = plan.inventory()
    assert (inv["ip_family"], inv["underlay_family"]) == ("dual", 4)
    assert inv["pods"][2]["ips"] == ["10.244.2.11", "fd00:ee::2:11"]


def test_bad_ip_family_names_the_flag(capsys):
    with pytest.raises(ConfigError) as err:
        make_plan("ewlab", 3, 2, 4789, "ipv5")
    assert err.value.key == "--ip-family"
    for argv in (["lab", "up", "--ip-family", "ipv5"], ["demo", "--ip-family", "v6"]):
        with pytest.raises(SystemExit) as ex:
            main(argv)
        assert ex.value.code == 2
        assert "--ip-family" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "dual"])
def test_workload_map_names_every_address_of_every_pod(family):
    """What the aggregator reads (its own StaticMap): IPv6 pods and nodes are named too."""
    from aggregator.identity import StaticMap
    from eastwest.lab.lab import workload_map

    plan = make_plan("ewlab", 3, 2, 4789, family)
    static = StaticMap(workload_map(plan)["workloads"])
    for p in plan.pods:
        assert p.ips
        for addr in p.ips:
            ident = static.lookup(addr, 1234)
            assert ident is not None and (ident.name, ident.host) == (p.service, p.host), addr
            assert ident.labels["pod"] == p.name
    for h in plan.hosts:
        ident = static.lookup(h.underlay_ip, 4789)
        assert ident is not None and ident.name == f"node-{h.name}"
    assert static.lookup("fd00:ee::9:99", 1) is None  # /128 and /32 entries, not whole nets


@pytest.mark.parametrize("services", [False, True])
def test_workload_map_names_a_hosts_gateway_as_its_node_with_services(services):
    """With Services each host's br0 holds the pod gateway 10.244.N.1, and a NodePort call that
    host masquerades reaches its backend from there (docs/lab.md, "NodePort with SNAT"): that
    address is the node's, as in Kubernetes an address of a node's pod CIDR that no pod holds.
    Without Services no host has it: it stays unnamed."""
    from aggregator.identity import StaticMap
    from eastwest.lab.lab import workload_map

    plan = make_plan("ewlab", 3, 3 if services else 2, 4789, services=services)
    static = StaticMap(workload_map(plan)["workloads"])
    for h in plan.hosts:
        ident = static.lookup(f"10.244.{h.index}.1", 40000)
        if not services:
            assert ident is None
            continue
        assert ident is not None
        assert (ident.name, ident.kind, ident.host) == (f"node-{h.name}", "Node", h.name)
    for p in plan.pods:  # the pods keep their names
        ident = static.lookup(p.ip, 1)
        assert ident is not None and ident.name == p.service


@pytest.mark.parametrize(("family", "underlay", "mtu"), [
    ("ipv4", "10.213.0.1/24", "1450"), ("ipv6", "fd00:ed::1/64", "1430"),
    ("dual", "10.213.0.1/24", "1450")])
def test_topology_commands_per_family(monkeypatch, family, underlay, mtu):
    """What `topology.build` runs (no root: the commands are recorded, not run): IPv6 addresses
    without duplicate address detection, VXLAN local/remote of the underlay's family."""
    import subprocess

    from eastwest.lab import topology

    ran: list[list[str]] = []

    def fake_sh(args, *, check=True):
        ran.append(list(args))
        return subprocess.CompletedProcess(list(args), 0, "", "")

    monkeypatch.setattr(topology, "sh", fake_sh)
    plan = make_plan("ewf", 2, 3, 4789, family)
    topology.build(plan)
    lines = [" ".join(a) for a in ran]
    sysctls = [x for x in lines if "accept_dad=0" in x]
    assert len(sysctls) == (0 if family == "ipv4" else 1 + 2 + len(plan.pods))
    assert f"ip -n ewf-h1 addr add {underlay} dev eth0" + (" nodad" if family == "ipv6" else "") in lines
    vx = next(x for x in lines if "type vxlan" in x)
    assert f"local {underlay.split('/')[0]} " in vx
    fdb = [x for x in lines if x.startswith("bridge -n ewf-h1 fdb append")]
    assert fdb and all(x.endswith(" dst " + ("fd00:ed::2" if family == "ipv6" else "10.213.0.2"))
                       for x in fdb)
    pod = plan.pod("api-1")
    adds = [x for x in lines if x.startswith(f"ip -n {pod.netns} addr add")]
    want = {"ipv4": [f"{pod.ip4}/16 dev eth0"], "ipv6": [f"{pod.ip6}/64 dev eth0 nodad"],
            "dual": [f"{pod.ip4}/16 dev eth0", f"{pod.ip6}/64 dev eth0 nodad"]}[family]
    assert [x.split("addr add ")[1] for x in adds] == want
    assert f"ip -n {pod.netns} link set eth0 address {pod.mac} mtu {mtu}" in lines


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "dual"])
def test_loadgen_families_follow_the_seed(tmp_path, monkeypatch, family):
    """In a dual lab the load generator's connections are IPv6 or IPv4, drawn from its seed (the
    same seed, the same families); one family otherwise."""
    import json

    from eastwest.lab import app as app_mod

    monkeypatch.setattr(app_mod, "set_comm", lambda _name: None)
    plan = make_plan("ewf", 3, 2, 4789, family)
    plan.state_dir = str(tmp_path)
    (tmp_path / "inventory.json").write_text(json.dumps(plan.inventory()))

    def families(seed: int) -> list[int]:
        app = app_mod.App(tmp_path, "loadgen-1", seed=seed)
        got: list[int] = []
        monkeypatch.setattr(app, "call_tcp", lambda server, port, reqs, fam=4, dial=None: got.append(fam))
        app.loadgen(duration=0.3, rate=400.0, workers=1)
        return got

    a, b, c = families(7), families(7), families(8)
    n = min(len(a), len(b), len(c))
    assert n >= 40
    if family == "dual":
        assert a[:n] == b[:n] != c[:n]
        assert set(a[:n]) == {4, 6}
    else:
        assert set(a) | set(c) == {6 if family == "ipv6" else 4}


def test_app_addresses_by_family():
    from eastwest.lab.app import address

    dual = make_plan("ewf", 3, 2, 4789, "dual").inventory()["pods"][1]
    assert (address(dual, 4), address(dual, 6)) == ("10.244.1.11", "fd00:ee::1:11")
    old = {"name": "frontend-1", "ip": "10.244.1.11"}  # an inventory from before --ip-family
    assert address(old, 4) == "10.244.1.11"
    with pytest.raises(ValueError):
        address(old, 6)
    with pytest.raises(ValueError):
        address(make_plan("ewf", 3, 2, 4789).inventory()["pods"][1], 6)
