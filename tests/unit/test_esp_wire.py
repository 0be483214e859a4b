"""IPsec ESP between hosts on the wire, from a scapy-built capture (this kernel has no ESP, so
the lab cannot make it; docs/lab.md "ipsec"): each pair of hosts is one `esp` flow, both
directions and both SPIs in it, with exact packets and bytes (the whole IP payload); through a
real aggregator and DuckDB it is the `node-h1 -> node-h2` edge of protocol `esp`, observed by
the wire alone and marked `encrypted: esp`, `wire_sees_inside: false`, beside the application's
edge, which is not marked."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from scapy.layers.inet import IP, TCP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from eastwest import codec
from eastwest.codec import Batch

INGEST, READ = "i" * 24, "r" * 24
H1, H2, H3 = "10.213.0.1", "10.213.0.2", "10.213.0.3"
MAP = f"""workloads:
- {{match: {H1}/32, name: node-h1, kind: Node, host: h1}}
- {{match: {H2}/32, name: node-h2, kind: Node, host: h2}}
- {{match: {H3}/32, name: node-h3, kind: Node, host: h3}}
- {{match: 10.244.1.11/32, name: frontend, namespace: shop, host: h1}}
- {{match: 10.244.2.11/32, name: api, namespace: shop, host: h2}}
"""


def esp(src: str, dst: str, spi: int, seq: int, size: int):
    return Ether() / IP(src=src, dst=dst) / ESP(spi=spi, seq=seq, data=bytes(size))


@pytest.fixture(scope="module")
def wire(tmp_path_factory):
    """The capture, its truth (packets and IP payload bytes per direction), and its records."""
    pkts, want = [], {}
    t = 1_700_000_000.0
    plan = [(H1, H2, 0xE0000102, 100), (H2, H1, 0xE0000201, 60), (H1, H2, 0xE0000102, 1200),
            (H2, H1, 0xE0000201, 40), (H1, H2, 0xE0000102, 300), (H3, H2, 0xE0000302, 80),
            (H2, H3, 0xE0000203, 90)]
    for i, (src, dst, spi, size) in enumerate(plan):
        p = esp(src, dst, spi, i + 1, size)
        p.time = t + i * 0.01
        pkts.append(p)
        pair = tuple(sorted((src, dst)))
        d = want.setdefault(pair, {"first": src, "c2s": [0, 0], "s2c": [0, 0]})
        way = d["c2s"] if src == d["first"] else d["s2c"]
        way[0] += 1
        way[1] += len(p[IP].payload)  # ESP header + data: what the wire counts
    plain = Ether() / IP(src="10.244.1.11", dst="10.244.2.11") / TCP(sport=40000, dport=9090,
                                                                      flags="PA") / Raw(b"x" * 50)
    plain.time = t + 1
    pkts.append(plain)
    path = tmp_path_factory.mktemp("esp") / "esp.pcap"
    wrpcap(str(path), pkts)
    run = subprocess.run([sys.executable, "-m", "eastwest", "collector", "--pcap", str(path),
                          "--stdout", "--collector-id", "wire"], capture_output=True, text=True,
                         check=True)
    records = [json.loads(x) for x in run.stdout.splitlines()]
    return want, [r for r in records if r["final"]]


def test_each_pair_of_hosts_is_one_esp_flow_with_both_directions(wire):
    want, finals = wire
    flows = [r for r in finals if r["protocol"] == "esp"]
    assert len(flows) == len(want) == 2
    for r in flows:
        d = want[tuple(sorted((r["client"]["ip"], r["server"]["ip"])))]
        assert r["client"]["ip"] == d["first"]  # ports 0: the first packet's sender
        assert r["client"]["port"] == r["server"]["port"] == 0 and r["tunnel"] is None
        assert (r["packets_c2s"], r["bytes_c2s"]) == tuple(d["c2s"]), r
        assert (r["packets_s2c"], r["bytes_s2c"]) == tuple(d["s2c"]), r
        assert r["observer"] == "path" and r["source"] == "pcap"


def test_the_aggregator_shows_esp_as_an_encrypted_edge_between_the_nodes(wire, tmp_path):
    want, finals = wire
    (tmp_path / "map.yaml").write_text(MAP)
    settings = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST,
                                  read_token=READ, workload_map=tmp_path / "map.yaml",
                                  retention=None)
    records = [codec.from_json(json.dumps(r)) for r in finals]
    start = min(r.start for r in records)
    with TestClient(create_app(settings)) as c:
        r = c.post("/api/v1/ingest", content=codec.encode_batch(Batch("wire", 1, start, records)),
                   headers={"Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE})
        assert r.status_code == 200, r.text
        window = {"from": (start - timedelta(minutes=1)).isoformat(),
                  "to": (start + timedelta(minutes=1)).isoformat()}
        g = c.get("/api/v1/graph", params=window,
                  headers={"Authorization": f"Bearer {READ}"}).json()
    edges = {(e["source"], e["target"]): e for e in g["edges"]}
    assert set(edges) == {("node-h1", "node-h2"), ("node-h3", "node-h2"),
                          ("shop/frontend", "shop/api")}
    for (src, dst), e in edges.items():
        if src.startswith("node-"):
            d = want[tuple(sorted((f"10.213.0.{src[-1]}", f"10.213.0.{dst[-1]}")))]
            assert e["protocols"] == ["esp"] and e["observed_by"] == {"path": 1}, e
            assert e["encrypted"] == "esp" and e["wire_sees_inside"] is False, e
            assert (e["bytes_c2s"], e["bytes_s2c"]) == (d["c2s"][1], d["s2c"][1]), e
        else:
            assert e["protocols"] == ["tcp"] and "encrypted" not in e, e


def test_the_cli_marks_the_encrypted_edge_where_the_ports_would_be(wire, tmp_path):
    """`eastwest graph`/`top`: an ESP edge's PORTS cell says `ESP (encrypted)` (the wire saw no
    port inside); the application's edge keeps its port."""
    from eastwest.cli._edges import Edge, edge_cells, ports_cell

    esp = Edge.from_api({"source": "node-h1", "target": "node-h2", "connections_opened": 1,
                         "protocols": ["esp"], "ports": [], "observed_by": {"path": 1},
                         "encrypted": "esp", "wire_sees_inside": False})
    app = Edge.from_api({"source": "shop/frontend", "target": "shop/api",
                         "connections_opened": 3, "protocols": ["tcp"], "ports": ["8080"],
                         "observed_by": {"client,server": 3}})
    assert esp.encrypted == "esp" and app.encrypted is None
    cell = ports_cell(esp)
    assert not isinstance(cell, str) and cell.text == "ESP (encrypted)"
    assert ports_cell(app) == "8080" and "8080" in edge_cells(app)
