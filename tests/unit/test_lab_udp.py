"""The demo application's UDP (issue 17, section 3; docs/lab.md, "UDP"), run for real on
loopback addresses (no namespaces: the same code the lab's pods run, in this process): cache's
UDP echo and api's exchanges with it, on connected and unconnected sockets, several datagrams of
mixed sizes each way, and a datagram to a port where nobody listens. The client's truth and the
server's ledger agree exchange for exchange, byte for byte."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from eastwest.lab import app as labapp
from eastwest.lab.plan import UDP_DEAD_PORT

API, CACHE, DB = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def free_udp_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def pod(name: str, service: str, ip: str, port: int, host: str = "h1") -> dict:
    return {"name": name, "service": service, "ip": ip, "ip4": ip, "host": host,
            "netns": f"ns-{name}", "comm": f"ew-{service}", "ports": [port]}


@pytest.fixture
def demo(tmp_path: Path):
    """api-1 and db-1 on h1, cache-1 on h2 (its UDP echo serving in a thread)."""
    for attempt in range(20):  # a port free a moment ago may be taken by then (a neighbour)
        cport = free_udp_port(CACHE)
        inv = {"pods": [pod("api-1", "api", API, 9090), pod("cache-1", "cache", CACHE, cport, "h2"),
                        pod("db-1", "db", DB, 5432)],
               "services": {"api": {"port": 9090, "protocol": "tcp", "namespace": "shop"},
                            "cache": {"port": cport, "protocol": "tcp", "namespace": "shop"},
                            "db": {"port": 5432, "protocol": "tcp", "namespace": "shop"}}}
        (tmp_path / "inventory.json").write_text(json.dumps(inv))
        try:
            socks = labapp.App(tmp_path, "cache-1")._serve_udp_echo(cport)
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == 19:
                raise
    yield labapp.App(tmp_path, "api-1", seed=7), inv, tmp_path
    for s in socks:
        with contextlib.suppress(OSError):  # ENOTCONN on a UDP socket, but its reader wakes
            s.shutdown(socket.SHUT_RDWR)
        s.close()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_ledger(path: Path, n: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while len(got := lines(path)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_exchanges_on_both_socket_kinds_agree_with_the_servers_ledger(demo) -> None:
    api, inv, state = demo
    cache = inv["pods"][1]
    outcomes = [api.udp_exchange(cache, cache["ports"][0]) for _ in range(23)]
    assert outcomes == ["ok"] * 23
    truth = lines(state / "truth" / "api-1.jsonl")
    ledger = {(x["client_port"]): x for x in wait_ledger(state / "ledger" / "cache-1.jsonl", 23)}
    assert len(truth) == len(ledger) == 23  # one ledger line per exchange, not per datagram
    kinds = Counter(t["udp_socket"] for t in truth)
    assert set(kinds) == {"connected", "unconnected"}, kinds
    sizes = Counter()
    for t in truth:
        assert (t["protocol"], t["server_ip"], t["server_port"]) == ("udp", CACHE, cache["ports"][0])
        assert 2 <= t["dgrams_c2s"] == t["dgrams_s2c"] <= 4 and t["outcome"] == "ok"
        assert t["server_comm"] == "ew-cache"  # the server pod's own port
        x = ledger[t["client_port"]]
        assert (x["bytes_in"], x["bytes_out"]) == (t["bytes_c2s"], t["bytes_s2c"]), t
        assert (x["client_ip"], x["server_ip"]) == (API, CACHE)
        sizes[t["bytes_c2s"] // t["dgrams_c2s"] > 400] += 1
    assert set(sizes) == {True, False}  # small and large datagrams both


def test_a_datagram_to_a_dead_port_of_a_pod_on_its_own_host_is_refused(demo) -> None:
    api, _, state = demo
    assert api.same_host_peer()["name"] == "db-1"  # api's host holds db-1, not cache-1
    assert api.udp_dead() == "refused"
    (t,) = lines(state / "truth" / "api-1.jsonl")
    assert (t["server_ip"], t["server_port"], t["outcome"]) == (DB, UDP_DEAD_PORT, "refused")
    assert (t["udp_socket"], t["dgrams_c2s"], t["dgrams_s2c"]) == ("connected", 1, 0)
    assert t["bytes_c2s"] == len(b"Q 0 0 1/1\n") and t["bytes_s2c"] == 0
    assert t["server_comm"] is None  # nobody there: no server process
    assert lines(state / "ledger" / "db-1.jsonl") == []


def test_the_echo_ledgers_an_exchange_after_its_last_datagram_and_a_lone_query_at_once(demo):
    _, inv, state = demo
    cache = inv["pods"][1]
    to = (CACHE, cache["ports"][0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind((API, 0))
        s.sendto(b"Q 5 0 1/2\n", to)
        assert s.recvfrom(100)[0] == b"a" * 5
        time.sleep(0.1)
        assert lines(state / "ledger" / "cache-1.jsonl") == []  # the exchange is not over
        s.sendto(b"Q 7 3 2/2\nxyz", to)
        assert s.recvfrom(100)[0] == b"a" * 7
        s.sendto(b"Q 2 0\n", to)  # the Services' one-datagram form
        assert s.recvfrom(100)[0] == b"aa"
        s.sendto(b"garbage", to)  # ignored, and the echo keeps answering
        s.sendto(b"Q 1 0\n", to)
        assert s.recvfrom(100)[0] == b"a"
    got = [(x["bytes_in"], x["bytes_out"]) for x in wait_ledger(state / "ledger" / "cache-1.jsonl", 3)]
    assert got == [(10 + 13, 12), (6, 2), (6, 1)]


def test_the_dead_port_is_due_with_the_first_request_then_at_most_every_two_seconds(demo,
                                                                                    monkeypatch):
    api, _, _ = demo
    now = [1000.0]
    monkeypatch.setattr(labapp.time, "monotonic", lambda: now[0])
    due = []
    for _ in range(9):  # a request every 0.5 s
        due.append(api._dead_due())
        now[0] += 0.5
    assert due == [True, False, False, False, True, False, False, False, True]
    assert labapp.UDP_DEAD_EVERY_S == 2.0


def test_with_services_each_datagram_names_the_client_and_what_it_dialled(demo) -> None:
    """A pod dialled directly in a Services lab: every datagram opens with the PROXY line, the
    truth says how it was dialled, and the ledger line carries the PROXY fields
    (`Lab.resolve_backends` matches them)."""
    api, inv, state = demo
    cache = inv["pods"][1]
    port = cache["ports"][0]
    dial = labapp.Dial(cache, port, CACHE, port, "pod", "cache")
    assert api.udp_exchange(cache, port, 4, dial) == "ok"
    (t,) = lines(state / "truth" / "api-1.jsonl")
    (x,) = wait_ledger(state / "ledger" / "cache-1.jsonl", 1)
    assert (t["via"], t["service"], t["dialled_ip"], t["dialled_port"]) == ("pod", "cache", CACHE, port)
    assert x["proxy"] == {"protocol": "udp", "client_ip": API, "client_port": t["client_port"],
                          "dialled_ip": CACHE, "dialled_port": port}
    assert (x["bytes_in"], x["bytes_out"]) == (t["bytes_c2s"], t["bytes_s2c"])
    hello = labapp.proxy_line("UDP4", API, t["client_port"], dial)
    assert t["bytes_c2s"] > t["dgrams_c2s"] * len(hello)  # every datagram carried it
