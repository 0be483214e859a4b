"""DNS flows: a response matched to its query by flow and id, latency, timeouts per client,
top N names with the rest counted as other, DNS over TCP, and a record that round-trips."""

from __future__ import annotations

import itertools

import dns.message
import dns.rcode
import dns.rrset
import pytest

from collector.dns.flows import DnsFlowTable
from eastwest.codec import from_json, to_json
from eastwest.drops import Drops

C, R = "10.0.0.5", "10.0.0.53"


def table(**kw) -> DnsFlowTable:
    ids = itertools.count(1)
    return DnsFlowTable("c1", lambda: f"c1:{next(ids)}", Drops(), **kw)


def exchange(name: str, qid: int, rcode=dns.rcode.NOERROR, addrs=("192.0.2.7",), ttl=30,
             cname: str | None = None) -> tuple[bytes, bytes]:
    q = dns.message.make_query(name, "A", use_edns=False)
    q.id = qid
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    owner = name
    if cname:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "CNAME", cname))
        owner = cname
    if rcode == dns.rcode.NOERROR and addrs:
        r.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", "A", list(addrs)))
    return q.to_wire(), r.to_wire()


def test_response_matched_by_id_gives_latency_rcode_answers_and_cnames() -> None:
    t = table()
    q1, r1 = exchange("api.example.com.", 7, cname="edge.cdn.example.", addrs=("203.0.113.7",))
    q2, r2 = exchange("gone.example.com.", 8, rcode=dns.rcode.NXDOMAIN)
    t.packet(1_000_000, "udp", 4, C, 40000, R, 53, q1)
    t.packet(1_000_100, "udp", 4, C, 40000, R, 53, q2)
    t.packet(1_003_100, "udp", 4, R, 53, C, 40000, r2)  # answers out of order: matched by id
    t.packet(1_005_000, "udp", 4, R, 53, C, 40000, r1)
    [rec] = t.expire(1_100_000)
    d = rec.dns
    assert rec.key == ("udp", C, 40000, R, 53) and rec.observer == "path" and not rec.final
    assert (d.queries, d.responses, d.timeouts) == (2, 2, 0)
    assert d.rcodes == {"NOERROR": 1, "NXDOMAIN": 1}
    assert (d.latency_us.min, d.latency_us.avg, d.latency_us.max) == (3000, 4000, 5000)
    assert [(n.name, n.count, n.rcodes) for n in d.names] == [
        ("api.example.com.", 1, {"NOERROR": 1}), ("gone.example.com.", 1, {"NXDOMAIN": 1})]
    assert {(a.name, a.type, a.value, a.ttl) for a in d.answers} == {
        ("api.example.com.", "CNAME", "edge.cdn.example.", 30),
        ("api.example.com.", "A", "203.0.113.7", 30)}
    assert (rec.packets_c2s, rec.packets_s2c, rec.bytes_c2s) == (2, 2, len(q1) + len(q2))
    assert from_json(to_json(rec)) == rec  # the contract's JSON carries it whole


def test_unanswered_queries_count_as_timeouts_of_their_client() -> None:
    t = table(query_timeout=2.0, idle_timeout=10.0)
    for i, client in enumerate(("10.0.0.5", "10.0.0.6")):
        q, r = exchange("slow.example.com.", 100 + i)
        t.packet(0, "udp", 4, client, 41000, R, 53, q)
    _, r6 = exchange("slow.example.com.", 101)
    t.packet(500_000, "udp", 4, R, 53, "10.0.0.6", 41000, r6)
    assert {r.client.ip: r.dns.timeouts for r in t.expire(1_000_000)} == {
        "10.0.0.5": 0, "10.0.0.6": 0}  # not yet: under the timeout
    recs = {r.client.ip: r for r in t.expire(2_500_000)}
    assert recs["10.0.0.5"].dns.timeouts == 1 and recs["10.0.0.5"].dns.names[0].timeouts == 1
    assert "10.0.0.6" not in recs  # nothing changed there
    final = {r.client.ip: r for r in t.expire(20_000_000)}
    assert all(r.final for r in final.values())
    assert final["10.0.0.6"].dns.timeouts == 0 and final["10.0.0.6"].dns.responses == 1


def test_flush_counts_what_is_still_pending_as_timed_out() -> None:
    t = table()
    q, _ = exchange("x.example.", 1)
    t.packet(0, "udp", 4, C, 40001, R, 53, q)
    [rec] = t.expire(1, flush=True)
    assert rec.final and rec.dns.timeouts == 1


def test_top_names_with_counts_the_rest_counted_as_other() -> None:
    t = table(top_names=3)
    n = 0
    for i, count in enumerate((5, 4, 3, 2, 1)):
        for _ in range(count):
            q, r = exchange(f"n{i}.example.", n)
            t.packet(n * 10, "udp", 4, C, 40002, R, 53, q)
            t.packet(n * 10 + 5, "udp", 4, R, 53, C, 40002, r)
            n += 1
    [rec] = t.expire(1000)
    assert [(x.name, x.count) for x in rec.dns.names] == [
        ("n0.example.", 5), ("n1.example.", 4), ("n2.example.", 3)]
    assert rec.dns.other_names == 3 and rec.dns.queries == 15
    assert {a.name for a in rec.dns.answers} == {"n0.example.", "n1.example.", "n2.example."}


def test_a_response_without_its_query_is_counted_and_still_summarised() -> None:
    t = table()
    _, r = exchange("late.example.", 9)
    t.packet(0, "udp", 4, R, 53, C, 40003, r)
    [rec] = t.expire(1)
    assert t.unmatched == 1 and rec.dns.responses == 1 and rec.dns.latency_us is None
    assert rec.dns.answers[0].value == "192.0.2.7"


@pytest.mark.parametrize("cut", [1, 5, 1000])
def test_dns_over_tcp_messages_framed_across_segments(cut) -> None:
    t = table()
    q, r = exchange("tcp.example.", 4)
    qs, rs = len(q).to_bytes(2, "big") + q, len(r).to_bytes(2, "big") + r
    t.packet(0, "tcp", 4, C, 40004, R, 53, b"")  # the SYN: no payload
    for i in range(0, len(qs), cut):
        t.packet(10, "tcp", 4, C, 40004, R, 53, qs[i:i + cut])
    for i in range(0, len(rs), cut):
        t.packet(20, "tcp", 4, R, 53, C, 40004, rs[i:i + cut])
    [rec] = t.expire(100)
    assert (rec.protocol, rec.dns.queries, rec.dns.responses, rec.dns.latency_us.max) == (
        "tcp", 1, 1, 10)


def test_garbage_on_port_53_is_counted_never_raised() -> None:
    t = table()
    t.packet(0, "udp", 4, C, 40005, R, 53, b"Q 100 20\n")
    [rec] = t.expire(1)
    assert rec.dns.queries == 0 and t.drops.snapshot() == {("dns", "not_dns"): 1}


@pytest.mark.parametrize("dns, field", [
    ({"queries": 1, "responses": 1, "answers": [{"name": "a.", "type": "A", "value": "fd00::1",
                                                  "ttl": 5, "at": "2026-12-07T08:00:00Z"}]},
     "dns.answers.value"),
    ({"queries": 1, "responses": 1, "answers": [{"name": "a.", "type": "MX", "value": "x.",
                                                  "ttl": 5, "at": "2026-12-07T08:00:00Z"}]},
     "dns.answers.type"),
    ({"queries": 1, "responses": 1, "latency_us": {"min": 5, "avg": 3, "max": 9}},
     "dns.latency_us"),
    ({"queries": 1, "responses": 0, "timeouts": 2}, "dns.timeouts"),
    ({"queries": -1, "responses": 0}, "dns.queries"),
    ({"queries": 1, "responses": 0, "bogus": 1}, "dns.bogus"),
])
def test_a_bad_dns_summary_is_refused_naming_the_field(dns, field) -> None:
    from eastwest.errors import RecordError
    from eastwest.record import FlowRecord

    rec = table()
    q, _ = exchange("x.example.", 1)
    rec.packet(0, "udp", 4, C, 40006, R, 53, q)
    data = rec.expire(1)[0].to_builtins() | {"dns": dns}
    with pytest.raises(RecordError) as err:
        FlowRecord.from_builtins(data)
    assert err.value.field == field, err.value
