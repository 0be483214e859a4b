"""The Service view grouped in the stores' SQL (aggregator/store/duckdb_edges.py,
clickhouse_derived.py, service_edges.py) against a reference that groups the same window's
connection rows in Python by the rules of aggregator/service_view.py's docstring and docs/api.md
(what the view computed in Python before it moved into SQL): on generated connections through
the real pipeline, with Services of several backends and backend ports, a Service named per
port, a dual-stack Service (two addresses, one node), unnamed addresses (IPv4 and IPv6), direct
calls to pods, several observer sets, refused, reset and open connections, and calls that
started before the window; unfiltered and filtered, on DuckDB and on ClickHouse."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest

from aggregator.graph import Window, graph_data
from aggregator.graph_edges import drops_of, iso
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.service_view import ServiceNames
from aggregator.store import BACKENDS, open_store
from aggregator.store.query import ConnectionQuery
from eastwest.filters import Filter
from eastwest.record import Endpoint, Nat
from tests.servers import store_location
from tests.unit.pipes import driven
from tests.unit.test_correlate import T0, rec

# workloads: name -> (namespace, host, pod addresses)
PODS = {
    "frontend": ("shop", "h1", ["10.244.1.11", "10.244.1.21", "fd00:244:1::11"]),
    "batch": ("jobs", "h1", ["10.244.1.12", "fd00:244:1::12"]),
    "api": ("shop", "h2", ["10.244.2.11", "10.244.2.12", "fd00:244:2::11"]),
    "api-canary": ("shop", "h2", ["10.244.2.13"]),
    "web": ("shop", "h3", ["10.244.3.11", "10.244.3.12"]),
    "cache": ("infra", "h3", ["10.244.3.13", "fd00:244:3::13"]),
}
CLIENTS = ("frontend", "batch")
# a dialled address -> (its backends, the backends' ports, whether a layer names it)
SERVICES = {
    ("10.96.0.11", 80): (("api", "api-canary"), (8080, 8443)),       # svc:shop/api
    ("fd00:96::11", 80): (("api",), (8080,)),                          # svc:shop/api (dual stack)
    ("10.96.0.20", 80): (("web",), (8080,)),                           # svc:shop/web
    ("10.96.0.20", 443): (("web",), (8443,)),                          # svc:shop/web-tls
    ("10.96.0.99", 6379): (("cache",), (6379,)),                       # unnamed
    ("fd00:96::99", 6379): (("cache",), (6379,)),                      # unnamed, IPv6
}
MAP = StaticMap(
    [{"match": f"{ip}/{128 if ':' in ip else 32}", "name": name, "namespace": ns, "host": host,
      "kind": "Deployment"}
     for name, (ns, host, ips) in PODS.items() for ip in ips],
    services=[{"match": "10.96.0.11", "name": "api", "namespace": "shop"},
              {"match": "fd00:96::11", "name": "api", "namespace": "shop"},
              {"match": "10.96.0.20", "name": "web", "namespace": "shop"},
              {"match": "10.96.0.20:443", "name": "web-tls", "namespace": "shop"}])
WINDOW = Window(T0, T0 + timedelta(minutes=10))


def generated(seed: int, n: int = 160) -> list:
    """`n` connections' records: 3 of 4 dialled a Service, the rest a pod directly."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        client = rnd.choice(CLIENTS)
        family = 6 if rnd.random() < 0.15 else 4
        pick = [a for a in SERVICES if (":" in a[0]) == (family == 6)]
        vip = rnd.choice(pick) if rnd.random() < 0.75 else None
        if vip is not None:
            backends, ports = SERVICES[vip]
            server, port = rnd.choice(backends), rnd.choice(ports)
        else:
            server = rnd.choice([w for w in PODS if w not in CLIENTS and any(
                (":" in ip) == (family == 6) for ip in PODS[w][2])])
            port = rnd.choice((8080, 6379))
        ips = {w: [ip for ip in PODS[w][2] if (":" in ip) == (family == 6)] for w in PODS}
        over: dict[str, Any] = dict(
            client=Endpoint(rnd.choice(ips[client]), 30000 + i),
            server=Endpoint(rnd.choice(ips[server]), port), family=family,
            start=T0 + timedelta(seconds=rnd.randint(-240, 540)), dur=rnd.choice((0.5, 2, 90, 400)),
            c2s=rnd.randint(0, 10_000), s2c=rnd.randint(0, 100_000))
        connect = rnd.choice(("ok",) * 8 + ("refused", "reset"))
        final = rnd.random() < 0.85
        nat = ([Nat("dnat", Endpoint(*vip), over["server"], 4026531840)]
               if vip is not None else None)
        observers = rnd.choice((("client",), ("client", "server"), ("client", "server"),
                                ("server",) if vip is None else ("client",)))
        for o in observers:
            extra = {"nat": nat} if o == "client" else {}
            if o == "client" and connect != "ok":
                extra["connect"] = connect
            out.append(rec(o, final=final, **extra, **over))
    return out


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    return request.param, store_location(request.param, tmp_path / request.param)


def fill(backend, records) -> Any:
    """Each collector's records in batches of 20, in the generated order."""
    s = driven(open_store(*backend), IdentityResolver(MAP))
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(r.collector, []).append(r)
    seq = 0
    for collector, rs in sorted(by.items()):
        for i in range(0, len(rs), 20):
            seq += 1
            s.ingest(collector, seq, rs[i:i + 20])
    assert s.correlation.applied(30)
    return s


def sql_view(store, flt: Filter) -> tuple[dict, dict]:
    data = graph_data(store, WINDOW, group_by="service", flt=flt,
                      names=ServiceNames(IdentityResolver(MAP)))
    doc = json.loads(data.json_bytes())
    return ({n["id"]: (n["name"], n["namespace"], n["kind"]) for n in doc["nodes"]},
            {(e["source"], e["target"]): e for e in doc["edges"]})


def reference_view(store, flt: Filter) -> tuple[dict, dict]:
    """The Service view of the window's matching connections, grouped here in Python."""
    since, until = WINDOW.since, WINDOW.until
    rows = store.connections(ConnectionQuery(filter=flt, since=since, until=until, limit=100_000))
    workloads = {w["wid"]: w for w in store.workload_rows()}
    names = ServiceNames(IdentityResolver(MAP))
    at = min(until, datetime.now(UTC))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    services: dict[str, tuple[str | None, str | None, set[str]]] = {}
    for r in rows:
        dst = r["server_wid"]
        if r["service_ip"] is not None:
            ip, port = r["service_ip"], int(r["service_port"] or 0)
            ref = names.name_of(ip, port, at)
            dst = f"svc:{ref}" if ref is not None else f"svc:{ip}:{port}"
            name, ns, addrs = services.setdefault(
                dst, (ref.name if ref else None, ref.namespace if ref else None, set()))
            addrs.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        groups.setdefault((r["client_wid"], dst), []).append(r)
    nodes: dict[str, tuple[Any, ...]] = {}
    edges = {}
    for (src, dst), rs in groups.items():
        for n in (src, dst):
            if n in services:
                nodes[n] = (services[n][0] or n[4:], services[n][1], "Service")
            else:
                w = workloads.get(n, {})
                nodes[n] = (w.get("name") or n, w.get("namespace"), w.get("kind"))
        edges[(src, dst)] = _edge(src, dst, rs, since, until)
        if dst in services:
            name, ns, addrs = services[dst]
            edges[(src, dst)]["service"] = {"id": dst, "name": name, "namespace": ns,
                                            "addresses": sorted(addrs)}
            by: dict[str, list[dict[str, Any]]] = {}
            for r in rs:
                by.setdefault(r["server_wid"], []).append(r)
            edges[(src, dst)]["backends"] = [
                {"id": wid, "name": workloads.get(wid, {}).get("name") or wid,
                 "namespace": workloads.get(wid, {}).get("namespace"),
                 "kind": workloads.get(wid, {}).get("kind"), "connections": len(b),
                 "connections_opened": sum(1 for r in b if r["start_ts"] >= since)}
                for wid, b in sorted(by.items())]
        else:
            edges[(src, dst)].update(service=None, backends=[])
    return nodes, edges


def _edge(src: str, dst: str, rs: list[dict[str, Any]], since: datetime, until: datetime
          ) -> dict[str, Any]:
    """One edge of a group of connections, by the edge query's rules (docs/api.md)."""
    new = [r for r in rs if r["start_ts"] >= since]
    rtt = [r for r in rs if r["rtt_avg_us"] is not None]
    observed: dict[str, int] = {}
    for r in rs:
        key = r["observed_by"].strip(",")
        observed[key] = observed.get(key, 0) + 1

    def total(k: str) -> int | None:
        vs = [r[k] for r in rs if r[k] is not None]
        return sum(vs) if vs else None

    dropped = total("dropped")
    return {
        "source": src, "target": dst, "connections_opened": len(new),
        "connections_active": sum(1 for r in rs if not r["closed"] or r["closed_ts"] >= until),
        "connections_closed": sum(1 for r in rs if r["closed"] and since <= r["closed_ts"] < until),
        "connections_failed": sum(1 for r in new if r["outcome"] in ("refused", "timeout", "dropped")),
        "resets": sum(1 for r in new if r["outcome"] == "reset"),
        "byte_mismatches": sum(1 for r in rs if r["byte_mismatch"]),
        "bytes_c2s": total("bytes_c2s") or 0, "bytes_s2c": total("bytes_s2c") or 0,
        "packets_c2s": total("packets_c2s"), "packets_s2c": total("packets_s2c"),
        "retransmits": total("retransmits") or 0,
        "rtt_us": None if not rtt else {
            "min": min(r["rtt_min_us"] for r in rtt),
            "avg": int(Decimal(sum(r["rtt_avg_us"] for r in rtt) / Decimal(len(rtt)))
                       .quantize(Decimal(1), ROUND_HALF_EVEN)),
            "max": max(r["rtt_max_us"] for r in rtt)},
        "ports": sorted({r["server_port"] for r in rs}),
        "protocols": sorted({r["protocol"] for r in rs}),
        "first_seen": iso(min(r["start_ts"] for r in rs)),
        "last_seen": iso(max(r["last_seen"] for r in rs)),
        "complete": not any(r["incomplete"] for r in rs), "observed_by": observed, "folded": 1,
        "drops": drops_of(dropped, ",".join(r["drop_reasons"] for r in rs if r["drop_reasons"])),
        # no generated connection is a folded mesh call (tests/unit/test_api_mesh.py has those)
        "mesh": None if all(r["mesh"] is None for r in rs) else "unexpected",
    }


FILTERS = [
    Filter(),
    Filter.build([("to_service", "10.96.0.0/16", False)]),        # Service calls only
    Filter.build([("to_service", "10.96.0.11/32", True)]),        # all but the api's IPv4
    Filter.build([("from_workload", "frontend", False), ("outcome", "ok", False)]),
]


def test_the_sql_service_view_equals_the_python_grouping_of_the_same_rows(backend):
    s = fill(backend, generated(seed=16))
    try:
        store = s.read()
        for flt in FILTERS:
            got_nodes, got = sql_view(store, flt)
            want_nodes, want = reference_view(store, flt)
            assert want, str(flt)
            assert set(got) == set(want), str(flt)
            for k, e in want.items():
                assert got[k] == e, (str(flt), k)
            assert got_nodes == want_nodes, str(flt)
        # what the generator was meant to cover, unfiltered
        _, want = reference_view(store, Filter())
        svc = [e for e in want.values() if e["service"]]
        assert any(len(e["backends"]) > 1 for e in svc)
        assert any(len(e["ports"]) > 1 for e in svc)           # the detail query's edges
        assert any(len(e["observed_by"]) > 1 for e in svc)
        assert any(len(e["service"]["addresses"]) > 1 for e in svc)   # dual stack, one node
        assert {"svc:10.96.0.99:6379", "svc:fd00:96::99:6379", "svc:shop/web-tls"} <= {
            e["target"] for e in svc}
        assert any(e["service"] is None for e in want.values())
        assert any(b["connections_opened"] < b["connections"] for e in svc for b in e["backends"])
        assert any(e["connections_failed"] for e in svc) and any(e["resets"] for e in svc)
    finally:
        s.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_more_generated_windows_on_duckdb(tmp_path, seed):
    s = fill(("duckdb", tmp_path), generated(seed, 120))
    try:
        store = s.read()
        got_nodes, got = sql_view(store, Filter())
        want_nodes, want = reference_view(store, Filter())
        assert got == want
        assert got_nodes == want_nodes
    finally:
        s.close()


def test_an_address_the_query_does_not_list_is_its_own_unnamed_node(backend):
    """A connection stored after the view listed the window's dialled addresses (here: one
    address left out of the query) still lands on exactly one edge: `svc:<ip>:<port>`."""
    from dataclasses import replace

    from aggregator.graph_edges import GraphData
    from aggregator.service_view import service_query

    s = fill(backend, generated(seed=5, n=80))
    try:
        store = s.read()
        q = service_query(store, WINDOW.since, WINDOW.until, Filter(),
                          ServiceNames(IdentityResolver(MAP)))
        assert ("10.96.0.20", 443) in {(a.ip, a.port) for a in q.services}
        partial = replace(q, services=tuple(a for a in q.services if a.port != 443))
        docs = [json.loads(GraphData.of_columns(store.edges(x), WINDOW.since, WINDOW.until,
                                                "service", "connections", "").json_bytes())
                for x in (q, partial)]
        full, left = ({(e["source"], e["target"]): e for e in d["edges"]} for d in docs)
        moved = {k: e for k, e in left.items() if k[1] == "svc:10.96.0.20:443"}
        assert moved and {k[0] for k in moved} == {
            k[0] for k in full if k[1] == "svc:shop/web-tls"}
        for (src, _), e in moved.items():
            was = full[(src, "svc:shop/web-tls")]
            assert e["service"] == {"id": "svc:10.96.0.20:443", "name": None, "namespace": None,
                                    "addresses": ["10.96.0.20:443"]}
            assert (e["backends"], e["connections_opened"]) == (was["backends"],
                                                                was["connections_opened"])
        nodes = {n["id"]: n for n in docs[1]["nodes"]}
        assert (nodes["svc:10.96.0.20:443"]["name"], nodes["svc:10.96.0.20:443"]["kind"]) == (
            "10.96.0.20:443", "Service")
        for k in ("connections_opened", "connections_active", "bytes_c2s"):
            assert sum(e[k] for e in full.values()) == sum(e[k] for e in left.values())
    finally:
        s.close()
