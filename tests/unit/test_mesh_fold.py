"""Mesh folding at the collector (collector/mesh.py): the sockets of one service-mesh call, as
NAT folding hands them on (collector/natfold.py), become one record of the application's call on
each host, in every order and batch split they can arrive in."""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.mesh import MeshFolder, MeshFoldingSink
from collector.mesh_proxies import (
    DEFAULT_PROXIES,
    MeshSettings,
    Proxy,
    check_line,
    parse_proxy,
    settings_from,
)
from collector.pipeline import JsonLinesSink
from eastwest import codec
from eastwest.drops import Drops
from eastwest.errors import ConfigError
from eastwest.record import Endpoint, FlowRecord, Mesh, MeshHop, Nat, Process

T0 = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)
A, B = "10.244.1.10", "10.244.2.20"
VIP, LO, HANDOFF = Endpoint("10.96.0.50", 80), "127.0.0.1", "127.0.0.6"
OUT, IN, TPORT = 15001, 15006, 8080
NS_A, NS_B, HOST_A, HOST_B = 4026531001, 4026531002, 4026530001, 4026530002
APP_A, SIDE_A = Process(pid=100, comm="client"), Process(pid=200, comm="ew-sidecar")
SIDE_B, APP_B = Process(pid=300, comm="ew-sidecar"), Process(pid=400, comm="server")
HOLD = 7.0


def E(ip: str, port: int) -> Endpoint:  # noqa: N802 - reads like the record's type
    return Endpoint(ip, port)


def rec(observer: str, client: Endpoint, server: Endpoint, *, process: Process, netns: int,
        start: datetime, nat: list[Nat] | None = None, loopback: bool = False,
        final: bool = False, c2s: int = 0, s2c: int = 0, n: int = 0) -> FlowRecord:
    return FlowRecord(record_id=f"c:{n}", collector="c", source="socket", start=start,
                      end=start + timedelta(seconds=6 if final else 5), final=final,
                      protocol="tcp", family=4, client=client, server=server,
                      observer=observer, bytes_c2s=c2s, bytes_s2c=s2c,  # type: ignore[arg-type]
                      packets_c2s=3 if final else 2, packets_s2c=4 if final else 2,
                      connect="ok", process=process, netns=netns, loopback=loopback,
                      container="ctr-" + process.comm, nat=nat)


def redirect_out(dialled: Endpoint = VIP) -> Nat:
    return Nat("redirect", dialled, E(LO, OUT), NS_A)


def call_records(cport: int = 40000, pport: int = 41000, x: int = 42000, t: datetime = T0,
                 same_host: bool = False, scale: int = 1) -> dict[str, tuple[FlowRecord, ...]]:
    """The six sockets of one call, each as (interim, final): r1..r3 on A's host, r4..r6 on
    B's. Bytes: the app's 100/2000 (interim 10/200), the proxy hop's with framing 130/2040."""
    def both(make, c2s: int, s2c: int) -> tuple[FlowRecord, FlowRecord]:  # type: ignore[no-untyped-def]
        return (make(final=False, c2s=c2s * scale // 10, s2c=s2c * scale // 10),
                make(final=True, c2s=c2s * scale, s2c=s2c * scale))

    dnat = Nat("dnat", VIP, E(B, TPORT), HOST_A)
    inbound = Nat("dnat", E(B, TPORT), E(B, IN), NS_B)
    r3_nat, r3_server = ([dnat, inbound], E(B, IN)) if same_host else ([dnat], E(B, TPORT))
    r4_nat = [dnat, inbound] if same_host else [inbound]
    return {
        "r1": both(lambda **k: rec("client", E(A, cport), E(LO, OUT), process=APP_A, netns=NS_A,
                                   start=t, nat=[redirect_out()], **k), 100, 2000),
        "r2": both(lambda **k: rec("server", E(A, cport), E(LO, OUT), process=SIDE_A, netns=NS_A,
                                   start=t + MS, loopback=True, **k), 100, 2000),
        "r3": both(lambda **k: rec("client", E(A, pport), r3_server, process=SIDE_A, netns=NS_A,
                                   start=t + 2 * MS, nat=r3_nat, **k), 130, 2040),
        "r4": both(lambda **k: rec("server", E(A, pport), E(B, IN), process=SIDE_B, netns=NS_B,
                                   start=t + 3 * MS, nat=r4_nat, **k), 130, 2040),
        "r5": both(lambda **k: rec("client", E(HANDOFF, x), E(B, TPORT), process=SIDE_B,
                                   netns=NS_B, start=t + 4 * MS, loopback=True, **k), 100, 2000),
        "r6": both(lambda **k: rec("server", E(HANDOFF, x), E(B, TPORT), process=APP_B,
                                   netns=NS_B, start=t + 4 * MS, loopback=True, **k), 100, 2000),
    }


def folder(hold: float = HOLD, proxies: tuple[Proxy, ...] = DEFAULT_PROXIES,
           max_calls: int = 1000) -> MeshFolder:
    ids = itertools.count(1)
    return MeshFolder(MeshSettings(proxies, hold), lambda: f"c:f{next(ids)}", Drops(),
                      max_calls=max_calls)


def expected_client(rs: dict[str, tuple[FlowRecord, ...]], v: int = 1) -> FlowRecord:
    r1, r2, r3 = rs["r1"][v], rs["r2"][v], rs["r3"][v]
    return r1.replace(client=r3.client, server=E(B, TPORT), nat=[Nat("dnat", VIP, E(B, TPORT),
                                                                     HOST_A)],
                      mesh=Mesh("ew-sidecar", [
                          MeshHop("app-proxy", r1.client, r1.server, r1.bytes_c2s, r1.bytes_s2c,
                                  "ew-sidecar", r2.process.pid),  # type: ignore[union-attr]
                          MeshHop("proxy-proxy", r3.client, E(B, TPORT), r3.bytes_c2s,
                                  r3.bytes_s2c, "ew-sidecar", 200)]))


def expected_server(rs: dict[str, tuple[FlowRecord, ...]], v: int = 1,
                    nat: list[Nat] | None = None) -> FlowRecord:
    r4, r5, r6 = rs["r4"][v], rs["r5"][v], rs["r6"][v]
    return r6.replace(client=r4.client, server=E(B, TPORT), nat=nat, loopback=False,
                      mesh=Mesh("ew-sidecar", [
                          MeshHop("proxy-proxy", r4.client, r4.server, r4.bytes_c2s,
                                  r4.bytes_s2c, "ew-sidecar", 300),
                          MeshHop("proxy-app", r5.client, r5.server, r5.bytes_c2s, r5.bytes_s2c,
                                  "ew-sidecar", 300)]))


def same(a: FlowRecord, b: FlowRecord) -> bool:
    return a.replace(record_id="c:0") == b.replace(record_id="c:0")


def interleavings(seqs: list[list[FlowRecord]]) -> list[list[FlowRecord]]:
    """Every merge of `seqs` that keeps each one's order (a socket's interim before its final)."""
    if not any(seqs):
        return [[]]
    out = []
    for i, s in enumerate(seqs):
        if s:
            rest = [*seqs[:i], s[1:], *seqs[i + 1:]]
            out += [[s[0], *tail] for tail in interleavings(rest)]
    return out


def splits(records: list[FlowRecord]) -> list[list[list[FlowRecord]]]:
    """Every way to cut `records` into consecutive batches."""
    out = []
    for cuts in itertools.product((False, True), repeat=max(0, len(records) - 1)):
        batches, cur = [], [records[0]]
        for r, cut in zip(records[1:], cuts, strict=True):
            if cut:
                batches.append(cur)
                cur = []
            cur.append(r)
        out.append([*batches, cur])
    return out


def run(f: MeshFolder, batches: list[list[FlowRecord]], step: timedelta = 10 * MS) -> list[FlowRecord]:
    out: list[FlowRecord] = []
    for i, b in enumerate(batches):
        out += f.add(b, T0 + i * step)
    return out


def check_host(out: list[FlowRecord], expected: FlowRecord) -> None:
    assert all(r.mesh is not None for r in out), [r for r in out if r.mesh is None]
    finals = [r for r in out if r.final]
    assert len(finals) == 1 and same(finals[0], expected), finals
    assert out[-1] is finals[0]  # nothing of the call after its final
    assert {r.key for r in out} == {expected.key}
    for r in out:  # every interim is the app's view at that time, keyed like the final
        assert r.process == expected.process and r.observer == expected.observer
    assert len({r.record_id for r in out}) == len(out)


@pytest.mark.parametrize("host", ["client", "server"])
def test_one_call_folds_to_one_record_per_host_in_every_order_and_batch_split(host):
    rs = call_records()
    names = ("r1", "r2", "r3") if host == "client" else ("r4", "r5", "r6")
    expected = expected_client(rs) if host == "client" else expected_server(rs)
    n = 0
    for order in interleavings([list(rs[k]) for k in names]):
        for batches in splits(order):
            f = folder()
            out = run(f, batches)
            check_host(out, expected)
            assert not f.calls and f.by_sock == {} and f.drops.total() == 0
            n += 1
    assert n == 90 * 32


def test_the_finals_alone_fold_in_every_order_and_split_on_both_hosts_at_once():
    rs = call_records()
    finals = [rs[k][1] for k in rs]
    for order in itertools.permutations(finals):
        for batches in splits(list(order))[::8]:  # every eighth split: 720 x 4 runs
            out = run(folder(), batches)
            assert len(out) == 2
            c = next(r for r in out if r.observer == "client")
            s = next(r for r in out if r.observer == "server")
            assert same(c, expected_client(rs)) and same(s, expected_server(rs))
            assert c.key == s.key == ("tcp", A, 41000, B, TPORT)


def test_same_host_call_ends_the_key_at_the_dialled_port_not_the_inbound_redirect():
    rs = call_records(same_host=True)
    dnat = Nat("dnat", VIP, E(B, TPORT), HOST_A)
    for order in itertools.permutations([rs[k][1] for k in rs]):
        out = run(folder(), [list(order)])
        c = next(r for r in out if r.observer == "client")
        s = next(r for r in out if r.observer == "server")
        assert len(out) == 2
        assert same(c, expected_client(rs))  # nat: the Service's DNAT only
        assert same(s, expected_server(rs, nat=[dnat]))
        assert c.key == s.key and c.dialled == s.dialled == VIP


def test_the_folded_record_round_trips_through_the_json_codec_and_validation():
    rs = call_records()
    out = run(folder(), [[rs[k][1] for k in rs]])
    for r in out:
        assert codec.from_json(codec.to_json(r)) == r
        assert FlowRecord.from_builtins(r.to_builtins()) == r
    buf = io.BytesIO()
    JsonLinesSink(buf).write(out)
    back = [codec.from_json(line) for line in buf.getvalue().splitlines()]
    assert back == out and back[0].mesh is not None and back[0].mesh.hops[0].hop == "app-proxy"


def test_interim_records_repeat_the_fold_with_the_apps_cumulative_counters():
    rs = call_records()
    f = folder()
    first = f.add([rs["r1"][0], rs["r2"][0]], T0)
    assert first == []  # held: the proxy's upstream socket is not there yet
    second = f.add([rs["r3"][0]], T0 + MS)
    assert len(second) == 1 and not second[0].final
    assert (second[0].bytes_c2s, second[0].bytes_s2c) == (10, 200)
    third = f.add([rs["r1"][1]], T0 + 2 * MS)
    assert third == []  # the app's final waits for the proxy sockets' finals
    fourth = f.add([rs["r3"][1], rs["r2"][1]], T0 + 3 * MS)
    assert len(fourth) == 1 and same(fourth[0], expected_client(rs))


def test_a_proxy_that_keeps_its_upstream_open_gets_the_final_after_the_hold_and_is_absorbed():
    rs = call_records()
    f = folder()
    assert f.add([rs["r1"][1], rs["r2"][1], rs["r3"][0]], T0) == []
    out = f.add([], T0 + timedelta(seconds=HOLD))
    assert len(out) == 1 and out[0].final
    assert out[0].mesh is not None and out[0].mesh.hops[1].bytes_c2s == 13  # r3's interim
    assert f.add([rs["r3"][1]], T0 + timedelta(seconds=HOLD + 1)) == []  # absorbed
    assert f.late == 1 and not f.calls and f.drops.total() == 0


@pytest.mark.parametrize("members", [("r1", "r2"), ("r3",), ("r1",), ("r4", "r5"), ("r6",),
                                     ("r2", "r3")])
def test_sockets_whose_partners_do_not_come_are_released_after_the_hold_marked(members):
    rs = call_records()
    f = folder()
    held = f.add([rs[k][0] for k in members], T0)
    assert held == []
    assert f.add([], T0 + timedelta(seconds=HOLD) - MS) == []
    out = f.add([], T0 + timedelta(seconds=HOLD))
    assert sorted(out, key=lambda r: r.start) == [
        rs[k][0].replace(incomplete=["mesh"]) for k in members]
    assert f.drops.snapshot() == {("mesh", "unpaired"): len(members)}
    # their later records go out at once, marked, and then they are forgotten
    later = f.add([rs[k][1] for k in members], T0 + timedelta(seconds=HOLD + 1))
    assert later == [rs[k][1].replace(incomplete=["mesh"]) for k in members]
    assert not f.calls and f.by_sock == {} and f.by_pair == {} and f.pools == {}


def test_close_releases_everything_held_and_the_sink_writes_it():
    rs = call_records()
    buf = io.BytesIO()
    f = folder()
    sink = MeshFoldingSink(JsonLinesSink(buf), f, lambda: T0, tick_s=None)
    sink.write([rs["r1"][0], rs["r4"][0], FlowRecord.from_builtins(
        {**rs["r1"][0].to_builtins(), "process": None, "nat": None, "netns": 7})])
    assert len(buf.getvalue().splitlines()) == 1  # the unrelated record, at once
    sink.close()
    out = [codec.from_json(line) for line in buf.getvalue().splitlines()]
    assert [r.incomplete for r in out[1:]] == [["mesh"], ["mesh"]]


def test_the_ticker_releases_held_records_when_no_source_writes():
    rs = call_records()
    buf = io.BytesIO()
    now = [T0]
    sink = MeshFoldingSink(JsonLinesSink(buf), folder(hold=0.05), lambda: now[0], tick_s=0.01)
    sink.write([rs["r3"][0]])
    now[0] = T0 + timedelta(seconds=1)
    import time

    for _ in range(500):
        if buf.getvalue():
            break
        time.sleep(0.01)
    sink.close()
    assert [codec.from_json(line).incomplete for line in buf.getvalue().splitlines()] == [["mesh"]]


def test_two_concurrent_calls_to_one_destination_fold_to_two_calls_in_every_order():
    a = call_records(40000, 41000, 42000, T0)
    b = call_records(40001, 41001, 42001, T0 + 10 * MS, scale=3)
    finals = [a[k][1] for k in ("r1", "r2", "r3")] + [b[k][1] for k in ("r1", "r2", "r3")]
    exact = 0
    for order in itertools.permutations(finals):
        for batches in ([list(order)], [[r] for r in order]):
            f = folder()
            out = run(f, batches)
            out += f.add([], T0 + timedelta(seconds=HOLD + 1))  # what paired late
            assert len(out) == 2 and all(r.final and r.mesh is not None for r in out)
            assert f.drops.total() == 0 and not f.calls
            # the app's own counters, process and ends: each call once, whatever the pairing
            assert sorted((r.mesh.hops[0].client.port, r.bytes_c2s) for r in out) == [  # type: ignore[union-attr]
                (40000, 100), (40001, 300)]
            # the proxy-to-proxy keys: each upstream socket once
            assert sorted(r.client.port for r in out) == [41000, 41001]
            exact += all(r.client.port - 41000 == r.mesh.hops[0].client.port - 40000  # type: ignore[union-attr]
                         for r in out)
    assert exact >= 720  # in one batch always paired right; crosswise only when split


def test_two_concurrent_calls_in_one_batch_pair_by_nearest_start():
    a = call_records(40000, 41000, 42000, T0)
    b = call_records(40001, 41001, 42001, T0 + 10 * MS, scale=3)
    recs = [a[k][1] for k in a] + [b[k][1] for k in b]
    for order in itertools.islice(itertools.permutations(recs), 0, 40320, 97):
        out = run(folder(), [list(order)])
        assert len(out) == 4
        for r in out:
            assert r.mesh is not None
            app_port = r.mesh.hops[0].client.port if r.observer == "client" else None
            if app_port is not None:
                assert r.client.port - 41000 == app_port - 40000
            else:
                assert r.client.port - 41000 == r.mesh.hops[1].client.port - 42000


def test_a_handoff_refused_by_the_server_pod_is_the_server_side_in_every_order():
    """Nobody listens on the port the client dialled (the lab's db dead port): the server's
    sidecar accepted on 15006 (r4) and its handoff was refused (r5), no app socket (r6) will
    come. The two sidecar sockets are the whole server side: one server record of the
    network's key, the sidecar's process and resets, no bytes, both hops; nothing held,
    marked or counted as unpaired."""
    rs = call_records()
    r4 = rs["r4"][1].replace(bytes_s2c=0, resets=1)
    r5 = rs["r5"][1].replace(connect="refused", bytes_c2s=0, bytes_s2c=0)
    for order in itertools.permutations([r4, r5]):
        for split in ([[*order]], [[order[0]], [order[1]]]):
            f = folder()
            out = run(f, split)
            assert len(out) == 1, (order, split, out)
            got = out[0]
            assert got.observer == "server" and got.key == ("tcp", A, 41000, B, TPORT)
            assert got.final and got.process == SIDE_B and got.resets == 1
            assert (got.bytes_c2s, got.bytes_s2c) == (0, 0)  # no server app received any
            assert got.nat is None and "mesh" not in got.incomplete
            assert got.mesh is not None and [h.hop for h in got.mesh.hops] == [
                "proxy-proxy", "proxy-app"]
            assert got.mesh.hops[1].server == E(B, TPORT)
            assert f.add([], T0 + timedelta(seconds=2 * HOLD)) == []
            assert f.drops.total() == 0 and not f.calls


def test_consul_and_linkerd_handoffs_fold_and_a_plain_local_call_is_only_delayed():
    """A handoff from 127.0.0.1 (Consul) or the pod's own address (Linkerd) might be any local
    call: it is one only in a namespace where a proxy's socket was seen. There every order of
    the server side's three sockets folds once a proxy socket was seen (an earlier call) or
    comes in the same batch; a pod's very first call whose app socket comes alone, first, is
    not folded (documented). A plain local call waits the hold only in a proxy's namespace."""
    consul = Process(pid=300, comm="envoy")

    def server_side(pport: int, x: int) -> list[FlowRecord]:
        rs = call_records(pport=pport, x=x)
        r4 = rs["r4"][1].replace(server=E(B, 20000), process=consul,
                                 nat=[Nat("dnat", E(B, TPORT), E(B, 20000), NS_B)])
        r5 = rs["r5"][1].replace(client=E(LO, x), server=E(LO, TPORT), process=consul)
        r6 = rs["r6"][1].replace(client=E(LO, x), server=E(LO, TPORT))
        return [r4, r5, r6]

    def warmed() -> MeshFolder:  # an earlier call of the pod, folded
        f = folder()
        assert [r.mesh is not None for r in f.add(server_side(41999, 42999), T0 - MS)] == [True]
        return f

    for order in itertools.permutations(server_side(41000, 42000)):
        out = run(warmed(), [[r] for r in order])
        assert len(out) == 1 and out[0].key == ("tcp", A, 41000, B, TPORT)
        assert out[0].mesh is not None and out[0].mesh.proxy == "envoy"
        out = run(folder(), [list(order)])  # one batch: its proxy sockets count first
        assert len(out) == 1 and out[0].mesh is not None, order
    r4, r5, r6 = server_side(41000, 42000)
    f = folder()
    assert f.add([r6], T0) == [r6]  # first, alone: no proxy seen in its namespace yet
    # a local call from 127.0.0.1 without a proxy in a proxy's namespace: out after the hold,
    # as it came; in a namespace without a proxy: at once
    f = warmed()
    plain = r6.replace(client=E(LO, 50000))
    assert f.add([plain], T0) == []
    assert f.add([], T0 + timedelta(seconds=HOLD)) == [plain]
    assert f.drops.total() == 0
    elsewhere = plain.replace(netns=NS_A)
    assert folder().add([elsewhere], T0) == [elsewhere]


def test_envoy_worker_threads_are_recognised_by_the_command_line():
    rs = call_records()
    worker = Process(pid=200, comm="wrk:worker_0", cmdline="/usr/local/bin/envoy -c x.json")
    out = run(folder(), [[rs["r1"][1], rs["r2"][1].replace(process=worker),
                          rs["r3"][1].replace(process=worker)]])
    assert len(out) == 1 and out[0].mesh is not None and out[0].mesh.proxy == "envoy"


def test_records_beyond_the_cap_go_out_unfolded_marked_and_counted():
    rs = call_records()
    f = folder(max_calls=1)
    out = f.add([rs["r1"][0], rs["r4"][0]], T0)
    assert out == [rs["r4"][0].replace(incomplete=["mesh"])]
    assert f.drops.snapshot() == {("mesh", "full"): 1}


@pytest.mark.parametrize("text,words", [
    ("envoy", "NAME:OUTBOUND:INBOUND"),
    ("envoy:15001", "NAME:OUTBOUND:INBOUND"),
    (":15001:15006", "NAME"),
    ("/usr/bin/envoy:15001:15006", "NAME"),
    ("envoy:0:15006", "OUTBOUND port '0'"),
    ("envoy:15001:70000", "INBOUND port '70000'"),
    ("envoy:x:15006", "OUTBOUND port 'x'"),
    ("envoy:15001:15001", "must differ"),
    ("envoy:15001:15006:nope", "HANDOFF 'nope'"),
    ("envoy:15001:15006:10.0.0.1", "loopback"),
])
def test_bad_mesh_proxy_values_name_the_flag_and_what_is_wrong(text, words):
    with pytest.raises(ConfigError) as exc:
        parse_proxy(text)
    assert "--mesh-proxy" in str(exc.value) and words in str(exc.value)


def test_mesh_proxy_values_and_settings():
    assert parse_proxy("myproxy:4000:4001") == Proxy("myproxy", 4000, 4001, "127.0.0.6")
    assert parse_proxy("p:1:2:self").handoff == "self"
    assert parse_proxy("p:1:2:::1").handoff == "::1"

    class Args:
        interval = 5.0
        mesh_proxy = ["myproxy:4000:4001"]
        mesh_hold = None
        no_mesh = False
        no_nat = False
        pcap: list[str] = []

    s = settings_from(Args())
    assert s is not None and s.hold_s == 7.0 and s.proxies[-1].name == "myproxy"
    assert "mesh fold:" in check_line(Args()) and "myproxy:4000:4001" in check_line(Args())
    Args.no_mesh = True
    assert settings_from(Args()) is None and "off  (--no-mesh)" in check_line(Args())
    Args.mesh_hold = 0.0
    with pytest.raises(ConfigError, match="--mesh-hold"):
        settings_from(Args())


@pytest.mark.parametrize("argv,words", [
    (["--mesh-proxy", "envoy:15001"], "--mesh-proxy='envoy:15001'"),
    (["--mesh-hold", "-1"], "--mesh-hold=-1.0"),
])
def test_the_collector_exits_2_on_a_bad_mesh_flag(argv, words, capsys, tmp_path):
    from eastwest.cli import main

    rc = main(["collector", "--stdout", "--collector-id", "t", "--spool-dir", str(tmp_path),
               *argv])
    assert rc == 2
    assert words in capsys.readouterr().err


@st.composite
def arrivals(draw):  # type: ignore[no-untyped-def]
    """The six sockets' (interim, final) records of one call interleaved in any order that keeps
    each socket's interim first, cut into batches anywhere, on one host or two."""
    same_host = draw(st.booleans())
    rs = call_records(same_host=same_host)
    left = {k: list(v) for k, v in rs.items()}
    order: list[FlowRecord] = []
    while any(left.values()):
        k = draw(st.sampled_from(sorted(k for k, v in left.items() if v)))
        order.append(left[k].pop(0))
    cuts = draw(st.lists(st.booleans(), min_size=len(order) - 1, max_size=len(order) - 1))
    batches, cur = [], [order[0]]
    for r, cut in zip(order[1:], cuts, strict=True):
        if cut:
            batches.append(cur)
            cur = []
        cur.append(r)
    return same_host, rs, [*batches, cur]


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(arrivals())
def test_all_six_sockets_with_interims_fold_alike_in_any_order_on_one_host_or_two(case):
    same_host, rs, batches = case
    f = folder()
    out = run(f, batches)
    assert all(r.mesh is not None for r in out)
    finals = sorted((r for r in out if r.final), key=lambda r: r.observer)
    dnat = Nat("dnat", VIP, E(B, TPORT), HOST_A)
    assert len(finals) == 2
    assert same(finals[0], expected_client(rs))
    assert same(finals[1], expected_server(rs, nat=[dnat] if same_host else None))
    assert finals[0].key == finals[1].key
    assert not f.calls and f.by_sock == {} and f.drops.total() == 0


def test_a_proxy_that_picks_the_endpoint_itself_pairs_at_the_hold_deadline_in_every_order():
    """Envoy load-balances a ClusterIP call itself: its upstream socket goes to the endpoint,
    not to the dialled VIP, so no destination matches; at the hold deadline the call takes the
    proxy's unpaired upstream socket nearest in start."""
    rs = call_records()
    r3 = rs["r3"][1].replace(nat=None)  # straight to B:8080, no kube-proxy DNAT
    for order in itertools.permutations([rs["r1"][1], rs["r2"][1], r3]):
        for batches in ([list(order)], [[r] for r in order]):
            f = folder()
            assert run(f, batches) == []  # no destination in common: they wait
            out = f.add([], T0 + timedelta(seconds=HOLD))
            assert len(out) == 1 and same(out[0], expected_client(rs).replace(nat=None))
            assert f.drops.total() == 0 and not f.calls and not f.loose
