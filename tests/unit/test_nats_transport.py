"""The NATS JetStream transport against a real nats-server 2.9 and a real ClickHouse 18.16 (two
local shards): collectors publish each batch split by partition, aggregator replicas share the
partitions through leases (one durable pull consumer per partition), a batch is acked only once
stored, and `(collector, partition, batch_seq)` makes redelivery harmless.

No root needed: both servers run as this user on free loopback ports (tests/servers.py)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from collector.export import AggregatorSink, ExportSettings
from collector.pipeline import CollectorContext
from collector.transport import Accepted, Refused, Retry
from collector.transport_nats import NatsSender
from eastwest import codec
from eastwest.codec import Batch
from eastwest.errors import ConfigError
from eastwest.jetstream import NatsOptions
from eastwest.record import Process
from tests.servers import NatsServer, shared_clickhouse
from tests.unit.test_correlate import T0, rec

INGEST, READ = "i" * 24, "r" * 24
RH = {"Authorization": f"Bearer {READ}"}


@pytest.fixture
def nats_server(tmp_path):
    s = NatsServer(tmp_path / "nats").start()
    yield s
    s.stop()


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60.0) -> object:
    """Poll an observable condition (not a timing assertion: the deadline only bounds a hang)."""
    give_up = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > give_up:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def sender(opts: NatsOptions, collector: str) -> NatsSender:
    return NatsSender(opts, collector)


def accepted(s: NatsSender, data: bytes) -> bool:
    return isinstance(s.send(data), Accepted)


def body(collector: str, seq: int, records) -> bytes:
    return codec.encode_batch(Batch(collector, seq, T0, list(records)))


def replica(stack: ExitStack, tmp_path, name: str, db: str, opts: NatsOptions,
            **over) -> TestClient:
    settings = AggregatorSettings(
        data_dir=tmp_path / name, ingest_token=INGEST, read_token=READ, retention=None,
        store="clickhouse", clickhouse_url=shared_clickhouse().url(db), nats=opts,
        nats_ack_wait_s=2.0, nats_lease_s=1.5, nats_replica=name, **over)
    c = stack.enter_context(TestClient(create_app(settings)))
    assert c.app.state.pipeline.consumer.ready.wait(30)
    return c


def flows(c: TestClient, **params) -> list[dict]:
    r = c.get("/api/v1/flows", params={"limit": "1000", **params}, headers=RH)
    assert r.status_code == 200, r.text
    return r.json()["flows"]


def test_the_stream_is_created_with_retention_and_a_byte_limit(nats_server):
    opts = NatsOptions(nats_server.url, max_bytes=64 * 1024 * 1024, max_age_s=3600)
    s = sender(opts, "node-1.example")
    try:
        # one subject per partition and collector
        assert s.subject == "eastwest.flows.p0.node-1_example"
        info = s.loop.run(s.js.stream_info("EASTWEST"), 10)
    finally:
        s.close()
    cfg = info.config
    assert cfg.subjects == [f"eastwest.flows.p{k}.>" for k in range(6)]  # they state P = 6
    value = lambda v: getattr(v, "value", v)  # noqa: E731 - enums or their strings
    assert (value(cfg.retention), value(cfg.discard), value(cfg.storage)) == ("workqueue", "new", "file")
    assert (cfg.max_bytes, cfg.max_age) == (64 * 1024 * 1024, 3600)


def test_a_stream_of_someone_else_is_refused_naming_it(nats_server):
    import nats
    from nats.js.api import StreamConfig

    async def foreign():
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(StreamConfig(name="EASTWEST", subjects=["orders.>"]))
        await nc.close()

    asyncio.run(foreign())
    with pytest.raises(ConfigError, match=r"orders\.>"):
        sender(NatsOptions(nats_server.url), "h1")


def test_a_stream_of_another_partition_count_is_refused_naming_both(nats_server):
    sender(NatsOptions(nats_server.url, partitions=4), "h1").close()
    with pytest.raises(ConfigError, match=r"created with 4 partitions.*--nats-partitions 4"):
        sender(NatsOptions(nats_server.url), "h2")


def test_a_batch_is_split_by_connection_and_each_share_is_marked(nats_server):
    s = sender(NatsOptions(nats_server.url), "h1")
    try:
        recs = [rec(o, cport=46000 + i, collector="h1") for i in range(40)
                for o in ("client", "server", "path")]
        shares = s.shares(body("h1", 9, recs))
        assert len(shares) == 6  # 40 connections reach every partition
        seen: dict[int, int] = {}
        for subject, data, msg_id in shares:
            b = codec.decode_batch(data)
            k = b.batch_seq % 1024
            assert (b.batch_seq // 1024, subject, msg_id) == (9, f"eastwest.flows.p{k}.h1",
                                                              f"h1:{b.batch_seq}")
            for r in b.records:  # every observer of a connection in one share
                assert seen.setdefault(r.client.port, k) == k
        assert sorted(seen) == list(range(46000, 46040))
        assert s.shares(body("h1", 10, []))[0][0] == "eastwest.flows.p0.h1"  # empty: one share
        assert s.send(b"EWB1 not a batch").reason == "nats_bad_batch"
    finally:
        s.close()


def test_batches_are_stored_exactly_once_even_when_published_twice(nats_server, tmp_path):
    opts = NatsOptions(nats_server.url)
    s = sender(opts, "h1")
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_once", opts)
        for i in range(7):
            assert accepted(s, body("h1", i + 1, [rec("client", cport=41000 + i, c2s=100 + i)]))
        again = body("h1", 3, [rec("client", cport=41002, c2s=102)])
        assert accepted(s, again)  # within the duplicate window: JetStream drops it (msg id)
        # past the window (no msg id here): delivered, found applied by its mark, only acked
        (subject, share, _), = s.shares(again)
        s.loop.run(s.js.publish(subject, share), 10)
        consumer = c.app.state.pipeline.consumer
        wait_for(lambda: consumer.applied + consumer.duplicates == 8, "8 deliveries")
        assert (consumer.applied, consumer.duplicates) == (7, 1)
        got = flows(c)
        assert sorted(f["client"]["port"] for f in got) == list(range(41000, 41007))
        assert sorted(f["bytes_c2s"] for f in got) == list(range(100, 107))
        # acked only once stored: the work queue is empty
        info = s.loop.run(s.js.stream_info("EASTWEST"), 10)
        assert info.state.messages == 0
    s.close()


def test_shares_waiting_in_a_partition_are_written_together_once_and_idle_costs_no_error(
        nats_server, tmp_path):
    """Batches published before any replica runs wait in their partitions: the replica fetches
    each partition's waiting shares at once and writes them in coalesced groups (one write for
    several shares), every one stored once and acked; then, idle for several fetch timeouts,
    it counts no NATS trouble (a fetch of several messages that times out is no error)."""
    opts = NatsOptions(nats_server.url)
    s = sender(opts, "h1")
    for i in range(8):  # 8 batches of 12 connections: every partition gets several shares
        assert accepted(s, body("h1", i + 1, [rec("client", cport=42000 + 12 * i + j,
                                                  c2s=10 * i + j) for j in range(12)]))
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_coalesce", opts)
        consumer = c.app.state.pipeline.consumer
        wait_for(lambda: len(flows(c)) == 96, "96 connections")
        correlation = c.app.state.pipeline.correlation
        assert correlation.groups >= 1  # shares written together
        assert consumer.duplicates == 0 and consumer.records == 96
        got = flows(c)
        assert sorted(f["bytes_c2s"] for f in got) == sorted(10 * i + j for i in range(8)
                                                             for j in range(12))
        info = s.loop.run(s.js.stream_info("EASTWEST"), 10)
        assert info.state.messages == 0  # every share acked
        time.sleep(3 * consumer.cfg.fetch_timeout_s + 0.5)
        assert ("consume", "nats_unavailable") not in c.app.state.drops.snapshot()
    s.close()


def test_a_bad_batch_is_terminated_and_counted_and_does_not_block_the_queue(nats_server, tmp_path):
    opts = NatsOptions(nats_server.url)
    s = sender(opts, "h1")
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_bad", opts)
        s.loop.run(s.js.publish("eastwest.flows.p2.h1", b"EWB1 this is no zstd frame"), 10)
        assert accepted(s, body("h1", 1, [rec("client")]))
        wait_for(lambda: c.app.state.pipeline.consumer.applied == 1, "the good batch")
        assert c.app.state.drops.snapshot()[("ingest", "bad_batch")] == 1
        assert len(flows(c)) == 1
    s.close()


def test_replicas_share_the_partitions_and_correlate_as_one_aggregator(nats_server, tmp_path):
    """Two replicas own one of 2 partitions each (few shares: a quick test); the client's and the server's records of a
    connection (two collectors) meet in one partition: each connection is ONE row, and either
    replica answers the same from the shared store."""
    opts = NatsOptions(nats_server.url, partitions=2)
    with ExitStack() as stack:
        a = replica(stack, tmp_path, "a", "nats_turns", opts)
        b = replica(stack, tmp_path, "b", "nats_turns", opts)
        ca, cb = a.app.state.pipeline.consumer, b.app.state.pipeline.consumer
        wait_for(lambda: len(ca.owned) == len(cb.owned) == 1, "a partition each")
        assert ca.owned.isdisjoint(cb.owned)
        s1, s2 = sender(opts, "h1"), sender(opts, "h2")
        for i in range(2):  # the server's half first for some: order does not matter
            first, second = (s1, s2) if i % 2 else (s2, s1)
            for s in (first, second):
                obs, coll = ("client", "h1") if s is s1 else ("server", "h2")
                assert accepted(s, body(coll, 10 + i, [rec(obs, cport=44000 + 100 * i + j)
                                                      for j in range(15)]))
        wait_for(lambda: len(flows(a)) == 30 and all(
            f["observed_by"] == ["client", "server"] for f in flows(a)), "30 connections")
        assert ca.applied > 0 and cb.applied > 0  # both replicas did part of the work
        for c in (a, b):
            got = flows(c)
            assert len(got) == 30
        assert flows(a) == flows(b)
        # a batch posted over HTTP would not be split by partition: refused, saying why
        r = a.post("/api/v1/ingest", content=body("h1", 99, [rec("client")]), headers={
            "Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE})
        assert r.status_code == 409 and "--nats" in r.json()["detail"]
        s1.close()
        s2.close()


def test_a_partition_taken_over_is_reloaded_from_the_store_before_its_first_batch(nats_server,
                                                                                tmp_path):
    """Replica A correlates the clients' halves, then stops (rolling restart: it releases its
    leases); replica B takes every partition over, each reloaded with ITS open connections
    from the store, and joins the servers' halves to them: one row per connection."""
    opts = NatsOptions(nats_server.url, partitions=2)
    s1, s2 = sender(opts, "h1"), sender(opts, "h2")
    with ExitStack() as stack:
        a = replica(stack, tmp_path, "a", "nats_takeover", opts)
        wait_for(lambda: len(a.app.state.pipeline.consumer.owned) == 2, "A owns all")
        assert accepted(s1, body("h1", 1, [rec("client", cport=48000 + j, final=False)
                                           for j in range(40)]))
        wait_for(lambda: len(flows(a)) == 40, "40 open connections")
    with ExitStack() as stack:
        b = replica(stack, tmp_path, "b", "nats_takeover", opts)
        cb, corr = b.app.state.pipeline.consumer, b.app.state.pipeline.correlation
        wait_for(lambda: len(cb.owned) == 2, "B owns all (A released them)")
        assert corr.loaded == 40  # each partition loaded its own share, none twice
        assert sum(len(p.correlator) for p in corr.parts.values()) == 40
        assert accepted(s2, body("h2", 1, [rec("server", cport=48000 + j) for j in range(40)]))
        wait_for(lambda: all(f["observed_by"] == ["client", "server"] for f in flows(b)),
                 "both halves joined")
        assert len(flows(b)) == 40
    s1.close()
    s2.close()


def test_nats_down_keeps_batches_spooled_and_they_are_sent_when_it_is_back(nats_server, tmp_path):
    opts = NatsOptions(nats_server.url)
    ctx = CollectorContext("h1")
    settings = ExportSettings(url=nats_server.url, token="", spool_dir=tmp_path / "spool",
                              transport="nats", deadline=0.3, batch_size=2)
    sink = AggregatorSink(ctx, settings=settings, start=False, sender=sender(opts, "h1"))
    nats_server.stop(keep=True)
    sink.write([rec("client", cport=45000 + i) for i in range(6)])   # 3 batches of 2
    assert sink.drain_once() is False          # NATS down: gave up inside the deadline
    assert len(sink.spool) == 3                # ... and nothing left the spool
    nats_server.start()                        # same port, same JetStream store
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_spool", opts)
        wait_for(lambda: sink.drain_once() or not len(sink.spool), "the spool to drain")
        while sink.drain_once():
            pass
        assert len(sink.spool) == 0
        wait_for(lambda: len(flows(c)) == 6, "3 batches stored")  # in up to 6 shares
        assert sorted(f["client"]["port"] for f in flows(c)) == list(range(45000, 45006))
    sink.close()


# -- what each NATS outcome is called (no ClickHouse) --------------------------------------------
def blob(seq: int, size: int) -> bytes:
    """A batch of one record that compresses to about `size` bytes (random hex)."""
    return body("h1", seq, [rec("client", cport=47000 + seq, process=Process(
        7, "ew-frontend", cmdline=os.urandom(size).hex()))])


def test_each_publish_outcome_is_named_by_what_nats_answered(tmp_path):
    server = NatsServer(tmp_path / "nats", max_payload=64 * 1024).start()
    try:
        s = NatsSender(NatsOptions(server.url, max_bytes=1024 * 1024), "h1", publish_timeout=0.5)
        assert accepted(s, body("h1", 1, [rec("client")]))
        too_big = s.send(blob(2, 100 * 1024))
        assert too_big == Refused("nats_max_payload", "NATS: nats: maximum payload exceeded")
        answers = [s.send(blob(3 + i, 55 * 1024)) for i in range(20)]  # 1 MiB: the stream is full
        assert isinstance(answers[0], Accepted) and answers[-1].reason == "nats_stream_full"
        s.loop.run(s.js.delete_stream("EASTWEST"), 10)
        no_stream = s.send(body("h1", 30, [rec("client", cport=47999)]))
        assert no_stream.reason == "nats_no_responders"
        assert no_stream.detail.startswith("NoStreamResponseError: no stream answers on ")
        server.stop(keep=True)
        assert s.send(body("h1", 31, [rec("client")])) == Retry("nats_timeout",
                                                                 "no PubAck within 0.5 s")
        s.close()
    finally:
        server.stop()


def test_a_batch_over_max_payload_is_dropped_as_nats_max_payload_not_http_none(tmp_path):
    server = NatsServer(tmp_path / "nats", max_payload=64 * 1024).start()
    try:
        settings = ExportSettings(url=server.url, token="", spool_dir=tmp_path / "spool",
                                  transport="nats", batch_size=1000)
        sink = AggregatorSink(CollectorContext("h1"), settings=settings, start=False)
        records = [rec("client", cport=20000 + i,
                       process=Process(7, "ew-frontend", cmdline=os.urandom(600).hex()))
                   for i in range(1000)]
        sink.write(records)  # one batch of 1,000 records, > 64 KiB compressed in each partition
        assert sink.drain_once() and len(sink.spool) == 0
        assert sink.ctx.drops.snapshot() == {("export", "nats_max_payload"): 1000}
        sink.close()
    finally:
        server.stop()


# -- the live stream of every replica (aggregator/live_fanin.py) ---------------------------------
def stream_ids(c: TestClient, limit: int, out: list[str]) -> None:
    """GET /api/v1/flows/stream until `limit` events: their connection ids, in order."""
    with c.stream("GET", "/api/v1/flows/stream", params={"limit": str(limit)}, headers=RH) as r:
        assert r.status_code == 200
        out += [line[4:] for line in r.iter_lines() if line.startswith("id: ")]


@pytest.mark.parametrize("fanin", [True, False], ids=["fanin", "no-fanin"])
def test_the_live_stream_of_every_replica_carries_every_partition_once(nats_server, tmp_path,
                                                                       fanin):
    """Two replicas own one of 2 partitions each; an SSE subscriber on EACH sees every
    connection the store holds, each once (its own partition from its hub, the other's over
    NATS from the replica that owns it). With `--no-live-fanin` a subscriber sees its
    replica's partition only: the two streams split the store between them."""
    import threading

    opts = NatsOptions(nats_server.url, partitions=2)
    db = f"nats_live_{'on' if fanin else 'off'}"
    with ExitStack() as stack:
        a, b = (replica(stack, tmp_path, name, db, opts, live_fanin=fanin) for name in "ab")
        pa_, pb = a.app.state.pipeline, b.app.state.pipeline
        wait_for(lambda: len(pa_.consumer.owned) == len(pb.consumer.owned) == 1,
                 "a partition each")
        assert (pa_.fanin is not None) is fanin and (pb.fanin is not None) is fanin
        n = 40
        got: dict[str, list[str]] = {"a": [], "b": []}
        expect = {"a": n, "b": n} if fanin else {}
        if not fanin:  # each stream ends with its own partition's connections
            s = sender(opts, "h1")
            shares = s.shares(body("h1", 1, [rec("client", cport=46500 + j) for j in range(n)]))
            s.close()
            counts = {int(subject.split(".")[2][1:]): len(codec.decode_batch(d).records)
                      for subject, d, _ in shares}
            expect = {name: counts[next(iter(p.consumer.owned))]
                      for name, p in (("a", pa_), ("b", pb))}
        readers = [threading.Thread(target=stream_ids, args=(c, expect[name], got[name]))
                   for name, c in (("a", a), ("b", b))]
        for t in readers:
            t.start()
        wait_for(lambda: pa_.fanout.hub.subscribers == pb.fanout.hub.subscribers == 1,
                 "a subscriber on each replica")
        if fanin:  # each replica has heard the other's subscriber
            wait_for(lambda: pa_.fanin.peers_want and pb.fanin.peers_want, "interest")
        s1 = sender(opts, "h1")
        assert accepted(s1, body("h1", 1, [rec("client", cport=46500 + j) for j in range(n)]))
        s1.close()
        wait_for(lambda: len(flows(a)) == n, f"{n} connections stored")
        for t in readers:
            t.join(30)
            assert not t.is_alive(), got
        stored = {f["id"] for f in flows(a)}
        for name in "ab":  # each event a connection of the store, never one twice
            assert len(got[name]) == len(set(got[name])) == expect[name]
            assert set(got[name]) <= stored
        if fanin:
            assert set(got["a"]) == set(got["b"]) == stored
            # each replica sent the other its own partition's rows, each once
            assert pa_.fanin.published_rows == pb.fanin.received_rows > 0
            assert pb.fanin.published_rows == pa_.fanin.received_rows > 0
            assert pa_.fanin.published_rows + pb.fanin.published_rows == n
            snap = pa_.drops.snapshot() | pb.drops.snapshot()
            assert not [k for k in snap if k[0] == "stream"], snap
        else:
            assert set(got["a"]).isdisjoint(got["b"])
            assert set(got["a"]) | set(got["b"]) == stored


def test_the_live_stream_keeps_every_connection_once_across_a_take_over(nats_server, tmp_path):
    """A subscriber on replica A sees B's partition through the fan-in, then B stops (a rolling
    restart: its leases released) and A takes B's partition over: the connections before and
    after reach A's stream each once, nothing lost, nothing twice."""
    import threading

    opts = NatsOptions(nats_server.url, partitions=2)
    n = 30
    with ExitStack() as stack:
        a = replica(stack, tmp_path, "a", "nats_live_takeover", opts)
        pa_ = a.app.state.pipeline
        got: list[str] = []
        with ExitStack() as b_stack:
            b = replica(b_stack, tmp_path, "b", "nats_live_takeover", opts)
            pb = b.app.state.pipeline
            wait_for(lambda: len(pa_.consumer.owned) == len(pb.consumer.owned) == 1,
                     "a partition each")
            reader = threading.Thread(target=stream_ids, args=(a, 2 * n, got))
            reader.start()
            wait_for(lambda: pa_.fanout.hub.subscribers == 1 and pb.fanin.peers_want,
                     "B to hear of A's subscriber")
            s1 = sender(opts, "h1")
            assert accepted(s1, body("h1", 1, [rec("client", cport=47100 + j)
                                               for j in range(n)]))
            wait_for(lambda: len(flows(a)) == n and pb.fanin.published_rows > 0,
                     "the first connections, some of them B's")
        wait_for(lambda: len(pa_.consumer.owned) == 2, "A took B's partition over")
        assert accepted(s1, body("h1", 2, [rec("client", cport=47200 + j) for j in range(n)]))
        s1.close()
        reader.join(30)
        assert not reader.is_alive(), got
        stored = {f["id"] for f in flows(a)}
        assert len(stored) == 2 * n
        assert len(got) == len(set(got)) == 2 * n and set(got) == stored
        assert not [k for k in pa_.drops.snapshot() if k[0] == "stream"]
