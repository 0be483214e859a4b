"""The collector's JSON lines output of socket probe records: one encoder call per batch gives
exactly the bytes of the public contract (`eastwest.codec.to_json`, one line per record), and
they decode back to the same records."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from collector.pipeline import CollectorContext, JsonLinesSink
from collector.probes.conn import OWNER_CONTEXT, ROLE_CLIENT, ROLE_SERVER, ConnState
from collector.probes.records import RecordBuilder
from collector.proc import ProcessCache
from eastwest import codec

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class KClock:
    def to_utc(self, ns: int) -> datetime:
        return T0 + timedelta(microseconds=ns // 1000)


def records(n: int):
    b = RecordBuilder(CollectorContext(collector_id="n1"), KClock(),
                      ProcessCache(proc=__import__("pathlib").Path("/nonexistent"), cgroup_root=None))
    states = [ConnState(sk=i, start_ns=1_000_000 + i, role=ROLE_CLIENT if i % 2 else ROLE_SERVER,
                        phase=2, family=2, saddr=bytes([10, 0, 0, 1]), daddr=bytes([10, 0, 0, 2]),
                        sport=40000 + i, dport=5432, netns=4026532000, end_ns=9_000_000 + i,
                        bytes_sent=i, bytes_recv=2 * i, rtt_count=1, rtt_sum_us=50, rtt_min_us=50,
                        rtt_max_us=50, pid=7, comm="ew-api", owner=OWNER_CONTEXT, tcp_closed=True,
                        close_oldstate=1)
              for i in range(n)]
    return b.build_many(states, final=True, now=T0 + timedelta(seconds=10))


def test_a_batch_is_written_as_the_contract_lines():
    recs = records(7)
    out = io.BytesIO()
    sink = JsonLinesSink(out)
    sink.write(recs[:3])
    sink.write([])
    sink.write(recs[3:])
    assert out.getvalue() == b"".join(codec.to_json(r) + b"\n" for r in recs)
    assert sink.written == 7
    assert [codec.from_json(line) for line in out.getvalue().splitlines()] == recs
