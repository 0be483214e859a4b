"""The ClickHouse store on a replicated cluster: ZooKeeper and four real clickhouse-server 18.16
processes, 2 shards x 2 replicas with `internal_replication` (tests/servers.py
`ReplicatedClickHouse`, started once for the module, no root needed).

- the local tables are `ReplicatedReplacingMergeTree` on every replica, `Distributed` on top,
  on every server of the cluster (any of them can be the entry); plain local tables without
  replicas (the default);
- a replica killed -9 (the very server the store's URL names first): reads keep working through
  the other servers (`alt_hosts`) and the shard's other replica; an insert that cannot reach its
  quorum is refused, never acknowledged; nothing acknowledged is lost or doubled; restarted,
  the replica catches up with its shard."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from aggregator.store.clickhouse import ClickHouseStore
from eastwest import codec
from eastwest.codec import Batch
from tests.servers import ReplicatedClickHouse, shared_clickhouse
from tests.unit.test_correlate import T0, rec

INGEST, READ = "i" * 24, "r" * 24
TABLES = ("flows", "ingested_batches", "connections", "rollups", "workloads")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    r = ReplicatedClickHouse(tmp_path_factory.mktemp("chr")).start()
    yield r
    r.stop()


def engines(server, database: str) -> dict[str, str]:
    rows = server.client().execute("SELECT name, engine FROM system.tables WHERE database = "
                                   "%(d)s", {"d": database})
    return dict(rows)


def retried(fn, what: str, timeout: float = 60.0):
    """What a collector (or a reader) does on 503 or a broken connection: try again."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            r = fn()
            if r.status_code == 200:
                return r
            last = f"{r.status_code} {r.text[:200]}"
        except Exception as exc:  # noqa: BLE001 - the test client re-raises server errors
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > give_up:
            pytest.fail(f"{what}: {last}")
        time.sleep(0.2)


def send(c: TestClient, collector: str, seq: int, records) -> dict:
    body = codec.encode_batch(Batch(collector, seq, T0, list(records)))
    return retried(lambda: c.post("/api/v1/ingest", content=body, headers={
        "Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE}),
        f"batch ({collector}, {seq})").json()


def flows(c: TestClient) -> list[dict]:
    return retried(lambda: c.get("/api/v1/flows", params={"limit": "1000"}, headers={
        "Authorization": f"Bearer {READ}"}), "flows").json()["flows"]


def pair(c: TestClient, seq: int, n: int = 10) -> None:
    """n connections, the client's and the server's halves from their two collectors."""
    ports = [50000 + seq * 100 + j for j in range(n)]
    send(c, "h1", seq, [rec("client", cport=p) for p in ports])
    send(c, "h2", seq, [rec("server", cport=p) for p in ports])


def test_local_tables_are_replicated_under_distributed_tables_on_every_server(cluster):
    store = ClickHouseStore(cluster.url("rep_tables"))
    try:
        assert store.replicated
        for s in cluster.all:
            local = engines(s, "ew")
            assert {local[f"rep_tables_{t}"] for t in TABLES} == {"ReplicatedReplacingMergeTree"}
            assert set(engines(s, "rep_tables").values()) == {"Distributed"}
    finally:
        store.close()
    plain = ClickHouseStore(shared_clickhouse().url("rep_plain"))  # 2 shards, no replicas
    try:
        assert not plain.replicated
        local = engines(shared_clickhouse(), "ew_s1")
        assert local["rep_plain_flows"] == "ReplacingMergeTree"
    finally:
        plain.close()


def test_a_replica_killed_and_restarted_loses_nothing_acknowledged(cluster, tmp_path):
    victim, peer = cluster.servers[0]  # replica 1 of shard 1: also the URL's first server
    settings = AggregatorSettings(data_dir=tmp_path / "a", ingest_token=INGEST, read_token=READ,
                                  retention=None, store="clickhouse",
                                  clickhouse_url=cluster.url("rep_fault"))
    with ExitStack() as stack:
        c = stack.enter_context(TestClient(create_app(settings)))
        for seq in range(1, 4):
            pair(c, seq)
        assert len(flows(c)) == 30
        victim.kill()
        # ZooKeeper notices when the victim's session expires (6 s): then the peer knows it is
        # alone (until then a quorum insert would wait for the victim, up to its timeout)
        give_up = time.monotonic() + 60
        while peer.client().execute(
                "SELECT max(active_replicas) FROM system.replicas WHERE database = 'ew' AND "
                "table LIKE 'rep_fault_%'")[0][0] != 1:
            assert time.monotonic() < give_up, "the victim's ZooKeeper session never expired"
            time.sleep(0.2)
        # while a replica of shard 1 is down, an insert cannot reach its quorum (2 replicas):
        # it is refused, never acknowledged (the collector's spool, or JetStream, keeps it)
        body = codec.encode_batch(Batch("h1", 4, T0, [rec("client", cport=50400 + j)
                                                       for j in range(10)]))
        r = c.post("/api/v1/ingest", content=body, headers={
            "Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE})
        assert r.status_code == 503, r.text
        got = flows(c)  # reads keep working, from the shard's other replica
        assert len(got) == 30
        assert all(f["observed_by"] == ["client", "server"] for f in got)
        victim.start()  # on its own data directory: it catches up from its peer
        # what was refused, sent again (the same bytes: its records may be half written,
        # under the same keys), then the rest
        retried(lambda: c.post("/api/v1/ingest", content=body, headers={
            "Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE}), "again")
        send(c, "h2", 4, [rec("server", cport=50400 + j) for j in range(10)])
        for seq in (5, 6):
            pair(c, seq)
        got = flows(c)
        assert len(got) == 60
        assert all(f["observed_by"] == ["client", "server"] for f in got)
        local = {t: f"ew.rep_fault_{t}" for t in ("flows", "ingested_batches")}
        for t in local.values():
            victim.client().execute(f"SYSTEM SYNC REPLICA {t}")
        for t in local.values():
            mine = victim.client().execute(f"SELECT count() FROM {t} FINAL")[0][0]
            theirs = peer.client().execute(f"SELECT count() FROM {t} FINAL")[0][0]
            assert mine == theirs > 0
        # a batch sent again (its ack was lost) is a duplicate, stored once
        again = send(c, "h1", 5, [rec("client", cport=50500 + j) for j in range(10)])
        assert again["duplicate"] is True
        got = flows(c)
        assert len(got) == 60 and len({f["id"] for f in got}) == 60
    raw = peer.client().execute(
        "SELECT collector, batch_seq, record_id, count() AS n FROM rep_fault.flows FINAL "
        "GROUP BY collector, batch_seq, record_id HAVING n > 1")
    assert raw == []
    assert peer.client().execute("SELECT count() FROM rep_fault.flows FINAL")[0][0] == 120


def test_an_old_replicated_connections_table_gets_the_deleted_column_everywhere(cluster):
    """Tables made before tombstones (replicated local tables on the 4 replicas, Distributed
    tables on every server, none with `deleted`): opening the store adds the column to all of
    them, and a connection read through any server is live (docs/scale-out.md)."""
    from dataclasses import replace

    from aggregator.store.clickhouse_schema import TABLE, distributed_ddl, local_ddl, replica_of
    from tests.servers import REPLICATED_CLUSTER

    db, local = "rep_old", "rep_old_connections"
    old = replace(TABLE["connections"],
                  columns=[c for c in TABLE["connections"].columns if c.split()[0] != "deleted"])
    name = REPLICATED_CLUSTER
    for shard, row in enumerate(cluster.servers, start=1):
        for s in row:
            c = s.client()
            c.execute("CREATE DATABASE IF NOT EXISTS ew")
            c.execute(local_ddl(old, f"ew.{local}", (18, 16), None,
                                replica_of(name, local, shard, "127.0.0.1", s.port)))
    for s in cluster.all:
        c = s.client()
        c.execute(f"CREATE DATABASE IF NOT EXISTS {db}")
        c.execute(distributed_ddl(old, f"{db}.connections", name, local))
    store = ClickHouseStore(cluster.url(db))
    try:
        give_up = time.monotonic() + 30  # a replica applies its shard's ALTER from the log
        for s in cluster.all:
            for d, t in ((db, "connections"), ("ew", local)):
                while True:
                    rows = s.client().execute(
                        "SELECT type, default_expression FROM system.columns WHERE database = "
                        f"'{d}' AND table = '{t}' AND name = 'deleted'")
                    if rows or time.monotonic() > give_up:
                        break
                    time.sleep(0.2)
                assert rows == [("UInt8", "0")], (s.port, d, t)
            assert s.client().execute(f"SELECT count() FROM {db}.connections FINAL "
                                      "WHERE deleted = 0") == [(0,)]
        assert store.connection_count() == 0
    finally:
        store.close()
