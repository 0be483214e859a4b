"""The NATS JetStream transport against a real nats-server 2.9 and a real ClickHouse 18.16 (two
local shards): collectors publish each batch split by partition, aggregator replicas share the
partitions through leases (one durable pull consumer per partition), a batch is acked only once
stored, and `(collector, partition, batch_seq)` makes redelivery harmless.

No root needed: both servers run as this user on free loopback ports (tests/servers.py)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from collector.export import AggregatorSink, ExportSettings
from collector.pipeline import CollectorContext
from collector.transport import Accepted, Refused, Retry
from collector.transport_nats import HEADROOM, NatsSender
from eastwest import codec
from eastwest.codec import Batch
from eastwest.errors import ConfigError
from eastwest.jetstream import NatsOptions
from eastwest.partition import mark_partition, record_partition
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
        shares = s.plan(body("h1", 9, recs)).shares
        assert len(shares) == 6  # 40 connections reach every partition
        seen: dict[int, int] = {}
        for subject, data, msg_id in ((x.subject, x.body, x.msg_id) for x in shares):
            b = codec.decode_batch(data)
            k = b.batch_seq % 1024
            assert (b.batch_seq // 1024, subject, msg_id) == (9, f"eastwest.flows.p{k}.h1",
                                                              f"h1:{b.batch_seq}")
            for r in b.records:  # every observer of a connection in one share
                assert seen.setdefault(r.client.port, k) == k
        assert sorted(seen) == list(range(46000, 46040))
        assert s.plan(body("h1", 10, [])).shares[0].subject == "eastwest.flows.p0.h1"  # empty
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
        share, = s.plan(again).shares
        s.loop.run(s.js.publish(share.subject, share.body), 10)
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


def test_a_batch_over_max_payload_is_stored_completely_and_once_by_an_aggregator(small_nats,
                                                                              tmp_path):
    """Shares about 4x the server's max_payload (64 KiB) arrive as sub-shares: every record
    stored once; the batch published again (JetStream drops it) and its sub-shares published
    again past the duplicate window (found applied by their marks) store nothing more."""
    opts = NatsOptions(small_nats.url, partitions=2)
    s = sender(opts, "h1")
    recs = [big(43000 + i, 800, c2s=1000 + i) for i in range(600)]
    data = body("h1", 4, recs)
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_oversize", opts)
        consumer = c.app.state.pipeline.consumer
        answer = s.send(data)
        assert isinstance(answer, Accepted) and "dropped" not in answer.answer
        n = answer.answer["shares"]
        assert n >= 8
        wait_for(lambda: consumer.applied == n, f"{n} sub-shares applied")
        assert consumer.records == 600
        assert accepted(s, data)  # within the duplicate window: nothing delivered
        for share in s.plan(data, 64 * 1024 - HEADROOM).shares:  # past it: no message id
            s.loop.run(s.js.publish(share.subject, share.body), 10)
        wait_for(lambda: consumer.applied + consumer.duplicates == 2 * n, "the republished")
        assert (consumer.applied, consumer.duplicates, consumer.records) == (n, n, 600)
        got = flows(c)
        assert sorted(f["bytes_c2s"] for f in got) == list(range(1000, 1600))
        assert s.loop.run(s.js.stream_info("EASTWEST"), 10).state.messages == 0
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


def big(cport: int, size: int, **over):
    """A client record whose command line compresses to about `size` bytes (random hex)."""
    return rec("client", cport=cport, process=Process(7, "ew-frontend",
                                                      cmdline=os.urandom(size).hex()), **over)


def stream_messages(s: NatsSender) -> list[tuple[str, str, bytes]]:
    """(subject, message id, data) of every message in the stream, read without consuming."""
    async def read():
        info = await s.js.stream_info("EASTWEST")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await s.js.get_msg("EASTWEST", seq)
            out.append((m.subject, m.headers["Nats-Msg-Id"], m.data))
        return out
    return s.loop.run(read(), 30)


@pytest.fixture
def small_nats(tmp_path):
    s = NatsServer(tmp_path / "nats", max_payload=64 * 1024).start()
    yield s
    s.stop()


def test_each_publish_outcome_is_named_by_what_nats_answered(small_nats):
    server = small_nats
    s = NatsSender(NatsOptions(server.url, max_bytes=1024 * 1024), "h1", publish_timeout=0.5)
    assert accepted(s, body("h1", 1, [rec("client")]))
    too_big = s.send(blob(2, 100 * 1024))  # ONE record over max_payload: nothing to publish
    assert isinstance(too_big, Refused) and too_big.reason == "nats_max_payload"
    assert re.fullmatch(r"record h1:\d+ of batch 2 \(partition \d\) is \d{6} bytes encoded "
                        r"alone, over NATS' max_payload less headers \(64512 bytes\)",
                        too_big.detail), too_big.detail
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


def test_a_share_over_max_payload_is_published_in_sub_shares_every_record_once(small_nats):
    """One batch whose shares are each about 4x max_payload (64 KiB): published as sub-shares
    under distinct message ids and marks, every record exactly once in the stream; the same
    batch sent again adds nothing (the same split, the same ids: JetStream drops them)."""
    opts = NatsOptions(small_nats.url, partitions=2)
    s = sender(opts, "h1")
    try:
        recs = [big(20000 + i, 800) for i in range(600)]
        data = body("h1", 5, recs)
        answer = s.send(data)
        assert isinstance(answer, Accepted) and "dropped" not in answer.answer
        got = stream_messages(s)
        assert len(got) == answer.answer["shares"] >= 2 * 4  # about 4x: at least 4 each
        assert s.gauges()[("eastwest_export_nats_subshares_total", ())] == len(got) - 2
        assert all(len(d) <= 64 * 1024 - HEADROOM + 16 for _, _, d in got)
        ids = [r.record_id for _, _, d in got for r in codec.decode_batch(d).records]
        assert sorted(ids) == sorted(r.record_id for r in recs)  # each once, none lost
        marks = [codec.decode_batch(d).batch_seq for _, _, d in got]
        assert len(set(marks)) == len(got) == len({m for _, m, _ in got})
        for subject, msg_id, d in got:
            b = codec.decode_batch(d)
            k = mark_partition(b.batch_seq, 2)
            assert (b.batch_seq // 1024, msg_id, subject) == (5, f"h1:{b.batch_seq}",
                                                              f"eastwest.flows.p{k}.h1")
            assert {record_partition(r, 2) for r in b.records} == {k}
        assert isinstance(s.send(data), Accepted)  # a republish: every id a duplicate
        assert len(stream_messages(s)) == len(got)
        # deterministic: the same split by another sender (another process) of this collector
        other = sender(opts, "h1")
        try:
            assert other.plan(data, 64 * 1024 - HEADROOM) == s.plan(data, 64 * 1024 - HEADROOM)
        finally:
            other.close()
    finally:
        s.close()


def test_a_record_alone_over_max_payload_is_refused_alone_and_the_rest_is_published(
        small_nats, tmp_path, caplog):
    settings = ExportSettings(url=small_nats.url, token="", spool_dir=tmp_path / "spool",
                              transport="nats", batch_size=301)
    sink = AggregatorSink(CollectorContext("h1"), settings=settings, start=False)
    try:
        giant = big(21000, 100 * 1024)
        records = [big(20000 + i, 600) for i in range(300)]
        records.insert(150, giant)
        sink.write(records)  # one batch of 301 records
        with caplog.at_level("ERROR", logger="eastwest.export.nats"):
            assert sink.drain_once() and len(sink.spool) == 0
        assert sink.ctx.drops.snapshot() == {("export", "nats_max_payload"): 1}
        assert f"record {giant.record_id} of batch " in caplog.text
        assert "bytes encoded alone" in caplog.text
        text = sink.metrics.render().decode()
        assert "eastwest_records_out_total 300.0" in text
        assert 'eastwest_dropped_total{reason="nats_max_payload",stage="export"} 1.0' in text
        assert "eastwest_export_nats_subshares_total" in text
        got = stream_messages(sink.sender)
        ids = sorted(r.record_id for _, _, d in got for r in codec.decode_batch(d).records)
        assert ids == sorted(r.record_id for r in records if r is not giant)
    finally:
        sink.close()


def test_the_split_is_deterministic_and_refuses_what_the_mark_cannot_name(nats_server):
    """With P = 512 each partition has 2 sub-share slots (K and K + 512): a share needing more
    is published as 2 sub-shares and the rest refused, counted by record, never silently."""
    opts = NatsOptions(nats_server.url, partitions=512)
    s, t = sender(opts, "h1"), sender(opts, "h1")
    try:
        recs = [big(20000, 300, start=T0 + timedelta(seconds=i)) for i in range(40)]
        data = body("h1", 3, recs)  # one connection: one partition, about 12 KB
        k = record_partition(recs[0], 512)
        plan = s.plan(data, 2500)
        assert plan == s.plan(data, 2500) == t.plan(data, 2500)  # every attempt, any process
        assert [(x.partition, x.sub, x.msg_id) for x in plan.shares] == [
            (k, 0, f"h1:{3 * 1024 + k}"), (k, 1, f"h1:{3 * 1024 + k + 512}")]
        published = sum(x.records for x in plan.shares)
        (left,) = plan.left
        assert (left.reason, left.records) == ("nats_share_space", 40 - published)
        assert "need more than the 2 sub-shares a mark can name with 512 partitions" in left.detail
        # each piece within the limit, in batch order, nothing twice
        order = [r.record_id for x in plan.shares for r in codec.decode_batch(x.body).records]
        assert order == [r.record_id for r in recs[:published]]
        assert all(len(x.body) <= 2500 + 16 for x in plan.shares)
        # split_records alone: a different limit, a different (still deterministic) split
        assert s.plan(data, 5000) != plan and s.plan(data, 5000) == t.plan(data, 5000)
    finally:
        s.close()
        t.close()


def test_a_smaller_max_payload_between_attempts_splits_only_what_no_longer_fits(tmp_path):
    """Attempt 1 under 64 KiB: sub-shares acked. The server restarts with 16 KiB: attempt 2
    of the SAME batch republishes nothing acked that no longer fits, and nothing lost."""
    server = NatsServer(tmp_path / "nats", max_payload=64 * 1024).start()
    try:
        opts = NatsOptions(server.url, partitions=1)
        s = sender(opts, "h1")
        recs = [big(20000 + i, 400) for i in range(200)]
        data = body("h1", 7, recs)
        s.loop.run(s._ensure(), 10)
        pin, first = s._attempt_plan(codec.decode_batch(data), data)
        assert len(first) >= 2
        s.loop.run(s._publish(first[:1], pin), 30)  # only sub-share 0 acked (the rest: lost)
        server.stop(keep=True)
        server.max_payload = 16 * 1024
        server.start()
        s._reset()
        answer = s.send(data)
        assert isinstance(answer, Accepted), answer
        got = stream_messages(s)
        ids = [r.record_id for _, _, d in got for r in codec.decode_batch(d).records]
        assert sorted(ids) == sorted(r.record_id for r in recs)  # once each
        assert first[0].msg_id in {m for _, m, _ in got}
        assert len({m for _, m, _ in got}) == len(got)
        assert s.resplit_shares == len(first) - 1 and s.maybe_doubled == 0
        s.close()
    finally:
        server.stop()


# -- the live stream of every replica (aggregator/live_fanin.py) ---------------------------------
def stream_ids(c: TestClient, limit: int, out: list[str]) -> None:
    """GET /api/v1/flows/stream until `limit` events: their connection ids, in order."""
    with c.stream("GET", "/api/v1/flows/stream", params={"limit": str(limit)}, headers=RH) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # as they come: a test that times out shows what arrived
            if line.startswith("id: "):
                out.append(line[4:])


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
            shares = s.plan(body("h1", 1, [rec("client", cport=46500 + j)
                                           for j in range(n)])).shares
            s.close()
            counts = {x.partition: x.records for x in shares}
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
            b_published = pb.fanin.published_rows  # B's fan-in is gone once B stops
        wait_for(lambda: len(pa_.consumer.owned) == 2, "A took B's partition over")
        assert accepted(s1, body("h1", 2, [rec("client", cport=47200 + j) for j in range(n)]))
        s1.close()
        reader.join(60)
        stored = {f["id"] for f in flows(a)}
        assert not reader.is_alive(), (len(got), len(stored), pa_.drops.snapshot(),
                                       pb.drops.snapshot(), pa_.fanin.received_rows,
                                       b_published, sorted(stored - set(got)))
        assert len(stored) == 2 * n
        assert len(got) == len(set(got)) == 2 * n and set(got) == stored
        assert not [k for k in pa_.drops.snapshot() if k[0] == "stream"]
