"""The lab's demo application: real TCP and UDP servers and clients that write ground truth.

Runs inside a pod's namespace: `python -m eastwest.lab.app serve --state DIR --pod NAME`, or
`... loadgen --state DIR --duration S`. Reads the lab inventory from DIR/inventory.json.

Call graph (each arrow a new connection per request, so connections are countable):
    loadgen -> frontend -> api -> db        (5% of requests also try db's dead port: refused)
                               -> cache     (70%)
                               -> auth      (50%; auth resets 20% of its connections)
                               -> resolver  (DNS over UDP on a connected socket, below)
                               -> cache     (UDP, 30%: several datagrams each way, below)
                               -> a pod on api's own host, UDP to a port where nobody listens
                                  (at most every 2 s: refused)
A loadgen connection carries 1-3 requests (keep-alive), so some connections live longer.

Ground truth, written by the application itself, one JSON line per connection:
- DIR/truth/<pod>.jsonl by the client side, after the connection ended: the 5-tuple, the bytes
  it wrote and read, the outcome (ok, refused, reset, timeout).
- DIR/ledger/<pod>.jsonl by the server side: the bytes it read and wrote per connection, so a
  test can prove the truth right from the other end.

IP families (the inventory's `ip_family`): servers listen on every address of their pod. A
load generator connection uses IPv4 in an `ipv4` lab, IPv6 in an `ipv6` lab and, in a `dual`
lab, IPv6 or IPv4 drawn from the load generator's seeded random numbers (DUAL_V6_SHARE); every
call made to serve a request uses the family that request came in on, so a request's whole call
tree is one family and the same seed gives the same families. Each truth line says which
(`family`: 4 or 6).

Services (`lab up --services`, the inventory's `cluster_services`): calls go to the service's
ClusterIP (the hosts' iptables DNAT picks the backend), 20% still to a pod's address, 10% of the
load generator's through the NodePort on h2 (DNAT + masquerade). Such a call opens with a PROXY
protocol v1 line, so the server's ledger knows who called and what was dialled; `Lab.traffic`
names the backend in the truth from it (docs/lab.md, "Kubernetes-style Services").

Mesh (`lab up --pattern mesh`, the inventory's `mesh`): the app does not know its calls go
through its pod's sidecar (eastwest/lab/sidecar.py); it only takes each TCP source port fresh
(FreshPorts: none twice within 120 s), so that NAT never moves a call to another port.

DNS (eastwest/lab/dns.py): the resolver pods are a real DNS server for the lab's names. api
resolves each service it calls (`<service>.<namespace>.svc.cluster.local`, A in IPv4, AAAA in IPv6)
through a resolver pod before it connects, and keeps the answer for its TTL, as a pod's stub
resolver and CoreDNS do; in 30% of its requests it also asks one name on purpose (a name that
does not exist, one answered late, one behind a CNAME). Every exchange is one truth line
(protocol udp, port 53) with a `dns` object: id, name, type, rcode, answers, cnames, ttl. Only
api resolves: the call graph keeps its edges (api -> resolver is the only one to port 53).

UDP (docs/lab.md, "UDP"): cache also answers UDP on its port. In 30% of its requests api makes
one UDP exchange with it: 2-4 datagrams of mixed sizes (a few bytes, a few hundred, up to 1,200),
each answered by one of a size the request asks, half on a connected socket (send/recv), half on
an unconnected one (sendto/recvfrom, the peer per datagram). At most every UDP_DEAD_EVERY_S
(with the first request, then with the first request after each such pause; a time, not a
share, so that every run has one and the kernel's ICMP rate limit, 1 error per second per
destination with a burst of 6, never turns one into a timeout) it sends one datagram, on a
connected socket, to UDP_DEAD_PORT of a pod of a service it calls anyway on its own host (the
kernel answers ICMP port unreachable, the socket says ECONNREFUSED: outcome `refused`); on its
own host so that the ICMP error does not cross the overlay, where a wire observer would report
it as an ICMP flow from that pod to api. Every UDP truth line says `udp_socket` (connected or
unconnected) and its datagrams each way (`dgrams_c2s`, `dgrams_s2c`); the server writes one
ledger line per exchange, after its last datagram.

Protocol: request = b"REQ <response-size> <pad-size>\\n" + pad bytes; response = response-size
bytes. The client closes after its last response.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import os
import random
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eastwest.lab import dns as labdns
from eastwest.lab.plan import DEAD_PORT, UDP_DEAD_PORT

AUTH_RESET_SHARE = 0.2
DB_DEAD_SHARE = 0.05
CONNECT_TIMEOUT = 3.0
# a TCP call's reads once connected: a server that accepted answers, but on a loaded machine it
# may take seconds; a read timeout would make the truth say "no server took part" (and 0 bytes
# read) of a call whose server did answer, which every observer saw (a false mismatch)
READ_TIMEOUT = 30.0
UDP_SHARE = 0.3  # api requests that also make a UDP exchange with cache
UDP_UNCONNECTED_SHARE = 0.5  # of those, on an unconnected socket (sendto/recvfrom)
UDP_DEAD_EVERY_S = 2.0  # api: a datagram to a port where nobody listens, at most this often
UDP_SIZES = ((0, 16), (100, 400), (800, 1200))  # datagram size classes (payload bytes)
UDP_REUSE_S = 120.0  # a UDP 5-tuple is not used twice within this (observers' idle timeouts)
TCP_REUSE_S = 120.0  # mesh: a TCP source port is not used twice within this (FreshPorts)
POD_DIAL_SHARE = 0.2  # with Services: calls that still dial a pod's address directly
NODEPORT_SHARE = 0.1  # with Services: load generator calls that go through the NodePort
DUAL_V6_SHARE = 0.5  # share of the load generator's connections over IPv6 in a `dual` lab
FAMILIES = {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def address(pod: dict[str, Any], family: int) -> str:
    """The pod's address of `family` (an inventory from before --ip-family has IPv4 only)."""
    addr = pod.get("ip6" if family == 6 else "ip4", pod["ip"] if family == 4 else None)
    if not addr:
        raise ValueError(f"pod {pod['name']} has no IPv{family} address")
    return str(addr)


def family_of(sock: socket.socket) -> int:
    return 6 if sock.family == socket.AF_INET6 else 4


def set_comm(name: str) -> None:
    """prctl(PR_SET_NAME): the process (and the threads it starts later) show as `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Ledger:
    """Appends JSON lines to a file, one write per line, from many threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)


class FreshPorts:
    """Sockets bound to an address and a port not handed out by this object within `reuse_s`
    (conntrack's longest TCP timeout after a close: TIME_WAIT, 120 s): an ephemeral port (the
    kernel's choice, `ports` None) or the next free one of `ports`, in turn.

    For a mesh (docs/lab.md, "mesh"): the kernel hands a port out again as soon as no socket
    holds it (at once after a reset, which leaves no TIME_WAIT), but the connection's conntrack
    entry lingers. Every connection REDIRECTed to the sidecar has the same reply source
    (127.0.0.1:15001), and a DNATed one to a pod may meet an entry of a ClusterIP call from the
    same port: a reused port clashes with the old entry and NAT quietly moves the new connection
    to another source port. And a connection that reuses a lingering entry's 5-tuple is not
    NATed at all (NAT is decided on a connection's first packet): an app's call on a 5-tuple
    its sidecar had just used would bypass the sidecar. So the app takes fresh ephemeral ports
    and the sidecar its own range (SIDECAR_PORTS, outside the kernel's ephemeral range)."""

    def __init__(self, reuse_s: float = TCP_REUSE_S, ports: range | None = None) -> None:
        self.reuse_s = reuse_s
        self.ports = ports
        self._next = 0
        self._used: dict[int, float] = {}
        self._lock = threading.Lock()

    def open(self, family: int, ip: str) -> socket.socket:
        """A TCP socket bound to `ip` and a port not used here within reuse_s (an ephemeral
        one: after 64 tries, ~28,000 ports make that unlikely, the last one)."""
        now = time.monotonic()
        with self._lock:
            if len(self._used) > 8192:
                self._used = {p: t for p, t in self._used.items() if now - t < self.reuse_s}
            if self.ports is not None:
                return self._from_range(family, ip, now, self.ports)
            held: list[socket.socket] = []  # kept open while trying, so the kernel offers others
            try:
                for attempt in range(64):
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.bind((ip, 0))
                    port = s.getsockname()[1]
                    if now - self._used.get(port, -self.reuse_s) >= self.reuse_s or attempt == 63:
                        self._used[port] = now
                        return s
                    held.append(s)
            finally:
                for h in held:
                    h.close()
        raise AssertionError("unreachable")

    def _from_range(self, family: int, ip: str, now: float, ports: range) -> socket.socket:
        for _ in range(len(ports)):
            port = ports[self._next % len(ports)]
            self._next += 1
            if now - self._used.get(port, -self.reuse_s) < self.reuse_s:
                continue
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.bind((ip, port))
            except OSError:  # still held (TIME_WAIT, say)
                s.close()
                continue
            self._used[port] = now
            return s
        raise OSError(errno.EADDRINUSE, f"no port of {ports.start}-{ports.stop - 1} is free")


class App:
    def __init__(self, state: Path, pod_name: str, seed: int | None = None) -> None:
        self.state = state
        self.inv = json.loads((state / "inventory.json").read_text())
        self.pod = next(p for p in self.inv["pods"] if p["name"] == pod_name)
        self.pods = {p["name"]: p for p in self.inv["pods"]}
        self.truth = Ledger(state / "truth" / f"{pod_name}.jsonl")
        self.ledger = Ledger(state / "ledger" / f"{pod_name}.jsonl")
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self._rr: dict[str, int] = {}
        self._udp_recent: dict[tuple[int, str, int], float] = {}  # 5-tuple -> when it was used
        self._udp_lock = threading.Lock()
        self._udp_open: dict[tuple[str, int, str, int], tuple[int, int]] = {}  # echo: so far
        self._udp_dead_at = float("-inf")  # when the last datagram to the dead port went
        self.families = FAMILIES[self.inv.get("ip_family", "ipv4")]
        self.cluster = {c["name"]: c for c in self.inv.get("cluster_services", [])}
        self.dns_cache = labdns.Cache()
        # mesh: no TCP source port twice within conntrack's timeouts (FreshPorts)
        self.tcp_ports = FreshPorts() if self.inv.get("mesh") else None

    # -- helpers ----------------------------------------------------------------------------
    def chance(self, p: float) -> bool:
        with self.rng_lock:
            return self.rng.random() < p

    def randint(self, a: int, b: int) -> int:
        with self.rng_lock:
            return self.rng.randint(a, b)

    def replica(self, service: str) -> dict[str, Any]:
        """Round-robin over the service's pods."""
        pods = [p for p in self.inv["pods"] if p["service"] == service]
        with self.rng_lock:
            i = self._rr.get(service, 0)
            self._rr[service] = i + 1
        return pods[i % len(pods)]

    def dial(self, service: str, nodeport_share: float = 0.0) -> Dial:
        """Where a call to `service` goes. Without Services: a pod, round-robin. With them
        (`lab up --services`): its ClusterIP (the kernel's DNAT picks the backend), a pod
        directly (POD_DIAL_SHARE), or, with `nodeport_share`, the NodePort on the middle host."""
        svc = self.cluster.get(service)
        if svc is None:
            return Dial(self.replica(service), int(self.inv["services"][service]["port"]))
        if svc["node_port"] and self.chance(nodeport_share):
            np = svc["node_port"]
            return Dial(None, svc["target_port"], np["ip"], np["port"], "nodeport", service)
        if self.chance(POD_DIAL_SHARE):
            pod = self.replica(service)
            return Dial(pod, svc["target_port"], address(pod, 4), svc["target_port"], "pod", service)
        return Dial(None, svc["target_port"], svc["cluster_ip"], svc["port"], "service", service)

    def _truth(self, server: dict[str, Any] | None, port: int, proto: str, family: int, cport: int,
               sent: int, recv: int, start: str, outcome: str, dial: Dial | None = None,
               dns: dict[str, Any] | None = None,
               udp: tuple[str, int, int] | None = None) -> None:
        line: dict[str, Any] = {
            "client_pod": self.pod["name"], "client_ip": address(self.pod, family),
            "client_port": cport, "family": family,
            "protocol": proto, "bytes_c2s": sent, "bytes_s2c": recv, "start": start,
            "end": now_iso(), "outcome": outcome,
            "client_comm": self.pod["comm"], "client_host": self.pod["host"],
            "client_netns": self.pod["netns"], "client_container": self.pod.get("container_id"),
            "client_cgroup": self.pod.get("cgroup"),
        }
        # the server: known to a client that dialled a pod; behind a ClusterIP or NodePort only
        # the server's ledger knows it (`Lab.traffic` fills it in with `server_fields`)
        line.update(server_fields(server, port, family))
        if dial is not None and dial.via:
            line.update({"service": dial.service, "via": dial.via, "dialled_ip": dial.ip,
                         "dialled_port": dial.port})
        if dns is not None:
            line["dns"] = dns
        if udp is not None:  # (connected | unconnected, datagrams sent, datagrams received)
            line.update({"udp_socket": udp[0], "dgrams_c2s": udp[1], "dgrams_s2c": udp[2]})
        self.truth.write(line)

    # -- client side ------------------------------------------------------------------------
    def call_tcp(self, server: dict[str, Any] | None, port: int, requests: list[tuple[int, int]],
                 family: int = 4, dial: Dial | None = None) -> str:
        """One connection over IPv`family` carrying `requests` [(response size, pad size)];
        writes its truth. With a Services `dial`, it goes to the dialled address and opens
        with a PROXY line naming the client and what it dialled."""
        start = now_iso()
        to = (dial.ip, dial.port) if dial and dial.via else (address(server or {}, family), port)
        if self.tcp_ports is not None:
            s = self.tcp_ports.open(AF[family], address(self.pod, family))
        else:
            s = socket.socket(AF[family], socket.SOCK_STREAM)
            s.bind((address(self.pod, family), 0))  # know our port even when the connect fails
        s.settimeout(CONNECT_TIMEOUT)
        cport = s.getsockname()[1]
        sent = recv = 0
        outcome = "ok"
        try:
            try:
                s.connect(to)
            except ConnectionRefusedError:
                outcome = "refused"
                return outcome
            except TimeoutError:
                outcome = "timeout"
                return outcome
            s.settimeout(READ_TIMEOUT)
            if dial and dial.via:
                hello = proxy_line("TCP4", address(self.pod, family), cport, dial)
                s.sendall(hello)
                sent += len(hello)
            for resp_size, pad in requests:
                msg = f"REQ {resp_size} {pad}\n".encode() + b"x" * pad
                s.sendall(msg)
                sent += len(msg)
                got = _recv_exact(s, resp_size)
                recv += got
                if got < resp_size:
                    outcome = "reset"
                    return outcome
            s.shutdown(socket.SHUT_WR)
            while True:  # the server closes after our EOF; read anything left (nothing, normally)
                chunk = s.recv(65536)
                if not chunk:
                    break
                recv += len(chunk)
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        except OSError as exc:  # a reset that landed between our calls: shutdown() says ENOTCONN,
            if exc.errno not in (errno.ENOTCONN, errno.EPIPE):  # a write EPIPE
                raise
            outcome = "reset"
        finally:
            s.close()
            self._truth(server, port, "tcp", family, cport, sent, recv, start, outcome, dial)
        return outcome

    def _fresh_udp_socket(self, server_ip: str, port: int, family: int = 4,
                          connect: bool = True) -> socket.socket:
        """A UDP socket (connected unless `connect` is false) on an ephemeral port this pod has
        not used towards this server for UDP_REUSE_S. The kernel may hand a just-freed port out again, and two exchanges on
        one 5-tuple within an observer's idle timeout are ONE flow to anybody on the wire: the
        ground truth would then count two where no observer can see more than one."""
        now = time.monotonic()
        with self._udp_lock:
            if len(self._udp_recent) > 4096:
                self._udp_recent = {k: t for k, t in self._udp_recent.items() if now - t < UDP_REUSE_S}
            for attempt in range(64):  # ~28,000 ephemeral ports: a fresh one comes quickly
                s = socket.socket(AF[family], socket.SOCK_DGRAM)
                s.bind((address(self.pod, family), 0))
                key = (s.getsockname()[1], server_ip, port)
                if now - self._udp_recent.get(key, -UDP_REUSE_S) >= UDP_REUSE_S or attempt == 63:
                    break
                s.close()
            self._udp_recent[key] = now
        if connect:
            s.connect((server_ip, port))
        return s

    def call_udp(self, server: dict[str, Any] | None, port: int, resp_size: int, pad: int,
                 family: int = 4, dial: Dial | None = None) -> str:
        start = now_iso()
        to = (dial.ip, dial.port) if dial and dial.via else (address(server or {}, family), port)
        s = self._fresh_udp_socket(to[0], to[1], family)
        s.settimeout(CONNECT_TIMEOUT)
        cport = s.getsockname()[1]
        msg = f"Q {resp_size} {pad}\n".encode() + b"q" * pad
        if dial and dial.via:
            msg = proxy_line("UDP4", address(self.pod, family), cport, dial) + msg
        outcome, answer = "ok", b""
        try:
            outcome, answer = _exchange(s, msg)
        finally:
            s.close()
            self._truth(server, port, "udp", family, cport, len(msg), len(answer), start,
                        outcome, dial, udp=("connected", 1, int(outcome == "ok")))
        return outcome

    def udp_exchange(self, server: dict[str, Any], port: int, family: int = 4,
                     dial: Dial | None = None) -> str:
        """One UDP exchange with `server`: 2-4 datagrams of mixed sizes, each answered, on a
        connected socket (send/recv) or an unconnected one (sendto/recvfrom); writes its truth.
        With a Services `dial` (a pod dialled directly), each datagram opens with a PROXY line."""
        start = now_iso()
        connected = not self.chance(UDP_UNCONNECTED_SHARE)
        to = (address(server, family), port)
        s = self._fresh_udp_socket(to[0], to[1], family, connect=connected)
        s.settimeout(CONNECT_TIMEOUT)
        cport = s.getsockname()[1]
        hello = proxy_line("UDP4", address(self.pod, family), cport, dial) if dial and dial.via \
            else b""
        n = self.randint(2, 4)
        plan = []
        for i in range(n):
            lo, hi = UDP_SIZES[self.randint(0, len(UDP_SIZES) - 1)]
            pad, resp = self.randint(lo, hi), self.randint(1, 1200)
            plan.append(hello + f"Q {resp} {pad} {i + 1}/{n}\n".encode() + b"u" * pad)
        sent = recv = got = 0
        outcome = "ok"
        try:
            for msg in plan:
                if connected:
                    s.send(msg)
                    answer = s.recv(65536)
                else:
                    s.sendto(msg, to)
                    answer, _ = s.recvfrom(65536)
                sent += len(msg)
                recv += len(answer)
                got += 1
        except (TimeoutError, ConnectionRefusedError) as exc:  # sent, never answered
            outcome = "timeout" if isinstance(exc, TimeoutError) else "refused"
            sent += len(plan[got])
        finally:
            s.close()
            self._truth(server, port, "udp", family, cport, sent, recv, start, outcome, dial,
                        udp=("connected" if connected else "unconnected",
                             got + (outcome != "ok"), got))
        return outcome

    def udp_dead(self, family: int = 4) -> str:
        """One datagram on a connected socket to UDP_DEAD_PORT of a pod on this pod's host
        (where nobody listens): the kernel's ICMP port unreachable makes the socket's receive
        fail with ECONNREFUSED. Writes its truth (outcome `refused`)."""
        start = now_iso()
        server = self.same_host_peer()
        s = self._fresh_udp_socket(address(server, family), UDP_DEAD_PORT, family)
        s.settimeout(CONNECT_TIMEOUT)
        cport = s.getsockname()[1]
        msg = b"Q 0 0 1/1\n"
        try:
            outcome, answer = _exchange(s, msg)
        finally:
            s.close()
        self._truth(server, UDP_DEAD_PORT, "udp", family, cport, len(msg), len(answer), start,
                    outcome, udp=("connected", 1, int(bool(answer))))
        return outcome

    def _dead_due(self) -> bool:
        """Whether this request sends the datagram to the dead port (UDP_DEAD_EVERY_S)."""
        now = time.monotonic()
        with self._udp_lock:
            if now - self._udp_dead_at < UDP_DEAD_EVERY_S:
                return False
            self._udp_dead_at = now
            return True

    def same_host_peer(self) -> dict[str, Any]:
        """A pod of a service this pod calls anyway, on this pod's host (the first by name), so
        that traffic to it never crosses the overlay; else a db pod."""
        calls = ("db", "cache", "auth", "resolver")
        near = sorted((p for p in self.inv["pods"] if p["host"] == self.pod["host"]
                       and p["service"] in calls),
                      key=lambda p: p["name"])
        return near[0] if near else self.replica("db")

    def dns_lookup(self, name: str, family: int = 4) -> labdns.Lookup:
        """One DNS query to a resolver pod over a connected UDP socket; writes its truth."""
        server = self.replica("resolver")
        port = self.inv["services"]["resolver"]["port"]
        start = now_iso()
        s = self._fresh_udp_socket(address(server, family), port, family)
        s.settimeout(CONNECT_TIMEOUT)
        cport = s.getsockname()[1]
        query = labdns.make_query(name, family)
        wire = query.to_wire()
        try:
            outcome, response = _exchange(s, wire)
        finally:
            s.close()
        lookup = labdns.read_response(query, wire, response)
        self._truth(server, port, "udp", family, cport, len(wire), len(response), start, outcome,
                    dns=lookup.truth(), udp=("connected", 1, int(bool(response))))
        return lookup

    def resolve(self, service: str, family: int = 4) -> dict[str, Any]:
        """The replica of `service` to call next, at an address its name resolved to (cached for
        the answer's TTL). An unanswered query falls back to the inventory's address, so the call
        graph stays what the docs say even if a datagram is lost."""
        pod = self.replica(service)
        name = labdns.service_name(service, self.inv["services"][service]["namespace"])
        now = time.monotonic()
        addrs = self.dns_cache.get(name, family, now)
        if addrs is None:
            lookup = self.dns_lookup(name, family)
            self.dns_cache.put(name, family, now, lookup)
            addrs = lookup.answers or (address(pod, family),)
        if ipaddress.ip_address(address(pod, family)) not in {ipaddress.ip_address(a) for a in addrs}:
            raise RuntimeError(f"{name} resolved to {addrs}, without {pod['name']}")
        return pod

    # -- server side ------------------------------------------------------------------------
    def upstream_calls(self, family: int = 4) -> None:
        """What one request to this pod's service calls next (the call graph), over the family
        the request came in on."""
        svc = self.pod["service"]
        if svc == "frontend":
            d = self.dial("api")
            self.call_tcp(d.pod, d.target_port, [(self.randint(200, 6000), self.randint(50, 800))],
                          family, d)
        elif svc == "api":
            if self.cluster:  # Services: dial ClusterIPs (the kernel picks the backend)
                d = self.dial("db")
                self.call_tcp(d.pod, d.target_port, [(self.randint(100, 20000), self.randint(20, 400))],
                              family, d)
                if self.chance(DB_DEAD_SHARE):  # a pod's closed port, dialled directly
                    self.call_tcp(d.pod or self.replica("db"), DEAD_PORT, [(100, 10)], family)
                if self.chance(0.7):
                    d = self.dial("cache")
                    self.call_tcp(d.pod, d.target_port, [(self.randint(10, 3000), self.randint(10, 100))],
                                  family, d)
                if self.chance(0.5):
                    d = self.dial("auth")
                    self.call_tcp(d.pod, d.target_port, [(self.randint(50, 500), self.randint(100, 300))],
                                  family, d)
                if self.chance(0.3):
                    d = self.dial("resolver")
                    self.call_udp(d.pod, d.target_port, self.randint(40, 400), self.randint(20, 60),
                                  family, d)
            else:  # pods found by name through the lab's DNS, as a pod's resolver does
                services = self.inv["services"]
                db = self.resolve("db", family)
                self.call_tcp(db, services["db"]["port"],
                              [(self.randint(100, 20000), self.randint(20, 400))], family)
                if self.chance(DB_DEAD_SHARE):
                    self.call_tcp(db, DEAD_PORT, [(100, 10)], family)
                if self.chance(0.7):
                    self.call_tcp(self.resolve("cache", family), services["cache"]["port"],
                                  [(self.randint(10, 3000), self.randint(10, 100))], family)
                if self.chance(0.5):
                    self.call_tcp(self.resolve("auth", family), services["auth"]["port"],
                                  [(self.randint(50, 500), self.randint(100, 300))], family)
                if self.chance(0.3):
                    with self.rng_lock:
                        name = self.rng.choice(labdns.PURPOSE_NAMES)
                    self.dns_lookup(name, family)
            # UDP with a pod of cache, dialled directly (also with Services: the ClusterIPs are TCP)
            if self.chance(UDP_SHARE):
                port = int(self.inv["services"]["cache"]["port"])
                if self.cluster:  # a pod dialled directly, with a PROXY line like every call
                    cache = self.replica("cache")
                    self.udp_exchange(cache, port, family, Dial(cache, port, address(cache, family),
                                                                port, "pod", "cache"))
                else:
                    self.udp_exchange(self.resolve("cache", family), port, family)
            if self._dead_due():
                self.udp_dead(family)

    def serve(self) -> None:
        svc = self.pod["service"]
        port = self.inv["services"][svc]["port"]
        set_comm(self.pod["comm"])
        if self.inv["services"][svc]["protocol"] == "udp":
            self._serve_udp(port)
        else:
            if svc == "cache":  # and UDP on the same port (the demo's UDP exchanges)
                self._serve_udp_echo(port)
            self._serve_tcp(port)

    def _ready(self) -> None:
        (self.state / "ready").mkdir(exist_ok=True)
        (self.state / "ready" / self.pod["name"]).write_text(str(os.getpid()))

    def _serve_tcp(self, port: int) -> None:
        """One listening socket per address of the pod (IPv4, IPv6 or both)."""
        app = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                app.handle_tcp(self.request, self.client_address)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            request_queue_size = 256

        class Server6(Server):
            address_family = socket.AF_INET6

        servers = [(Server6 if fam == 6 else Server)((address(self.pod, fam), port), Handler)
                   for fam in self.families]
        self._ready()
        for srv in servers[1:]:
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                             daemon=True).start()
        servers[0].serve_forever(poll_interval=0.2)

    def handle_tcp(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.settimeout(30)
        family, local_ip = family_of(conn), conn.getsockname()[0]
        rfile = conn.makefile("rb", buffering=0)
        bytes_in = bytes_out = 0
        reset = False
        proxy: dict[str, Any] | None = None
        try:
            while True:
                line = _readline(rfile)
                if not line:
                    break
                bytes_in += len(line)
                if proxy is None and line.startswith(b"PROXY "):
                    proxy = parse_proxy(line)
                    continue
                _, size_s, pad_s = line.split()
                pad = _read_exact(rfile, int(pad_s))
                bytes_in += pad
                if self.pod["service"] == "auth" and self.chance(AUTH_RESET_SHARE):
                    # abortive close: SO_LINGER {on, 0 s} sends RST instead of FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    reset = True
                    break
                self.upstream_calls(family)
                conn.sendall(b"r" * int(size_s))
                bytes_out += int(size_s)
        except (ConnectionError, TimeoutError, ValueError, OSError):
            pass
        finally:
            rfile.close()
            conn.close()
            self.ledger.write({"pod": self.pod["name"], "protocol": "tcp", "client_ip": peer[0],
                               "client_port": peer[1], "server_ip": local_ip,
                               "server_port": conn_port(self), "bytes_in": bytes_in,
                               "bytes_out": bytes_out, "reset": reset, "end": now_iso(),
                               **({"proxy": proxy} if proxy else {})})

    def _serve_udp(self, port: int) -> None:
        """One socket per address of the pod, each answered by a thread of its own."""
        socks = []
        for fam in self.families:
            s = socket.socket(AF[fam], socket.SOCK_DGRAM)
            s.bind((address(self.pod, fam), port))
            socks.append(s)
        self._ready()
        for s in socks[1:]:
            threading.Thread(target=self._answer_udp, args=(s, port), daemon=True).start()
        self._answer_udp(socks[0], port)

    def _serve_udp_echo(self, port: int) -> list[socket.socket]:
        """UDP echo sockets (one per address of the pod), each answered by a thread until it
        is closed; returns them."""
        socks = []
        for fam in self.families:
            s = socket.socket(AF[fam], socket.SOCK_DGRAM)
            s.bind((address(self.pod, fam), port))
            socks.append(s)
            threading.Thread(target=self._answer_echo, args=(s, s.getsockname()[0], port),
                             daemon=True).start()
        return socks

    def _answer_echo(self, s: socket.socket, local_ip: str, port: int) -> None:
        while True:
            try:
                data, peer = _recv_when_ready(s)
            except (OSError, ValueError):  # closed
                return
            if peer is None:  # shut down
                return
            self._echo_udp(s, data, peer, local_ip, port)

    def _answer_udp(self, s: socket.socket, port: int) -> None:
        """The resolver's DNS server: answers from the lab's zone; a late answer is sent from a
        timer, so it holds up no other query."""
        local_ip = s.getsockname()[0]
        zone = labdns.Zone(self.inv)
        while True:
            data, peer = _recv_when_ready(s)
            if data.startswith((b"PROXY ", b"Q ")):  # the demo's own UDP calls (Services)
                self._echo_udp(s, data, peer, local_ip, port)
                continue
            answer = zone.answer(data)
            if answer is None:
                continue
            response, delay = answer
            if delay:
                threading.Timer(delay, self._send_udp,
                                (s, response, peer, local_ip, port, len(data))).start()
            else:
                self._send_udp(s, response, peer, local_ip, port, len(data))

    def _echo_udp(self, s: socket.socket, data: bytes, peer: tuple[str, int], local_ip: str,
                  port: int) -> None:
        """`Q <size> <pad> [<i>/<n>]` (after a PROXY line when dialled through a Service):
        `size` bytes back, and after the exchange's last datagram (`i` = `n`, 1/1 without)
        one ledger line with its totals, naming who called through what."""
        proxy = None
        try:
            query = data
            if data.startswith(b"PROXY "):
                hello, query = data.split(b"\n", 1)
                proxy = parse_proxy(hello)
            words = query.split(b"\n", 1)[0].split()
            size = int(words[1])
            i, n = (int(x) for x in words[3].split(b"/")) if len(words) > 3 else (1, 1)
        except (IndexError, ValueError):
            return
        s.sendto(b"a" * size, peer)
        key = (local_ip, port, peer[0], peer[1])
        with self._udp_lock:  # the exchange so far (its datagrams come one after the other)
            was = (0, 0) if i == 1 else self._udp_open.pop(key, (0, 0))
            total = (was[0] + len(data), was[1] + size)
            if i < n:
                self._udp_open[key] = total
            else:
                self._udp_open.pop(key, None)
        if i < n:
            return
        self.ledger.write({"pod": self.pod["name"], "protocol": "udp", "client_ip": peer[0],
                           "client_port": peer[1], "server_ip": local_ip,
                           "server_port": port, "bytes_in": total[0], "bytes_out": total[1],
                           "reset": False, "end": now_iso(),
                           **({"proxy": proxy} if proxy else {})})

    def _send_udp(self, s: socket.socket, data: bytes, peer: tuple[str, int], local_ip: str,
                  port: int, got: int) -> None:
        s.sendto(data, peer)
        self.ledger.write({"pod": self.pod["name"], "protocol": "udp", "client_ip": peer[0],
                           "client_port": peer[1], "server_ip": local_ip,
                           "server_port": port, "bytes_in": got, "bytes_out": len(data),
                           "reset": False, "end": now_iso()})

    # -- load generator ---------------------------------------------------------------------
    def loadgen(self, duration: float, rate: float, workers: int) -> int:
        set_comm(self.pod["comm"])
        deadline = time.monotonic() + duration
        count = [0]
        lock = threading.Lock()

        def worker(i: int) -> None:
            rng = random.Random(self.rng.random() + i)
            period = workers / rate
            next_t = time.monotonic() + rng.random() * period
            while True:
                now = time.monotonic()
                if next_t >= deadline:
                    return
                if next_t > now:
                    time.sleep(next_t - now)
                reqs = [(rng.randint(500, 30000), rng.randint(40, 500))
                        for _ in range(rng.choice((1, 1, 2, 3)))]
                # one draw more only in a dual lab: an ipv4 lab's seeded runs stay as they were
                family = (self.families[0] if len(self.families) == 1
                          else 6 if rng.random() < DUAL_V6_SHARE else 4)
                d = self.dial("frontend", NODEPORT_SHARE)
                self.call_tcp(d.pod, d.target_port, reqs, family, d)
                with lock:
                    count[0] += 1
                next_t += period * (0.5 + rng.random())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return count[0]


@dataclass(frozen=True)
class Dial:
    """A call's destination: the pod (None behind a Service: the kernel picks it) and its
    port, and with Services what the client dialled and how (`via`: service, pod, nodeport)."""

    pod: dict[str, Any] | None
    target_port: int
    ip: str = ""
    port: int = 0
    via: str = ""  # "" = a lab without Services: the truth lines stay as they always were
    service: str = ""


def proxy_line(proto: str, client_ip: str, client_port: int, dial: Dial) -> bytes:
    """HAProxy's PROXY protocol v1 line (TCP4; UDP4 is our extension of it): who the client is
    and what it dialled, so the server's ledger can say so behind DNAT and SNAT."""
    return f"PROXY {proto} {client_ip} {dial.ip} {client_port} {dial.port}\r\n".encode()


def parse_proxy(line: bytes) -> dict[str, Any]:
    _, proto, src, dst, sport, dport = line.decode().split()
    return {"protocol": proto[:3].lower(), "client_ip": src, "client_port": int(sport),
            "dialled_ip": dst, "dialled_port": int(dport)}


def server_fields(server: dict[str, Any] | None, port: int, family: int = 4) -> dict[str, Any]:
    """The truth's `server_*` fields of pod `server` serving on `port` (None: not known yet)."""
    if server is None:
        return {"server_pod": None, "server_ip": None, "server_port": port, "server_comm": None,
                "server_host": None, "server_netns": None, "server_container": None,
                "server_cgroup": None}
    mine = port in server["ports"]
    return {"server_pod": server["name"], "server_ip": address(server, family), "server_port": port,
            "server_comm": server["comm"] if mine else None, "server_host": server["host"],
            "server_netns": server["netns"],
            "server_container": server.get("container_id") if mine else None,
            "server_cgroup": server.get("cgroup") if mine else None}


def conn_port(app: App) -> int:
    return int(app.inv["services"][app.pod["service"]]["port"])


def _readline(rfile: Any) -> bytes:
    buf = bytearray()
    while True:
        c = rfile.read(1)
        if not c:
            return bytes(buf)
        buf += c
        if c == b"\n":
            return bytes(buf)


def _read_exact(rfile: Any, n: int) -> int:
    got = 0
    while got < n:
        chunk = rfile.read(n - got)
        if not chunk:
            break
        got += len(chunk)
    return got


def _recv_when_ready(s: socket.socket) -> tuple[bytes, Any]:
    """A server's next datagram, received once it is there: the thread waits in select(), not
    in recvfrom(), so a collector attached while it waits sees the receive call begin and
    names every datagram's sender (docs/collector.md, "UDP": a call already in progress when
    the probes attach names no sender, counted as `udp_no_peer`, and marks that interval's UDP
    records `lost_events`)."""
    select.select([s], [], [])
    return s.recvfrom(65536)


def _exchange(s: socket.socket, datagram: bytes) -> tuple[str, bytes]:
    """One datagram out on a connected UDP socket and its answer: (outcome, answer bytes)."""
    try:
        s.send(datagram)
        return "ok", s.recv(65536)
    except ConnectionRefusedError:
        return "refused", b""
    except TimeoutError:
        return "timeout", b""


def _recv_exact(s: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        chunk = s.recv(min(65536, n - got))
        if not chunk:
            break
        got += len(chunk)
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eastwest.lab.app")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--state", required=True, type=Path)
    s.add_argument("--pod", required=True)
    g = sub.add_parser("loadgen")
    g.add_argument("--state", required=True, type=Path)
    g.add_argument("--pod", default="loadgen-1")
    g.add_argument("--duration", type=float, required=True)
    g.add_argument("--rate", type=float, default=20.0, help="connections per second to frontend")
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = App(args.state, args.pod, seed=getattr(args, "seed", None))
    if args.cmd == "serve":
        app.serve()
        return 0
    n = app.loadgen(args.duration, args.rate, args.workers)
    print(json.dumps({"connections": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
