"""The Tempo double (tests/unit/tempo_servicegraph.py) proven with Tempo's own test cases.

Each case below re-expresses, in our words and with our own ids, a test of grafana/tempo's
modules/generator/processor/servicegraphs (servicegraphs_test.go, store/store_test.go and the
traces of its testdata/) at commit ad33aa8fafc41a4ea58519f7b7a88b1aa1383224: what the spans are
and which series Tempo's test expects. Exemplars, native histograms, filter policies and the
connection_info gauge are not ported, so neither are their tests. The ingestion window (Tempo's
generator, instance.go) has no test in that package; its cases here follow instance.go.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.tempo_servicegraph import (
    CLIENT_SECONDS,
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_PRODUCER,
    KIND_SERVER,
    MESSAGING_SECONDS,
    REQUEST_FAILED,
    REQUEST_TOTAL,
    SERVER_SECONDS,
    STATUS_ERROR,
    ServiceGraph,
    ServiceGraphConfig,
    Span,
)

NOW = 1_800_000_000.0          # our clock for every case (wall seconds)
T0 = int((NOW - 1) * 1e9)      # the traces happen one second before it
OK = 1
MS = 1_000_000
TID = bytes.fromhex("4290b5877a9930de7bb4428365398ecc")


def sp(svc, kind, sid, parent=b"", dur_ns=1000, start=T0, status=0, res=None, **attrs):
    return Span(resource={"service.name": svc, **(res or {})} if svc is not None else (res or {}),
                kind=kind, trace_id=TID, span_id=sid, parent_span_id=parent,
                attributes=attrs, status=status, start_ns=start, end_ns=start + dur_ns)


def dot(**kw):  # attribute names with dots, as keyword arguments with underscores
    return {k.replace("__", "."): v for k, v in kw.items()}


# -- the "mythical" trace of Tempo's testdata (trace-with-queue-database.json and its variants):
# a requester calls a server (both spans carry `beast` and `god`, god=ares on the client and
# zeus on the server), the server calls a database (the database attributes vary by variant),
# makes two more client calls nobody answers, the requester publishes to rabbitmq (PRODUCER,
# 0.068864 ms) and a recorder consumes it (CONSUMER, 0.699392 ms, starting 9.8816 ms after the
# producer ended), and the requester makes two more client calls nobody answers.
R, S, D, X1, X2, P, Y1, Y2, C = (bytes([i] * 8) for i in range(1, 10))
DB_POSTGRES = dot(db__name="postgres", db__system="postgresql",
                  db__connection_string="jdbc:postgresql://mythical-database:5432/postgres",
                  db__user="postgres", db__statement="SELECT name from manticore")
DB_VARIANTS = {  # variant -> the database client span's attributes
    "queue-database": DB_POSTGRES,
    "queue-database2 (server.address)": {**DB_POSTGRES, "server.address": "mythical-database",
                                         "server.port": "5432"},
    "queue-database3 (peer.service)": {**DB_POSTGRES, "peer.service": "mythical-database",
                                       "server.port": "5432"},
    "queue-database4 (network.peer with port)": {**DB_POSTGRES,
                                                 "network.peer.address": "mythical-database",
                                                 "network.peer.port": "5432"},
    "queue-database5 (network.peer without port)": {**DB_POSTGRES,
                                                    "network.peer.address": "mythical-database"},
    "without database name (db.system + server.address)": dot(
        db__system="postgresql", server__address="mythical-database", server__port="5432"),
    "db.namespace": dot(db__namespace="mydb", db__system="postgresql"),
    "db.system.name only": dot(db__system__name="postgresql"),
    "db.system and db.system.name disagree": dot(db__system="mssql",
                                                 db__system__name="microsoft.sql_server"),
    "db.name and db.namespace": dot(db__name="postgres", db__namespace="priority-db",
                                    db__system="postgresql"),
}


def mythical(db=DB_POSTGRES, extra=None):
    extra = extra or {}
    prod_end = T0 + 20 * MS
    return [
        sp("mythical-requester", KIND_CLIENT, R, dur_ns=45_834_496, status=OK, beast="manticore",
           god="ares", **extra),
        sp("mythical-server", KIND_SERVER, S, R, dur_ns=29_986_048, start=T0 + MS, status=OK,
           god="zeus", beast="manticore", **extra),
        sp("mythical-server", KIND_CLIENT, D, S, dur_ns=23_781_376, start=T0 + 2 * MS,
           **db, **extra),
        sp("mythical-server", KIND_CLIENT, X1, S, dur_ns=3_855_104, status=OK, **extra),
        sp("mythical-server", KIND_CLIENT, X2, X1, dur_ns=802_304, **{"peer.ipv4": "172.22.0.6"},
           **extra),
        sp("mythical-requester", KIND_PRODUCER, P, b"\xa0" * 8, dur_ns=68_864,
           start=prod_end - 68_864, **{"messaging.system": "rabbitmq"}, **extra),
        sp("mythical-requester", KIND_CLIENT, Y1, R, dur_ns=13_806_080, status=OK, **extra),
        sp("mythical-requester", KIND_CLIENT, Y2, R, dur_ns=6_227_968, status=OK, **extra),
        sp("mythical-recorder", KIND_CONSUMER, C, P, dur_ns=699_392, start=prod_end + 9_881_600,
           **{"messaging.system": "rabbitmq"}, **extra),
    ]


def failed_trace():
    """trace-with-failed-requests.json: the requester's call and the server's span are ERROR,
    so is the server's database call (db.name postgres); the other calls are OK."""
    return [
        sp("mythical-requester", KIND_CLIENT, R, dur_ns=15_317_504, status=STATUS_ERROR,
           beast="illithid"),
        sp("mythical-server", KIND_SERVER, S, R, dur_ns=7_309_568, status=STATUS_ERROR),
        sp("mythical-server", KIND_CLIENT, D, S, dur_ns=2_778_624, status=STATUS_ERROR,
           **DB_POSTGRES),
        sp("mythical-server", KIND_CLIENT, X1, S, dur_ns=5_684_992, status=OK),
        sp("mythical-server", KIND_CLIENT, X2, X1, dur_ns=1_389_568,
           **{"peer.ipv4": "172.22.0.6"}),
        sp("mythical-requester", KIND_CLIENT, Y1, R, dur_ns=10_907_648, status=OK),
        sp("mythical-requester", KIND_CLIENT, Y2, R, dur_ns=9_249_792, status=OK),
    ]


def virtual_nodes_trace():
    """trace-with-virtual-nodes.json: a root SERVER span of mythical-server (no parent), a
    CLIENT span of mythical-requester (peer.service external-payments-platform) whose server
    never reports, and in another trace a root CONSUMER span of internal-consumer carrying
    peer.service external-producer."""
    other = bytes.fromhex("ab4a390ad2fe3b8534404c9f7223a390")
    return [
        sp("mythical-server", KIND_SERVER, b"\x01" * 8, status=OK, dur_ns=45 * MS,
           beast="manticore"),
        sp("mythical-requester", KIND_CLIENT, b"\x02" * 8, b"\x01" * 8, dur_ns=MS,
           **{"peer.service": "external-payments-platform"}),
        replace(sp("internal-consumer", KIND_CONSUMER, b"\x03" * 8, dur_ns=MS,
                   **{"peer.service": "external-producer"}), trace_id=other),
    ]


def expired_edges_trace():
    """trace-with-expired-edges.json: a root SERVER span; a CLIENT span under it answered by a
    SERVER span; a CLIENT span with db.system=mysql (a database edge, complete at once); a
    SERVER span whose parent never arrives."""
    a, b, c, d, e, f = (bytes([0x10 + i] * 8) for i in range(6))
    return [
        sp("mythical-server", KIND_SERVER, a, status=OK),
        sp("mythical-server", KIND_CLIENT, b, a, status=OK),
        sp("mythical-requester", KIND_SERVER, c, b),
        sp("mythical-requester", KIND_CLIENT, d, b, **{"db.system": "mysql"}),
        sp("mythical-requester", KIND_SERVER, e, f),
    ]


def graph(**cfg):
    return ServiceGraph(ServiceGraphConfig(**cfg), clock=lambda: NOW)


def run(spans, expire=False, **cfg):
    g = graph(**cfg)
    g.push(spans)
    if expire:
        g.expire(NOW + g.config.wait_s)
    return g


REQ_SRV = {"client": "mythical-requester", "server": "mythical-server"}
SRV_DB = {"client": "mythical-server", "server": "postgres", "connection_type": "database"}
REQ_REC = {"client": "mythical-requester", "server": "mythical-recorder",
           "connection_type": "messaging_system"}


def le(labels, bound):
    return {**labels, "le": bound}


# -- TestServiceGraphs: dimensions beast and god, buckets [0.04], messaging histogram on --------
@pytest.mark.parametrize("name,labels,want", [
    (REQUEST_TOTAL, {**REQ_SRV, "beast": "manticore", "god": "zeus"}, 1.0),  # server's god wins
    (REQUEST_FAILED, {**REQ_SRV, "beast": "manticore", "god": "zeus"}, 0.0),
    (REQUEST_TOTAL, SRV_DB, 1.0), (REQUEST_FAILED, SRV_DB, 0.0),
    (REQUEST_TOTAL, REQ_REC, 1.0), (REQUEST_FAILED, REQ_REC, 0.0),
    (CLIENT_SECONDS + "_bucket", le({**REQ_SRV, "beast": "manticore", "god": "zeus"}, "0.04"), 0.0),
    (CLIENT_SECONDS + "_bucket", le({**REQ_SRV, "beast": "manticore", "god": "zeus"}, "+Inf"), 1.0),
    (CLIENT_SECONDS + "_count", {**REQ_SRV, "beast": "manticore", "god": "zeus"}, 1.0),
    (SERVER_SECONDS + "_bucket", le({**REQ_SRV, "beast": "manticore", "god": "zeus"}, "0.04"), 1.0),
    (SERVER_SECONDS + "_count", {**REQ_SRV, "beast": "manticore", "god": "zeus"}, 1.0),
    (CLIENT_SECONDS + "_bucket", le(SRV_DB, "0.04"), 1.0),
    (SERVER_SECONDS + "_bucket", le(SRV_DB, "0.04"), 1.0),
    (SERVER_SECONDS + "_count", SRV_DB, 1.0),
    (CLIENT_SECONDS + "_bucket", le(REQ_REC, "0.04"), 1.0),
    (SERVER_SECONDS + "_bucket", le(REQ_REC, "+Inf"), 1.0),
    (MESSAGING_SECONDS + "_bucket", le(REQ_REC, "0.04"), 1.0),
    (MESSAGING_SECONDS + "_count", REQ_REC, 1.0),
])
def test_tempo_service_graphs_dimensions_database_and_messaging(name, labels, want):
    g = run(mythical(), histogram_buckets=(0.04,), dimensions=("beast", "god"),
            enable_messaging_system_latency_histogram=True)
    assert g.query(name, labels) == want


@pytest.mark.parametrize("name,labels,want", [
    (CLIENT_SECONDS + "_sum", {**REQ_SRV, "beast": "manticore", "god": "zeus"}, 0.045),
    (SERVER_SECONDS + "_sum", {**REQ_SRV, "beast": "manticore", "god": "zeus"}, 0.029),
    (CLIENT_SECONDS + "_sum", SRV_DB, 0.023), (SERVER_SECONDS + "_sum", SRV_DB, 0.023),
    (CLIENT_SECONDS + "_sum", REQ_REC, 0.000068), (SERVER_SECONDS + "_sum", REQ_REC, 0.000693),
])
def test_tempo_service_graphs_latency_sums(name, labels, want):
    g = run(mythical(), histogram_buckets=(0.04,), dimensions=("beast", "god"),
            enable_messaging_system_latency_histogram=True)
    assert g.query(name, labels) == pytest.approx(want, abs=0.001)
    assert g.query(MESSAGING_SECONDS + "_sum", REQ_REC) == pytest.approx(0.0098816, abs=1e-12)


def test_tempo_prefix_dimensions_keep_each_sides_value():
    g = run(mythical(), histogram_buckets=(0.04,), dimensions=("beast", "god"),
            enable_client_server_prefix=True)
    assert g.query(REQUEST_TOTAL, {**REQ_SRV, "client_beast": "manticore",
                                   "server_beast": "manticore", "client_god": "ares",
                                   "server_god": "zeus"}) == 1.0


def test_tempo_failed_requests_come_from_either_spans_error_status():
    g = run(failed_trace())
    assert g.query(REQUEST_TOTAL, REQ_SRV) == g.query(REQUEST_FAILED, REQ_SRV) == 1.0
    assert g.query(REQUEST_TOTAL, SRV_DB) == g.query(REQUEST_FAILED, SRV_DB) == 1.0


def test_tempo_too_many_items_drops_spans():
    g = run(mythical(), max_items=1)
    assert g.dropped_spans > 0


VIRTUAL = {"connection_type": "virtual_node"}


@pytest.mark.parametrize("label", [False, True])
def test_tempo_virtual_nodes_on_expiry(label):
    g = run(virtual_nodes_trace(), expire=True, wait_s=1e-9, enable_virtual_node_label=label)
    user = {"client": "user", "server": "mythical-server", **VIRTUAL}
    peer = {"client": "mythical-requester", "server": "external-payments-platform", **VIRTUAL}
    prod = {"client": "external-producer", "server": "internal-consumer", **VIRTUAL}
    if label:
        user["virtual_node"], peer["virtual_node"], prod["virtual_node"] = "client", "server", "client"
    for labels in (user, peer, prod):
        assert g.query(REQUEST_TOTAL, labels) == 1.0
        assert g.query(REQUEST_FAILED, labels) == 0.0


def test_tempo_expired_edges_four_new_one_expired_server():
    g = run(expired_edges_trace(), expire=True, wait_s=1e-9, enable_virtual_node_label=True)
    assert g.expired_edges == {"SPAN_KIND_SERVER": 1}
    assert g.total_edges == 4 and g.dropped_spans == 0


def test_tempo_expired_edges_by_the_kind_of_the_unmatched_span():
    spans = [replace(sp(name, kind, bytes([i + 1]), parent), trace_id=bytes([i + 1]))
             for i, (name, kind, parent) in enumerate([
                 ("client", KIND_CLIENT, b""), ("server", KIND_SERVER, b"\x10"),
                 ("producer", KIND_PRODUCER, b""), ("consumer", KIND_CONSUMER, b"\x11")])]
    g = run(spans, expire=True, wait_s=1e-9)
    assert g.expired_edges == {"SPAN_KIND_CLIENT": 1, "SPAN_KIND_SERVER": 1,
                               "SPAN_KIND_PRODUCER": 1, "SPAN_KIND_CONSUMER": 1}


DB = "mythical-database"


@pytest.mark.parametrize("variant,server,total", [
    ("virtual nodes trace (no database)", DB, 0.0),
    ("without database name (db.system + server.address)", DB, 1.0),
    ("queue-database", "postgres", 1.0),
    ("queue-database2 (server.address)", DB, 1.0),
    ("queue-database3 (peer.service)", DB, 1.0),
    ("queue-database4 (network.peer with port)", DB + ":5432", 1.0),
    ("queue-database5 (network.peer without port)", DB, 1.0),
    ("db.namespace", "mydb", 1.0),
    ("db.name and db.namespace", "priority-db", 1.0),
    ("db.system.name only", "postgresql", 1.0),
    ("db.system and db.system.name disagree", "mssql", 1.0),
])
def test_tempo_database_edges_are_named_by_the_first_attribute_found(variant, server, total):
    spans = virtual_nodes_trace() if variant.startswith("virtual") else mythical(DB_VARIANTS[variant])
    g = run(spans, histogram_buckets=(0.04,), enable_messaging_system_latency_histogram=True)
    labels = {"client": "mythical-server", "server": server, "connection_type": "database"}
    assert g.query(REQUEST_TOTAL, labels) == total
    assert g.query(REQUEST_FAILED, labels) == 0.0
    for h in (CLIENT_SECONDS, SERVER_SECONDS):
        assert g.query(h + "_bucket", le(labels, "0.04")) == total
        assert g.query(h + "_bucket", le(labels, "+Inf")) == total
        assert g.query(h + "_count", labels) == total


def test_tempo_prefixed_dimensions_with_the_virtual_node_label():
    g = run(mythical(), histogram_buckets=(0.04,), dimensions=("db.system", "messaging.system"),
            enable_client_server_prefix=True, enable_virtual_node_label=True)
    assert g.query(REQUEST_TOTAL, {**REQ_REC, "client_messaging_system": "rabbitmq",
                                   "server_messaging_system": "rabbitmq"}) == 1.0
    assert g.query(REQUEST_TOTAL, {**SRV_DB, "client_db_system": "postgresql"}) == 1.0
    assert g.query(REQUEST_FAILED, {**SRV_DB, "client_db_system": "postgresql"}) == 0.0


def test_tempo_database_name_attributes_option():
    g = run(mythical(), histogram_buckets=(0.04,), dimensions=("beast", "god"),
            database_name_attributes=("db.system",))
    assert g.query(REQUEST_TOTAL, {"client": "mythical-server", "server": "postgresql",
                                   "connection_type": "database", "beast": "", "god": ""}) == 1.0


def test_tempo_span_multiplier_scales_the_counts():
    g = run(mythical(extra={"sampler.param": 0.5}), histogram_buckets=(0.04,),
            span_multiplier_key="sampler.param")
    assert g.query(REQUEST_TOTAL, REQ_SRV) == 2.0
    assert g.query(CLIENT_SECONDS + "_count", REQ_SRV) == 2.0


def test_span_multiplier_only_from_a_double_and_span_before_resource():
    # facts of util.go GetSpanMultiplier: an integer attribute is not a ratio; span wins
    for attrs, res, want in (({"r": 1}, {}, 1.0), ({"r": 0.25}, {"r": 0.5}, 4.0),
                             ({}, {"r": 0.5}, 2.0), ({"r": 0.0}, {}, 1.0)):
        g = run([sp("a", KIND_CLIENT, R, res=res, **attrs), sp("b", KIND_SERVER, S, R, res=res,
                                                              **attrs)],
                span_multiplier_key="r")
        assert g.query(REQUEST_TOTAL, {"client": "a", "server": "b"}) == want


A_B = {"client": "svc-a", "server": "svc-b"}


def test_tempo_a_non_root_server_spans_peer_attribute_changes_nothing():
    g = run([sp("svc-a", KIND_CLIENT, b"\x0b"),
             sp("svc-b", KIND_SERVER, b"\x0c", b"\x0b", **{"peer.service": "external-peer"})],
            expire=True, wait_s=1e-9)
    assert g.query(REQUEST_TOTAL, A_B) == 1.0
    assert all("external-peer" not in str(lab) for s in g.series().values() for lab in s)


def test_tempo_the_servers_peer_survives_a_client_database_update():
    g = run([sp("svc-b", KIND_SERVER, b"\x2c", b"\x2b", **{"peer.service": "external-peer"}),
             sp("svc-a", KIND_CLIENT, b"\x2b", **{"db.namespace": "database",
                                                    "server.address": ""})],
            expire=True, wait_s=1e-9)
    assert g.query(REQUEST_TOTAL, {"client": "svc-a", "server": "external-peer", **VIRTUAL}) == 1
    assert g.expired_edges == {}


@pytest.mark.parametrize("key", ["db.system", "db.system.name"])
def test_tempo_db_system_names_a_virtual_server(key):
    g = run([sp("svc-a", KIND_CLIENT, b"\x3b", **{key: "postgresql"})], expire=True,
            wait_s=1e-9, database_name_attributes=())
    assert g.query(REQUEST_TOTAL, {"client": "svc-a", "server": "postgresql", **VIRTUAL}) == 1


@pytest.mark.parametrize("order", ["client first", "server first", "producer and consumer"])
def test_tempo_a_server_with_an_empty_service_name_becomes_its_peer(order):
    peer = {"peer.service": "external-peer"}
    ck, sk = (KIND_PRODUCER, KIND_CONSUMER) if order.startswith("producer") else (KIND_CLIENT,
                                                                                  KIND_SERVER)
    client = sp("svc-a", ck, b"\x1b")
    server = sp("", sk, b"\x1c", b"\x1b", **peer)
    spans = [server, client] if order == "server first" else [client, server]
    g = run(spans, expire=True, wait_s=1e-9)
    assert g.query(REQUEST_TOTAL, {"client": "svc-a", "server": "external-peer", **VIRTUAL}) == 1


def test_tempo_defaults():
    c = ServiceGraphConfig()
    assert c.peer_attributes == ("peer.service", "db.name", "db.system", "db.system.name")
    assert c.database_name_attributes == ("db.namespace", "db.name", "db.system",
                                          "db.system.name")
    assert (c.wait_s, c.max_items, c.ingestion_slack_s) == (10.0, 10_000, 30.0)
    assert c.histogram_buckets == pytest.approx((0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8))


# -- store/store_test.go -------------------------------------------------------------------------
def test_store_a_pair_completes_once_and_leaves_the_store():
    g = graph(wait_s=3600)
    g.push([sp("client", KIND_CLIENT, R)], now=NOW)
    assert g.waiting == 1 and g.expire(NOW) is None and g.waiting == 1
    g.push([sp("server", KIND_SERVER, S, R)], now=NOW)
    assert g.waiting == 0 and g.query(REQUEST_TOTAL, {"client": "client", "server": "server"}) == 1
    # the same key again is a new edge (a duplicate is not merged into the completed one)
    g.push([sp("client", KIND_CLIENT, R)], now=NOW)
    assert g.waiting == 1 and g.total_edges == 2
    g.expire(NOW + 3600)
    assert g.waiting == 0 and g.expired_edges == {"SPAN_KIND_CLIENT": 1}


def test_store_full_refuses_new_keys_but_updates_known_ones():
    g = graph(max_items=1)
    g.push([replace(sp("client", KIND_CLIENT, b"\x01"), trace_id=b"k1")])
    g.push([replace(sp("client", KIND_CLIENT, b"\x01"), trace_id=b"k2")])
    assert g.waiting == 1 and g.dropped_spans == 1
    g.push([replace(sp("client", KIND_CLIENT, b"\x01"), trace_id=b"k1")])
    assert g.waiting == 1 and g.dropped_spans == 1 and g.series()[REQUEST_TOTAL] == {}


def test_store_expire_evicts_everything_past_its_wait_oldest_first():
    g = graph(wait_s=10)
    for i in range(100):
        g.push([replace(sp("c", KIND_CLIENT, b"\x01"), trace_id=bytes([i]))], now=NOW + i / 10)
    g.expire(NOW + 10)       # whole seconds: created in [NOW, NOW+1) expire at NOW+10
    assert g.waiting == 90
    g.expire(NOW + 20)
    assert g.waiting == 0 and g.expired_edges == {"SPAN_KIND_CLIENT": 100}


# -- the ingestion window (modules/generator/instance.go) ----------------------------------------
@pytest.mark.parametrize("end_offset_s,kept", [
    (-31, False), (-30, True), (-1, True), (0, True), (30, True), (31, False)])
def test_spans_whose_end_is_outside_now_plus_minus_the_slack_are_discarded(end_offset_s, kept):
    g = graph()
    end = int((NOW + end_offset_s) * 1e9)
    pair = [sp("a", KIND_CLIENT, R, start=end - MS, dur_ns=MS),
            sp("b", KIND_SERVER, S, R, start=end - MS, dur_ns=MS)]
    assert g.push(pair) == (0 if kept else 2)
    assert g.query(REQUEST_TOTAL, {"client": "a", "server": "b"}) == (1.0 if kept else 0.0)
    assert g.discarded_spans == ({} if kept else {"outside_metrics_ingestion_slack": 2})


def test_one_late_half_of_a_pair_leaves_the_other_to_expire_or_become_a_virtual_node():
    g = graph()
    late = int((NOW - 40) * 1e9)
    g.push([sp("a", KIND_CLIENT, R, **{"peer.service": "b"}),
            sp("b", KIND_SERVER, S, R, start=late - MS, dur_ns=MS)])
    g.expire(NOW + 10)
    assert g.edges() == {("a", "b"): 1.0}
    assert g.query(REQUEST_TOTAL, {"client": "a", "server": "b", **VIRTUAL}) == 1.0


def test_names_are_service_name_only_namespaces_need_the_dimension():
    spans = []
    for i, (cns, sns) in enumerate((("staging", "prod"), ("prod", "prod"))):
        c, s = bytes([i + 1] * 8), bytes([i + 0x20] * 8)
        spans += [sp("api", KIND_CLIENT, c, res={"service.namespace": cns}),
                  sp("api", KIND_SERVER, s, c, res={"service.namespace": sns})]
    assert run(spans).edges() == {("api", "api"): 2.0}      # one self-loop
    g = run(spans, dimensions=("service.namespace",), enable_client_server_prefix=True)
    assert g.series()[REQUEST_TOTAL] == {
        frozenset({("client", "api"), ("server", "api"), ("client_service_namespace", ns_c),
                   ("server_service_namespace", "prod")}): 1.0 for ns_c in ("staging", "prod")}
    # the Collector connector always prefixes
    g = ServiceGraph(ServiceGraphConfig.collector_connector(dimensions=("service.namespace",)))
    g.push(spans)
    assert len(g.series()[REQUEST_TOTAL]) == 2
