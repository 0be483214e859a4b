"""Export to the aggregator, with a fake transport and a fake clock (no sleeps, no threads):
batching by count and age, retries only on connection errors / 429 / 5xx with jittered
exponential backoff inside a deadline, Retry-After honoured, spool kept on failure and drained
in order, restart sends what was spooled, shutdown flushes; every drop and every retry counted
with the transport's own reason, for any `Sender`."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from collector.export import AggregatorSink, ExportSettings
from collector.pipeline import CollectorContext
from collector.retry import Backoff, RetryPolicy
from collector.transport import Accepted, Refused, Retry, SendResult
from collector.transport_http import HttpSender, parse_retry_after
from eastwest import codec
from eastwest.clock import FakeClock
from eastwest.errors import ConfigError
from eastwest.record import Endpoint, FlowRecord

T0 = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)
TOKEN = "ingest-token-0123456789"


def rec(n: int, final: bool = True) -> FlowRecord:
    return FlowRecord(record_id=f"h1:{n}", collector="h1", source="socket", start=T0,
                      end=T0 + timedelta(seconds=1), final=final, protocol="tcp", family=4,
                      client=Endpoint("10.0.0.1", 1000 + n), server=Endpoint("10.0.0.2", 80),
                      observer="client")


class FakeAggregator:
    """Answers from a script of responses (status or exception), then 200; records what came."""

    def __init__(self, script=()) -> None:
        self.script = list(script)
        self.batches: list[codec.DecodedBatch] = []
        self.applied: set[tuple[str, int]] = set()
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            status, headers = step if isinstance(step, tuple) else (step, {})
            return httpx.Response(status, headers=headers, json={"detail": "scripted"})
        b = codec.decode_batch(request.content)
        dup = (b.collector, b.batch_seq) in self.applied
        self.applied.add((b.collector, b.batch_seq))
        if not dup:
            self.batches.append(b)
        return httpx.Response(200, json={"collector": b.collector, "batch_seq": b.batch_seq,
                                         "duplicate": dup, "accepted": len(b.records),
                                         "rejected": []})

    def record_ids(self) -> list[str]:
        return [r.record_id for b in self.batches for r in b.records]


def make_sink(tmp_path, agg, clock, **over) -> AggregatorSink:
    kw = dict(url="http://agg.test", token=TOKEN, spool_dir=tmp_path / "spool", batch_size=3,
              batch_age=2.0, deadline=10.0, backoff_initial=0.5, backoff_max=4.0,
              shutdown_timeout=0.0)
    kw.update(over)
    client = httpx.Client(transport=httpx.MockTransport(agg))
    return AggregatorSink(CollectorContext("h1", clock=clock), settings=ExportSettings(**kw),
                          client=client, rand=lambda: 0.5, start=False)


def drain(sink: AggregatorSink) -> int:
    n = 0
    while sink.drain_once():
        n += 1
    return n


def test_batches_seal_by_count_and_by_age_and_carry_the_token(tmp_path):
    agg, clock = FakeAggregator(), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(n) for n in range(7)])          # 3 + 3 sealed by count, 1 waiting
    assert len(sink.spool) == 2
    clock.t += 1.9
    sink.tick()
    assert len(sink.spool) == 2                     # not old enough yet
    clock.t += 0.1
    sink.tick()
    assert len(sink.spool) == 3                     # sealed by age
    assert drain(sink) == 3
    assert agg.record_ids() == [f"h1:{n}" for n in range(7)]
    assert agg.headers[0]["authorization"] == f"Bearer {TOKEN}"
    assert agg.headers[0]["content-type"] == codec.CONTENT_TYPE
    seqs = [b.batch_seq for b in agg.batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


def test_interim_and_final_records_travel_in_separate_batches(tmp_path):
    agg, clock = FakeAggregator(), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(1, final=False), rec(2), rec(3, final=False), rec(4), rec(5, final=False)])
    sink.flush()
    assert [e.kind for e in sink.spool.entries()] == ["interim", "final"]
    drain(sink)
    assert [[r.final for r in b.records] for b in agg.batches] == [[False] * 3, [True] * 2]


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), 429, 500, 502, 503, 504])
def test_retryable_failures_are_retried_with_growing_jittered_waits(tmp_path, failure):
    agg, clock = FakeAggregator([failure, failure, failure]), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(1), rec(2), rec(3)])
    assert sink.drain_once()
    assert clock.slept == [0.375, 0.75, 1.5]        # b/2 + 0.5*b/2 for b = 0.5, 1, 2
    assert agg.record_ids() == ["h1:1", "h1:2", "h1:3"]
    assert sink.metrics.records_out._value.get() == 3


def test_retry_after_is_honoured_in_seconds_and_as_a_date(tmp_path):
    agg = FakeAggregator([(503, {"Retry-After": "3"}), (429, {"Retry-After": "2"})])
    clock = FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(1), rec(2), rec(3)])
    assert sink.drain_once()
    assert clock.slept == [3.0, 2.0]
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon", now=0.0) is None


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_a_refused_batch_is_dropped_and_counted_without_retrying(tmp_path, status):
    agg, clock = FakeAggregator([status]), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(1), rec(2), rec(3), rec(4), rec(5), rec(6)])
    assert sink.drain_once() and clock.slept == []
    assert sink.ctx.drops.snapshot() == {("export", f"http_{status}"): 3}
    drain(sink)
    assert agg.record_ids() == ["h1:4", "h1:5", "h1:6"]


@pytest.mark.parametrize("status", [401, 403])
def test_an_auth_refusal_keeps_the_batch_spooled(tmp_path, status):
    agg, clock = FakeAggregator([status]), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(1), rec(2), rec(3)])
    assert not sink.drain_once() and clock.slept == []
    assert len(sink.spool) == 1 and sink.ctx.drops.snapshot() == {}
    assert sink.drain_once() and agg.record_ids() == ["h1:1", "h1:2", "h1:3"]


def test_past_the_deadline_the_batch_stays_spooled_and_goes_later_in_order(tmp_path):
    down = [httpx.ConnectError("down")] * 6
    agg, clock = FakeAggregator(down), FakeClock()
    sink = make_sink(tmp_path, agg, clock, deadline=5.0)
    sink.write([rec(n) for n in range(9)])          # three batches
    assert not sink.drain_once()                    # waits 0.375+0.75+1.5 = 2.625, next 3.0 > 5
    assert sum(clock.slept) <= 5.0 and len(sink.spool) == 3
    assert drain(sink) == 3                         # the aggregator is back
    assert agg.record_ids() == [f"h1:{n}" for n in range(9)]


def test_a_retried_batch_that_had_been_applied_is_not_doubled(tmp_path):
    """The aggregator stored the batch but its answer was lost: the retry is a duplicate."""

    class LostAnswer(FakeAggregator):
        lost = False

        def __call__(self, request):
            resp = super().__call__(request)
            if not self.lost:
                self.lost = True
                raise httpx.ReadError("connection reset after the commit")
            return resp

    agg, clock = LostAnswer(), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(1), rec(2), rec(3)])
    assert sink.drain_once()
    assert agg.record_ids() == ["h1:1", "h1:2", "h1:3"] and len(agg.applied) == 1


def test_a_restarted_collector_sends_what_it_had_spooled_with_the_same_numbers(tmp_path):
    clock = FakeClock()
    first = make_sink(tmp_path, FakeAggregator([httpx.ConnectError("down")] * 99), clock,
                      deadline=1.0)
    first.write([rec(n) for n in range(8)])
    first.close()                                   # seals the last 2, cannot send: all spooled
    spooled = [e.seq for e in first.spool.entries()]
    assert len(spooled) == 3
    first.spool.close()                             # the process ended: the folder is free

    agg = FakeAggregator()
    second = make_sink(tmp_path, agg, FakeClock())
    assert drain(second) == 3
    assert [b.batch_seq for b in agg.batches] == spooled
    assert agg.record_ids() == [f"h1:{n}" for n in range(8)]
    second.write([rec(100), rec(101), rec(102)])
    drain(second)
    assert agg.batches[-1].batch_seq > max(spooled)


def test_close_flushes_and_sends_what_is_buffered(tmp_path):
    agg, clock = FakeAggregator(), FakeClock()
    sink = make_sink(tmp_path, agg, clock, shutdown_timeout=5.0)
    sink.write([rec(1)])
    assert len(sink.spool) == 0                     # buffered, not sealed yet
    sink.close()
    assert agg.record_ids() == ["h1:1"] and len(sink.spool) == 0


def test_backoff_is_bounded_by_the_maximum():
    b = Backoff(0.1, 2.0, rand=lambda: 1.0)
    assert [b.delay(n) for n in range(8)][-1] == 2.0
    assert Backoff(0.1, 2.0, rand=lambda: 0.0).delay(0) == 0.05


def test_sender_gives_up_at_once_when_retry_after_is_past_the_deadline():
    clock = FakeClock()
    client = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(503, headers={"Retry-After": "60"})))
    s = HttpSender(client, "http://agg.test/api/v1/ingest", TOKEN, clock=clock)
    d = RetryPolicy(Backoff(0.1, 1.0), 30.0, clock).deliver(s, b"x")
    assert (d.outcome, d.attempts, d.retries, clock.slept) == ("gave_up", 1, ("http_503",), [])
    assert d.last == Retry("http_503", "HTTP 503", retry_after=60.0)


@pytest.mark.parametrize("kw,key", [({"url": "agg:8470"}, "--aggregator"),
                                    ({"token": ""}, "EASTWEST_INGEST_TOKEN"),
                                    ({"batch_size": 0}, "--batch-size")])
def test_bad_export_settings_name_the_flag(tmp_path, kw, key):
    base = dict(url="http://agg.test", token=TOKEN, spool_dir=tmp_path)
    base.update(kw)
    with pytest.raises(ConfigError) as err:
        ExportSettings(**base)
    assert err.value.key == key


def test_collector_metrics_show_in_out_spool_and_drops(tmp_path):
    agg, clock = FakeAggregator([400]), FakeClock()
    sink = make_sink(tmp_path, agg, clock)
    sink.write([rec(n) for n in range(7)])
    sink.drain_once()
    text = sink.metrics.render().decode()
    assert "eastwest_records_in_total 7.0" in text
    assert 'eastwest_dropped_total{reason="http_400",stage="export"} 3.0' in text
    assert "eastwest_spool_batches 1.0" in text and "eastwest_spool_records 3.0" in text
    sink.metrics.watch_source(lambda: {("eastwest_probe_map_entries", (("map", "socks"),)): 12.0,
                                       ("eastwest_bpf_lost_events_total", ()): 4.0})
    text = sink.metrics.render().decode()
    assert 'eastwest_probe_map_entries{map="socks"} 12.0' in text
    assert "eastwest_bpf_lost_events_total 4.0" in text


# -- the Sender interface: reasons named by the transport ----------------------------------------
@pytest.mark.parametrize("answer,result", [
    (200, Accepted),
    (204, Accepted),
    (413, Refused("http_413", "HTTP 413: scripted")),
    (404, Refused("http_404", "HTTP 404: scripted")),
    (401, Retry("http_401", "HTTP 401: scripted", auth=True)),
    (503, Retry("http_503", "HTTP 503: scripted")),
    ((429, {"Retry-After": "Thu, 01 Jan 2026 00:00:07 GMT"}),
     Retry("http_429", "HTTP 429: scripted", retry_after=7.0)),
    (httpx.ConnectError("refused"), Retry("http_connect_error", "ConnectError: refused")),
    (httpx.ConnectTimeout("slow"), Retry("http_timeout", "ConnectTimeout: slow")),
    (httpx.ReadTimeout("slow"), Retry("http_timeout", "ReadTimeout: slow")),
    (httpx.ReadError("reset"), Retry("http_network_error", "ReadError: reset")),
    (httpx.RemoteProtocolError("eof"), Retry("http_protocol_error", "RemoteProtocolError: eof")),
])
def test_one_http_attempt_says_accepted_refused_or_retry_with_the_real_reason(answer, result):
    agg = FakeAggregator([answer])
    client = httpx.Client(transport=httpx.MockTransport(agg))
    clock = FakeClock()  # 2026-01-01T00:00:00Z: the HTTP-date above is 7 s later
    got = HttpSender(client, "http://agg.test/api/v1/ingest", TOKEN, clock=clock).send(
        codec.encode_batch(codec.Batch("h1", 1, T0, [rec(1)])))
    if result is Accepted:
        assert isinstance(got, Accepted)
    else:
        assert got == result


class ScriptedSender:
    """A transport-neutral fake `Sender`: answers from a script, then `Accepted`."""

    def __init__(self, script: list[SendResult]) -> None:
        self.script, self.bodies, self.closed = list(script), [], False

    def send(self, body: bytes) -> SendResult:
        self.bodies.append(body)
        return self.script.pop(0) if self.script else Accepted({"rejected": []})

    def close(self) -> None:
        self.closed = True


def sink_with(tmp_path, sender, clock, **over) -> AggregatorSink:
    kw = dict(url="nats://nats.test:4222", token="", spool_dir=tmp_path / "spool",
              transport="nats", batch_size=3, batch_age=2.0, deadline=10.0, backoff_initial=0.5,
              backoff_max=4.0, shutdown_timeout=0.0)
    kw.update(over)
    return AggregatorSink(CollectorContext("h1", clock=clock), settings=ExportSettings(**kw),
                          rand=lambda: 0.5, start=False, sender=sender)


def test_a_refused_nats_batch_is_counted_with_the_nats_reason_not_as_http(tmp_path):
    """The bug this interface fixed: NATS drops were counted as `export/http_None`."""
    sender = ScriptedSender([Refused("nats_max_payload", "NATS: maximum payload exceeded")])
    sink = sink_with(tmp_path, sender, FakeClock())
    sink.write([rec(1), rec(2), rec(3)])
    assert sink.drain_once() and len(sink.spool) == 0
    assert sink.ctx.drops.snapshot() == {("export", "nats_max_payload"): 3}
    text = sink.metrics.render().decode()
    assert 'eastwest_dropped_total{reason="nats_max_payload",stage="export"} 3.0' in text
    assert "http_None" not in text
    sink.close()
    assert sender.closed


def test_every_retry_is_counted_by_reason_and_the_batch_stays_spooled_past_the_deadline(tmp_path):
    clock = FakeClock()
    sender = ScriptedSender([Retry("nats_no_responders", "no stream"),
                             Retry("nats_timeout", "no PubAck"),
                             Retry("nats_stream_full", "maximum bytes exceeded"),
                             Retry("nats_timeout", "no PubAck")])
    sink = sink_with(tmp_path, sender, clock, deadline=2.0)
    sink.write([rec(1), rec(2), rec(3)])
    assert not sink.drain_once()                    # waits 0.375 + 0.75, then 1.5 > 2.0
    assert clock.slept == [0.375, 0.75] and len(sink.spool) == 1
    assert sink.ctx.drops.snapshot() == {}
    text = sink.metrics.render().decode()
    assert 'eastwest_export_retries_total{reason="nats_no_responders"} 1.0' in text
    assert 'eastwest_export_retries_total{reason="nats_timeout"} 1.0' in text
    assert 'eastwest_export_retries_total{reason="nats_stream_full"} 1.0' in text
    assert 'eastwest_export_failures_total{outcome="gave_up"} 1.0' in text
    assert sink.drain_once() and len(sink.spool) == 0   # next round: one more Retry, then sent
    text = sink.metrics.render().decode()
    assert 'eastwest_export_retries_total{reason="nats_timeout"} 2.0' in text
    assert "eastwest_export_attempts_total 5.0" in text


def test_refused_credentials_pause_the_round_at_once_for_any_transport(tmp_path):
    clock = FakeClock()
    sender = ScriptedSender([Retry("nats_authorization", "NATS: authorization violation",
                                   auth=True)])
    sink = sink_with(tmp_path, sender, clock)
    sink.write([rec(1), rec(2), rec(3)])
    assert not sink.drain_once() and clock.slept == [] and len(sink.spool) == 1
    assert 'eastwest_export_failures_total{outcome="auth"} 1.0' in sink.metrics.render().decode()


def test_a_shutdown_ends_the_waits_between_retries_without_another_attempt():
    stop = threading.Event()
    stop.set()
    sender = ScriptedSender([Retry("http_503", "HTTP 503")] * 5)
    d = RetryPolicy(Backoff(0.5, 4.0), 30.0, FakeClock()).deliver(sender, b"x", stop=stop)
    assert (d.outcome, d.attempts, len(sender.bodies)) == ("gave_up", 1, 1)
