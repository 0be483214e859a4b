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
