"""The NATS JetStream transport against a real nats-server 2.9 and a real ClickHouse 18.16 (two
local shards): collectors publish, aggregator replicas share one durable pull consumer, a batch
is acked only once stored, and `(collector, batch_seq)` makes redelivery harmless.

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


def replica(stack: ExitStack, tmp_path, name: str, db: str, opts: NatsOptions) -> TestClient:
    settings = AggregatorSettings(
        data_dir=tmp_path / name, ingest_token=INGEST, read_token=READ, retention=None,
        store="clickhouse", clickhouse_url=shared_clickhouse().url(db), nats=opts,
        nats_ack_wait_s=2.0)
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
        assert s.subject == "eastwest.flows.node-1_example"   # one subject per collector
        info = s.loop.run(s.js.stream_info("EASTWEST"), 10)
    finally:
        s.close()
    cfg = info.config
    assert cfg.subjects == ["eastwest.flows.>"]
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


def test_batches_are_stored_exactly_once_even_when_published_twice(nats_server, tmp_path):
    opts = NatsOptions(nats_server.url)
    s = sender(opts, "h1")
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_once", opts)
        for i in range(7):
            assert accepted(s, body("h1", i + 1, [rec("client", cport=41000 + i, c2s=100 + i)]))
        assert accepted(s, body("h1", 3, [rec("client", cport=41002, c2s=102)]))  # again
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


def test_a_bad_batch_is_terminated_and_counted_and_does_not_block_the_queue(nats_server, tmp_path):
    opts = NatsOptions(nats_server.url)
    s = sender(opts, "h1")
    with ExitStack() as stack:
        c = replica(stack, tmp_path, "a", "nats_bad", opts)
        assert accepted(s, b"EWB1 this is no zstd frame")
        assert accepted(s, body("h1", 1, [rec("client")]))
        wait_for(lambda: c.app.state.pipeline.consumer.applied == 1, "the good batch")
        assert c.app.state.drops.snapshot()[("ingest", "bad_batch")] == 1
        assert len(flows(c)) == 1
    s.close()


def test_replicas_take_turns_and_correlate_as_one_aggregator(nats_server, tmp_path):
    """Replica B gets the server's records of connections replica A opened from the client's:
    B reloads those keys from the shared store first, so each connection stays ONE row."""
    opts = NatsOptions(nats_server.url)
    with ExitStack() as stack:
        a = replica(stack, tmp_path, "a", "nats_turns", opts)
        b = replica(stack, tmp_path, "b", "nats_turns", opts)
        ca, cb = a.app.state.pipeline.consumer, b.app.state.pipeline.consumer
        # deterministic turns first: A applies the client's batch, B the server's
        assert ca.apply(body("h1", 1, [rec("client", cport=43000 + i) for i in range(5)])) == "ack"
        assert cb.apply(body("h2", 1, [rec("server", cport=43000 + i) for i in range(5)])) == "ack"
        # then through NATS, whichever replica pulls: 11 connections, both sides each
        s1, s2 = sender(opts, "h1"), sender(opts, "h2")
        for i in range(11):
            assert accepted(s1, body("h1", 10 + i, [rec("client", cport=44000 + i)]))
            assert accepted(s2, body("h2", 10 + i, [rec("server", cport=44000 + i)]))
        wait_for(lambda: ca.applied + cb.applied == 24, "22 batches through NATS")
        for c in (a, b):  # either replica answers the same from the shared store
            got = flows(c)
            assert len(got) == 16
            assert all(f["observed_by"] == ["client", "server"] for f in got)
        assert flows(a) == flows(b)
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
        wait_for(lambda: c.app.state.pipeline.consumer.applied == 3, "3 batches stored")
        assert sorted(f["client"]["port"] for f in flows(c)) == list(range(45000, 45006))
    sink.close()


# -- what each NATS outcome is called (no ClickHouse) --------------------------------------------
def test_each_publish_outcome_is_named_by_what_nats_answered(tmp_path):
    server = NatsServer(tmp_path / "nats", max_payload=64 * 1024).start()
    try:
        s = NatsSender(NatsOptions(server.url, max_bytes=1024 * 1024), "h1", publish_timeout=0.5)
        assert accepted(s, b"x" * 10)
        too_big = s.send(os.urandom(100 * 1024))
        assert too_big == Refused("nats_max_payload", "NATS: nats: maximum payload exceeded")
        answers = [s.send(os.urandom(60 * 1024)) for _ in range(18)]  # 1 MiB: the stream is full
        assert isinstance(answers[0], Accepted) and answers[-1].reason == "nats_stream_full"
        s.loop.run(s.js.delete_stream("EASTWEST"), 10)
        assert s.send(b"y") == Retry("nats_no_responders", "NoStreamResponseError: no stream "
                                     "answers on eastwest.flows.h1")
        server.stop(keep=True)
        assert s.send(b"z") == Retry("nats_timeout", "no PubAck within 0.5 s")
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
                       process=Process(7, "ew-frontend", cmdline=os.urandom(100).hex()))
                   for i in range(1000)]
        sink.write(records)                    # one batch of 1,000 records, > 64 KiB compressed
        assert sink.drain_once() and len(sink.spool) == 0
        assert sink.ctx.drops.snapshot() == {("export", "nats_max_payload"): 1000}
        sink.close()
    finally:
        server.stop()
