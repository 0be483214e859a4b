"""The mesh pattern's pieces that need no kernel: the pods' iptables rules, the sidecars' framing
line, and how a truth line is joined to its two hop lines (eastwest/lab/mesh.py `annotate`),
in every order the hop lines may arrive in, with a client port used twice. The real sidecars and
rules are proved in tests/lab/test_lab_mesh.py."""

from __future__ import annotations

import itertools

import pytest

from eastwest.lab import mesh
from eastwest.lab.sidecar import OK_LINE, framing_line, parse_framing


def test_the_pod_rules_are_istios_tcp_only_in_their_own_chains():
    rules = mesh.ruleset().splitlines()
    assert rules[0] == "*nat" and rules[-1] == "COMMIT"
    assert [r for r in rules if r.startswith(("-A PREROUTING", "-A OUTPUT"))] == [
        "-A PREROUTING -p tcp -j EW_MESH_INBOUND", "-A OUTPUT -p tcp -j EW_MESH_OUTPUT"]
    out = [r for r in rules if r.startswith("-A EW_MESH_OUTPUT")]
    assert out == ["-A EW_MESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
                   "-A EW_MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                   "-A EW_MESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
                   "-A EW_MESH_OUTPUT -j EW_MESH_REDIRECT"]
    assert "-A EW_MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A EW_MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    # the sidecar's own ports are never redirected inbound (no loop)
    inbound = [r for r in rules if r.startswith("-A EW_MESH_INBOUND")]
    assert inbound[:2] == ["-A EW_MESH_INBOUND -p tcp --dport 15001 -j RETURN",
                           "-A EW_MESH_INBOUND -p tcp --dport 15006 -j RETURN"]
    assert not [r for r in rules if "udp" in r]


def test_the_framing_line_round_trips_and_anything_else_is_refused():
    line = framing_line("10.244.1.10", 40000, "loadgen-1.77.3")
    assert line == b"EWMESH/1 10.244.1.10 40000 loadgen-1.77.3\n"
    assert parse_framing(line) == ("10.244.1.10", 40000, "loadgen-1.77.3")
    assert OK_LINE == b"EWMESH/1 OK\n"
    for bad in (b"REQ 100 20\n", b"EWMESH/1 OK\n", b"EWMESH/2 1.2.3.4 1 x\n",
                b"EWMESH/1 1.2.3.4 port x\n"):
        with pytest.raises(ValueError):
            parse_framing(bad)


def _call(port: int, start: str, hop_id: str, app_c2s: int, app_s2c: int, saw_port: int):
    """A truth line of api-1 and the two hop lines of its call."""
    t = {"client_pod": "api-1", "client_ip": "10.244.2.11", "client_port": port,
         "protocol": "tcp", "start": start, "server_ip": "10.244.3.11", "server_port": 5432,
         "outcome": "ok"}
    header = len(framing_line("10.244.2.11", port, hop_id))
    out = {"pod": "api-1", "direction": "outbound", "id": hop_id, "start": start,
           "app_client": {"ip": "10.244.2.11", "port": port},
           "downstream": {"client_ip": "10.244.2.11", "client_port": port,
                          "server_ip": "127.0.0.1", "server_port": 15001},
           "original_dst": {"ip": "10.96.0.12", "port": 5432},
           "upstream": {"local_ip": "10.244.2.11", "local_port": saw_port,
                        "remote_ip": "10.96.0.12", "remote_port": 5432},
           "framing_c2s": header, "framing_s2c": len(OK_LINE), "outcome": "ok",
           "downstream_bytes_in": app_c2s, "downstream_bytes_out": app_s2c,
           "upstream_bytes_in": app_s2c + len(OK_LINE), "upstream_bytes_out": app_c2s + header}
    inb = {"pod": "db-1", "direction": "inbound", "id": hop_id, "start": start,
           "app_client": {"ip": "10.244.2.11", "port": port},
           "downstream": {"client_ip": "10.244.2.11", "client_port": saw_port,
                          "server_ip": "10.244.3.11", "server_port": 15006},
           "original_dst": {"ip": "10.244.3.11", "port": 5432},
           "upstream": {"local_ip": "127.0.0.6", "local_port": 50000 + saw_port % 1000,
                        "remote_ip": "10.244.3.11", "remote_port": 5432},
           "framing_c2s": header, "framing_s2c": len(OK_LINE), "outcome": "ok",
           "downstream_bytes_in": app_c2s + header, "downstream_bytes_out": app_s2c + len(OK_LINE),
           "upstream_bytes_in": app_s2c, "upstream_bytes_out": app_c2s}
    return t, [out, inb]


def test_each_truth_line_gets_its_own_hops_in_every_order_even_with_a_port_used_twice():
    calls = [_call(40000, "2026-01-01T00:00:01.000000Z", "api-1.9.1", 100, 2000, 41001),
             _call(40000, "2026-01-01T00:00:02.000000Z", "api-1.9.2", 300, 50, 41002),
             _call(40002, "2026-01-01T00:00:01.500000Z", "api-1.9.3", 7, 9, 41003)]
    hops = [h for _, hs in calls for h in hs]
    for order in itertools.permutations(hops):
        lines = [dict(t) for t, _ in calls]
        assert mesh.annotate(lines, list(order), {"api-1"}) == []
        for line, (_, (out, _inb)) in zip(lines, calls, strict=True):
            m = line["mesh"]
            assert m["hop_id"] == out["id"]
            assert (m["client_ip"], m["client_port"]) == ("10.244.2.11", out["upstream"]["local_port"])
            assert (m["server_ip"], m["server_port"]) == ("10.244.3.11", 5432)
            assert (m["server_sidecar"], m["outcome"]) == ("db-1", "ok")
            assert m["wire_bytes_c2s"] == out["downstream_bytes_in"] + out["framing_c2s"]
            assert m["wire_bytes_s2c"] == out["downstream_bytes_out"] + len(OK_LINE)


def test_a_line_whose_hops_are_not_written_yet_is_handed_back_and_udp_is_left_alone():
    (t, (out, inb)), (t2, hops2) = (_call(40000, "2026-01-01T00:00:01.000000Z", "a.1.1", 1, 2, 41000),
                                    _call(40001, "2026-01-01T00:00:02.000000Z", "a.1.2", 1, 2, 41001))
    udp = {**t, "protocol": "udp", "client_port": 999}
    other = {**t, "client_pod": "loadgen-1"}  # a pod without a sidecar: not meshed
    lines = [t, t2, udp, other]
    assert mesh.annotate(lines, [out, *hops2], {"api-1"}) == [t]  # its inbound hop is missing
    assert "mesh" in t2 and "mesh" not in udp and "mesh" not in other
    assert mesh.annotate(lines, [inb, *hops2], {"api-1"}) == [t]  # its outbound hop is missing
    assert mesh.annotate(lines, [out, inb, *hops2], {"api-1"}) == []
    assert t["mesh"]["hop_id"] == "a.1.1"


def _free_range(n: int) -> range:
    """n consecutive ports nobody holds on 127.0.0.1 right now (from 21000 up)."""
    import socket

    for base in range(21000, 32000, n):
        try:
            held = []
            for port in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return range(base, base + n)
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no free ports")


def test_fresh_ports_never_hand_out_a_port_twice_within_their_window():
    import socket

    from eastwest.lab.app import FreshPorts

    seen = []
    ephemeral = FreshPorts()
    for _ in range(300):  # each closed at once: the kernel may offer its port again at once
        s = ephemeral.open(socket.AF_INET, "127.0.0.1")
        seen.append(s.getsockname()[1])
        s.close()
    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert len(set(seen)) == 300 and all(low <= p <= high for p in seen)
    ports = _free_range(4)
    own = FreshPorts(ports=ports)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", ports[1]))  # held by someone else: skipped
    try:
        got = []
        for _ in range(3):
            s = own.open(socket.AF_INET, "127.0.0.1")
            got.append(s.getsockname()[1])
            s.close()
        assert got == [ports[0], ports[2], ports[3]]
        with pytest.raises(OSError, match="is free"):  # the rest were used within the window
            own.open(socket.AF_INET, "127.0.0.1")
    finally:
        blocker.close()
    again = FreshPorts(reuse_s=0.0, ports=ports).open(socket.AF_INET, "127.0.0.1")
    assert again.getsockname()[1] == ports[0]
    again.close()
