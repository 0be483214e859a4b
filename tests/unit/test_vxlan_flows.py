"""Flow table: orientation rule, sessions (idle gap, port reuse after FIN/RST), interim and
final records, VTEPs of the client->server direction, drop counting."""

from __future__ import annotations

import ipaddress

from collector.pipeline import CollectorContext
from collector.vxlan.flows import FlowTable
from collector.vxlan.packets import CODE, Decoded, split128

S, SA, A, FA, R, PA = 0x02, 0x12, 0x10, 0x11, 0x04, 0x18
T0 = 1_700_000_000_000_000
C, SV = ("10.244.1.11", 40000), ("10.244.2.12", 80)
VTEP_C, VTEP_S = "10.213.0.1", "10.213.0.2"


def batch(pkts: list[tuple]) -> Decoded:
    """pkts: (t_us offset, c2s?, flags, payload[, proto, ports]) for the C<->SV pair."""
    d = Decoded.empty(len(pkts))
    for i, p in enumerate(pkts):
        t, c2s, flags, payload = p[:4]
        proto = p[4] if len(p) > 4 else 6
        (sip, sp), (dip, dp) = (C, SV) if c2s else (SV, C)
        if len(p) > 5:
            sp, dp = p[5] if c2s else p[5][::-1]
        vs, vd = (VTEP_C, VTEP_S) if c2s else (VTEP_S, VTEP_C)
        row = {"ts_us": T0 + t, "ttype": 1, "vni": 42, "ofam": 4, "fam": 4, "proto": proto, "sport": sp,
               "dport": dp, "flags": flags, "payload": payload, "l3len": payload + 40,
               "odport": 4789}
        for name, text in (("osrc", vs), ("odst", vd), ("src", sip), ("dst", dip)):
            row[name + "_hi"], row[name + "_lo"] = split128(int(ipaddress.ip_address(text)))
        d.set_row(i, row)
    return d


def table(idle: float = 30.0) -> FlowTable:
    return FlowTable(CollectorContext(collector_id="t"), "vxlan", idle_timeout=idle)


def test_syn_decides_orientation_even_when_the_server_speaks_first_in_the_capture() -> None:
    t = table()
    # the server's SYN+ACK arrives first in capture order (two capture points merged)
    t.add(batch([(1, False, SA, 0), (0, True, S, 0), (2, True, A, 0), (3, True, PA, 7),
                 (4, False, PA, 11)]))
    (r,) = t.flush()
    assert (r.client.ip, r.client.port, r.server.port) == (C[0], C[1], SV[1])
    assert (r.bytes_c2s, r.bytes_s2c, r.packets_c2s, r.packets_s2c) == (7, 11, 3, 2)
    assert (r.tunnel.outer_src, r.tunnel.outer_dst) == (VTEP_C, VTEP_S)
    assert r.connect == "ok" and r.final


def test_mid_flow_the_well_known_port_is_the_server_and_vteps_follow() -> None:
    t = table()
    t.add(batch([(0, False, PA, 100), (1, True, A, 0)]))  # first packet server -> client
    (r,) = t.flush()
    assert r.server.port == 80 and r.client.port == 40000
    assert (r.tunnel.outer_src, r.tunnel.outer_dst) == (VTEP_C, VTEP_S)
    assert r.connect is None


def test_udp_ephemeral_port_is_the_client_and_lower_port_rule() -> None:
    t = table()
    t.add(batch([(0, False, 0, 5, 17, (45000, 5353))]))
    (r,) = t.flush()
    assert (r.client.port, r.server.port) == (45000, 5353)
    t.add(batch([(0, True, 0, 5, 17, (9000, 8000))]))
    (r,) = t.flush()
    assert (r.client.port, r.server.port) == (9000, 8000)


def test_idle_gap_splits_and_the_same_result_across_batches() -> None:
    pkts = [(0, True, PA, 1), (1, False, PA, 2), (31_000_000, True, PA, 3)]
    one = table()
    out = one.add(batch(pkts)) + one.flush()
    two = table()
    out2 = two.add(batch(pkts[:2])) + two.add(batch(pkts[2:])) + two.flush()
    for recs in (out, out2):
        assert [(r.bytes_c2s, r.bytes_s2c, r.final) for r in recs] == [(1, 2, True), (3, 0, True)]


def test_port_reuse_after_fin_starts_a_new_connection_but_syn_retransmit_does_not() -> None:
    t = table()
    out = t.add(batch([(0, True, S, 0), (1, True, S, 0), (2, False, SA, 0), (3, True, FA, 0),
                       (4, False, FA, 0), (5, True, A, 0), (6, True, S, 0), (7, False, R, 0)]))
    out += t.flush()
    assert [(r.packets_c2s, r.packets_s2c, r.connect) for r in out] == [(4, 2, "ok"),
                                                                         (1, 1, "refused")]


def test_interim_records_then_final_with_cumulative_counters() -> None:
    t = table()
    t.add(batch([(0, True, S, 0), (1, False, SA, 0), (2, True, PA, 10)]))
    (interim,) = t.tick(T0 + 5_000_000)
    assert not interim.final and interim.bytes_c2s == 10
    assert t.tick(T0 + 6_000_000) == []  # nothing changed: no record
    t.add(batch([(7_000_000, True, PA, 5), (7_000_001, True, R, 0)]))
    assert [r.final for r in t.tick(T0 + 8_000_000)] == [False]  # closed, inside the grace
    (final,) = t.tick(T0 + 10_000_000)
    assert final.final and final.bytes_c2s == 15 and final.resets == 1
    assert final.connect == "reset"
    assert final.end.timestamp() * 1e6 == T0 + 7_000_001


def test_undecoded_rows_are_counted_per_reason() -> None:
    ctx = CollectorContext(collector_id="t")
    t = FlowTable(ctx, "vxlan", idle_timeout=30)
    d = batch([(0, True, PA, 1)] * 4)
    d.status[:3] = [CODE["truncated"], CODE["inner_non_ip"], CODE["truncated"]]
    t.add(d)
    assert ctx.drops.snapshot() == {("vxlan", "truncated"): 2, ("vxlan", "inner_non_ip"): 1}
    assert t.packets == 1


def test_plain_and_tunnelled_packets_of_one_tuple_are_separate_flows_of_their_kind() -> None:
    """Keyed by the tunnel type too: the same inner 5-tuple plain, in VXLAN VNI 42 and in
    Geneve VNI 42 is three flows; the plain one has no tunnel, the others name their type."""
    d = batch([(0, True, S, 0), (1, False, SA, 0), (2, True, A, 0)] * 3)
    for i in range(3):
        d.ttype[i] = 0
        for name in ("vni", "ofam", "osrc_hi", "osrc_lo", "odst_hi", "odst_lo", "odport"):
            getattr(d, name)[i] = 0
    d.ttype[6:] = 2
    d.odport[6:] = 6081
    t = table()
    t.add(d)
    got = {r.tunnel.type if r.tunnel else None: r for r in t.flush()}
    assert sorted(got, key=str) == [None, "geneve", "vxlan"]
    assert got[None].tunnel is None and got[None].tunnel_outer is None
    assert got["geneve"].tunnel.vni == 42 and got["geneve"].tunnel.outer_dport == 6081
    for r in got.values():
        assert (r.packets_c2s, r.packets_s2c, r.connect) == (2, 1, "ok")
