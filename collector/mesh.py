"""Mesh folding: the sockets of one service-mesh call become one record of the application's call
(issue 20, "Mesh folding"; the record contract is docs/flow-record.md, "mesh").

Stage: between the sources and the sink, under the sink's lock, AFTER NAT folding
(collector/natfold.py: it turns the app's redirected connection into `server` = the sidecar's port
with `nat` = [redirect dialled -> 127.0.0.1:15001], and gives the sidecars' sockets their real
ends) and before everything else (collector/main.py wires it). In: every record of the collector.
Out: the same records, except the TCP socket records of a mesh call, which are folded.

The sockets of one call, on each host (A the client pod, B the server pod, Istio-style REDIRECTs):

    client host  r1 app's client socket     A:cport -> 127.0.0.1:15001  nat [redirect D -> :15001]
                 r2 proxy's accepted socket A:cport -> 127.0.0.1:15001  (process: the proxy)
                 r3 proxy's upstream socket A:pport -> B:tport          nat [dnat D -> B:tport]
    server host  r4 proxy's accepted socket A:pport -> B:15006          nat [dnat B:tport -> :15006]
                 r5 proxy's handoff socket  127.0.0.6:x -> B:tport      (loopback)
                 r6 app's server socket     127.0.0.6:x -> B:tport      (loopback, process: app)

(D: what the app dialled, a ClusterIP or B:tport; a REDIRECT in PREROUTING is a `dnat` to the
pod's own address, in OUTPUT a `redirect` to 127.0.0.1.)

Recognising them (collector/mesh_proxies.py `Proxy`: a process name, its outbound and inbound
ports, the source address it hands inbound calls to the app from; `--mesh-proxy` adds some): a
socket of a proxy process (its `comm`, or the base name of its command line's first word:
Envoy's worker threads are `wrk:worker_0`) is r2 when it is a server socket on an outbound
port, r4 on an inbound port, r5 when it is a client socket on loopback (the app is in the
proxy's own pod), r3 when it is any other client socket. An app's
client record is r1 when its last translation is a redirect to a proxy's outbound port on a
loopback address (the REDIRECT conntrack entry: without NAT folding there is no r1, so
`--no-nat` leaves mesh calls unfolded). An app's loopback server record is r6 when its client is
a handoff address: 127.0.0.6 (ew-sidecar, Istio), 127.0.0.1 (Consul's Envoy hands calls to
`local_app` at 127.0.0.1), or its own address (linkerd2-proxy connects to the original
destination). Only 127.0.0.6 (::6 for IPv6) marks a mesh call by itself; a loopback server
record from 127.0.0.1 or from its own address might be any local call, so it is taken for a
handoff only in a namespace where a proxy's socket was seen in the last 10 minutes (a batch's
proxy sockets count before any of its records is looked at), and then waits the hold time for
its proxy socket and goes out as it came (not marked). Local calls in namespaces without a proxy
are never delayed; in a Consul or Linkerd pod, such a call waits up to `--mesh-hold`, and the
very first mesh call of a pod whose app socket arrives in a batch before any of its proxy's
sockets is not folded (its proxy sockets go out marked `incomplete: mesh`).

Joining (one collector, one host): r1 and r2 have the same key (netns, client, server), r5 and
r6 too. The proxy's two sockets are paired by the namespace, the proxy's pid and the
destination: r3's dialled address (the first DNAT or REDIRECT `original` of its `nat`, else its
server) equals r1's dialled address; r5's server port equals the port r4's client dialled (the
`original` of r4's trailing inbound redirect; r5's address is that one or a loopback address).
Pairing is one to one, at the end of each batch (the records of one batch pair together, in
whatever order they came): each accept (r2, r4), in order of their start, takes the unpaired
connect (r3, r5) of the same namespace, pid and destination whose start is the nearest at or
after it (and within the hold time). At its hold deadline, a call still missing its partner
takes the unpaired one nearest in start, before or after: of its pool, or for r2 and r3 of any
destination of the same proxy (namespace and pid). That folds two cases:

- Envoy load-balances a ClusterIP call itself and connects to the endpoint it chose, so its
  upstream socket does not go where the app dialled. Such calls fold at the hold deadline, and
  their `nat` has no DNAT (there was none: the ClusterIP the app dialled is known to no record).
- Concurrent calls of one pod to one destination whose records come in different batches may
  pair crosswise (call 2's connect is there before call 1's and call 1's accept takes it; call
  2 then takes call 1's at its deadline). The two folded records swap their proxy-to-proxy hops
  (key and framing bytes); the number of connections, their ends as workloads, the edge and
  every app's counters and outcome stay right (they are the app's sockets, joined exactly by
  key), but the aggregator may join call 1's client app with call 2's server app, so a
  connection's byte pair can mix two calls of the same edge, and call 2's folded record comes
  up to the hold time late.

The folded record: on the client's host ONE client record: `client` = r3's client (the proxy's
address and port: what the network, the server's host and the wire see), `server` = r3's server
with a trailing redirect to an inbound proxy port stripped (NAT folding chains on to it when
the server pod is on this host and its conntrack is read), `nat` = r3's without that redirect,
and everything else (process, netns, cgroup, container, workloads, counters, outcome, start,
end, final) the app's (r1); `mesh` = {proxy, hops: [app-proxy (r1's ends and bytes, the proxy's
name and pid from r2), proxy-proxy (r3's ends, bytes: with the proxies' framing)]}. On the
server's host ONE server record: `client` = r4's client, `server` = the port the client
dialled (r4's redirect `original`), `nat` = r4's without its inbound redirect, everything else the
app's (r6); hops [proxy-proxy (r4's own ends and bytes), proxy-app (r5's ends and bytes)]. The
proxy records (r2..r5) are not sent once folded. One server side has no r6: the sidecar's
handoff (r5) was refused or timed out (nobody listens on the port the client dialled), so no app
socket will ever come; r4 and r5 are then the whole server side, folded into one server record
of the network's key with the sidecar's process, its own connect and resets, and no bytes (no
server app received any: the client's bytes reached its own sidecar only, so the aggregator
flags the connection's byte mismatch, as it should). The app on the client side saw its connect
accepted by its own sidecar, then a reset.

Holding and releasing: records of a call are held until its three sockets are there. Then every
batch that brings a new record of a member sends the folded record again (the app's cumulative
counters, a new record id). The folded record is final when the app's record is final and the
proxy sockets' finals are in (or the hold time after the app's final: a proxy that keeps its
upstream open, see below); proxy records arriving after that are absorbed (counted in `late`,
not sent: the connection they served has ended). A call whose sockets do not all show up
within the hold time (`--mesh-hold`, default the probes' interval + 2 s: a connection still
connecting at one interval's drain is first reported at the next) is released: every held
record goes out as it came, marked `incomplete: ["mesh"]` and counted in the drops
(stage `mesh`, reason `unpaired`, one per socket), and its later records too. Memory is bounded
(`max_calls`; beyond, records go out unfolded, marked, counted as `full`). Held records are
released by the next write after their deadline and by a ticker every 0.5 s; `close()` releases
everything.

What it cannot fold: a proxy that multiplexes many app connections onto fewer upstream ones
(HTTP/1.1 keep-alive pools and HTTP/2 in Envoy and linkerd2-proxy, Istio's HBONE): there is no
one-to-one socket pairing to find, the upstream socket's bytes belong to many calls. Such an
app socket pairs with at most one upstream socket: the nearest new one of the proxy (which may
serve another call: the folded record's key and proxy-proxy hop are then that socket's, the
app's counters still the app's), or none (an upstream reused from the pool started before it,
beyond the hold time): it is then released unfolded, marked `incomplete: mesh`, and the pooled
upstream sockets likewise. Also: UDP (sidecars proxy TCP), proxies not
recognised by name and port, a proxy in another namespace than its app (a node-level proxy,
ambient mesh's ztunnel), and calls whose app socket has no REDIRECT entry (NAT folding off or
the pod's conntrack unreadable).
"""

from __future__ import annotations

import bisect
import ipaddress
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from collector.mesh_proxies import DISTINCT_HANDOFF, IPV6_HANDOFF, SELF, MeshSettings
from collector.pipeline import Sink
from eastwest.drops import Drops
from eastwest.record import Endpoint, FlowRecord, Mesh, MeshHop, Nat, dialled_of

INCOMPLETE = "mesh"
STAGE = "mesh"
MAX_CALLS = 65536
IDLE_S = 300.0  # a released call whose sockets never report a final is forgotten after this
TICK_S = 0.5


# -- the fold ----------------------------------------------------------------------------------
Role = Literal["app_out", "near_out", "far_out", "far_in", "near_in", "app_in"]
Side = Literal["out", "in"]
WAIT, FOLDED, ALONE, DONE = "wait", "folded", "alone", "done"
FAILED_CONNECTS = ("refused", "timeout")
PROXY_NETNS_S = 600.0  # a namespace counts as a proxy's for this long after its last socket
MAX_PROXY_NETNS = 65536

SockKey = tuple  # (observer, netns, client ip, port, server ip, port, start)
PairKey = tuple  # (netns, client ip, port, server ip, port): r1 = r2, r5 = r6
PoolKey = tuple  # ("out", netns, pid, dialled ip, port) | ("in", netns, pid, port)


@dataclass(eq=False)
class _Call:
    side: Side
    deadline: datetime
    app: FlowRecord | None = None
    near: FlowRecord | None = None  # the proxy's socket on the app's side: r2 / r5
    far: FlowRecord | None = None  # the proxy's socket on the network's side: r3 / r4
    proxy: str | None = None
    state: str = WAIT
    speculative: bool = False  # only an r6 whose client might be any local call
    dirty: bool = False  # a member's record came in this batch
    final_at: datetime | None = None  # when the app's final came (waiting for the proxies')
    socks: set[SockKey] = field(default_factory=set)
    pair: PairKey | None = None
    pool: PoolKey | None = None
    target: Endpoint | None = None  # in: the address the client dialled (r4's redirect original)

    def members(self) -> list[FlowRecord]:
        return [r for r in (self.app, self.near, self.far) if r is not None]

    def complete(self) -> bool:
        return ((self.app is not None and self.near is not None and self.far is not None)
                or self.handoff_failed())

    def handoff_failed(self) -> bool:
        """A server side whose sidecar could not hand the call to the app (nobody listens on
        the port the client dialled: its connect was refused or timed out): no app socket
        will ever come, the sidecar's two sockets are the whole server side."""
        return (self.side == "in" and self.app is None and self.near is not None
                and self.far is not None and self.near.connect in FAILED_CONNECTS)


def _set_slot(c: _Call, role: Role, r: FlowRecord) -> None:
    """`r` in the slot of `c` its role names (the reverse of `MeshFolder._slot`)."""
    if role.startswith("app"):
        c.app = r
    elif role.startswith("near"):
        c.near = r
    else:
        c.far = r


def _loopback_ip(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def _sock(r: FlowRecord) -> SockKey:
    return (r.observer, r.netns, r.client.ip, r.client.port, r.server.ip, r.server.port, r.start)


def _pair(r: FlowRecord) -> PairKey:
    return (r.netns, r.client.ip, r.client.port, r.server.ip, r.server.port)


def _pid(r: FlowRecord) -> int | None:
    return r.process.pid if r.process is not None else None


class MeshFolder:
    """The fold of the module doc. `add(records, now)` -> the records to send now; `flush()` ->
    whatever is still held (the end)."""

    def __init__(self, settings: MeshSettings, next_id: Callable[[], str], drops: Drops, *,
                 max_calls: int = MAX_CALLS) -> None:
        self.settings = settings
        self.next_id, self.drops = next_id, drops
        self.hold = timedelta(seconds=settings.hold_s)
        self.idle = timedelta(seconds=max(IDLE_S, settings.hold_s))
        self.max_calls = max_calls
        self.names = frozenset(p.name for p in settings.proxies)
        self.outbound: dict[str, frozenset[int]] = {}
        self.inbound: dict[str, frozenset[int]] = {}
        for p in settings.proxies:
            self.outbound[p.name] = self.outbound.get(p.name, frozenset()) | {p.outbound}
            self.inbound[p.name] = self.inbound.get(p.name, frozenset()) | {p.inbound}
        self.all_outbound = frozenset(p.outbound for p in settings.proxies)
        self.all_inbound = frozenset(p.inbound for p in settings.proxies)
        handoffs = {p.handoff for p in settings.proxies}
        self.handoff_self = SELF in handoffs
        ips = {h for h in handoffs if h != SELF}
        self.handoff_ips = frozenset(ips | {IPV6_HANDOFF[h] for h in ips if h in IPV6_HANDOFF})
        self.distinct = frozenset({DISTINCT_HANDOFF, IPV6_HANDOFF[DISTINCT_HANDOFF]})
        # every call held, in insertion order (releases are deterministic); a dict: O(1) removal
        self.calls: dict[_Call, None] = {}
        self.by_sock: dict[SockKey, _Call] = {}
        self.by_pair: dict[PairKey, _Call] = {}
        self.pools: dict[PoolKey, list[_Call]] = {}
        # at a deadline, the partner may be in any pool of the same proxy (Envoy connects to the
        # endpoint it chose, not to the ClusterIP the app dialled): out pools by (netns, pid)
        self.loose: dict[tuple, dict[_Call, None]] = {}
        self.folded = 0  # calls folded
        self.released = 0  # calls released unfolded
        self.late = 0  # proxy records absorbed after their call's final went out
        self._touched: list[_Call] = []  # calls a member's record came to, this batch
        self._pools_touched: dict[PoolKey, None] = {}  # pools to pair at the batch's end
        self._cmd_names: dict[str, str | None] = {}  # command line -> proxy name
        # namespaces where a proxy's socket was seen (netns -> when, last): only there may a
        # loopback server record from 127.0.0.1 or its own address be a handoff (r6) and wait
        self.proxy_netns: OrderedDict[int | None, datetime] = OrderedDict()

    # -- recognising ---------------------------------------------------------------------------
    def proxy_of(self, r: FlowRecord) -> str | None:
        """The proxy name of `r`'s process: its comm, or its command's base name (cached)."""
        p = r.process
        if p is None:
            return None
        if p.comm in self.names:
            return p.comm
        if not p.cmdline:
            return None
        if p.cmdline in self._cmd_names:
            return self._cmd_names[p.cmdline]
        base = os.path.basename(p.cmdline.split(" ", 1)[0])
        hit = base if base in self.names else None
        if len(self._cmd_names) >= 4096:
            self._cmd_names.clear()
        self._cmd_names[p.cmdline] = hit
        return hit

    def name_of(self, r: FlowRecord) -> str | None:
        """The proxy name of a TCP socket record's process (None: not a proxy's, or not one)."""
        if r.protocol != "tcp" or r.source != "socket":
            return None
        return self.proxy_of(r)

    def role_of(self, r: FlowRecord, name: str | None) -> tuple[Role, str | None] | None:
        """`r`'s role in a mesh call, `name` its `name_of` (None: not a member)."""
        if r.protocol != "tcp" or r.source != "socket":
            return None
        if name is not None:
            if r.observer == "server":
                if r.server.port in self.outbound[name]:
                    return "near_out", name
                if r.server.port in self.inbound[name]:
                    return "far_in", name
                return None  # its admin or metrics port
            return ("near_in" if r.loopback else "far_out"), name
        if r.observer == "client":
            if r.nat and r.server.port in self.all_outbound and _loopback_ip(r.server.ip):
                last = r.nat[-1]
                if last.type != "snat" and last.translated == r.server:
                    return "app_out", None
            return None
        if r.loopback and (r.client.ip in self.distinct
                           or ((r.client.ip in self.handoff_ips
                                or (self.handoff_self and r.client.ip == r.server.ip))
                               and r.netns in self.proxy_netns)):
            return "app_in", None
        return None

    def _saw_proxies(self, records: list[FlowRecord], names: list[str | None],
                     now: datetime) -> None:
        """Note the namespaces of the batch's proxy sockets (before any record is looked at,
        so that the batch's order does not matter); forget those not seen for PROXY_NETNS_S."""
        seen = self.proxy_netns
        for r, name in zip(records, names, strict=True):
            if name is not None:
                seen[r.netns] = now
                seen.move_to_end(r.netns)
        while seen and (len(seen) > MAX_PROXY_NETNS
                        or now - next(iter(seen.values())) > timedelta(seconds=PROXY_NETNS_S)):
            seen.popitem(last=False)

    # -- in ------------------------------------------------------------------------------------
    def add(self, records: Iterable[FlowRecord], now: datetime) -> list[FlowRecord]:
        records = list(records)
        names = [self.name_of(r) for r in records]  # once per record: the hot path
        self._saw_proxies(records, names, now)
        out: list[FlowRecord] = []
        touched = self._touched = []
        for r, name in zip(records, names, strict=True):
            role = self.role_of(r, name)
            if role is None:
                out.append(r)
                continue
            self._member(r, role[0], role[1], now, out, touched)
        pools, self._pools_touched = self._pools_touched, {}
        for key in pools:  # after the whole batch: its records pair together, in any order
            self._match(key, now)
        for c in touched:
            if c.dirty:
                c.dirty = False
                self._emit(c, now, out)
        self._release(now, out)
        return out

    def flush(self) -> list[FlowRecord]:
        out: list[FlowRecord] = []
        for c in list(self.calls):
            if c.state == FOLDED:
                self._final(c, out)
            elif c.state == WAIT:
                self._alone(c, out)
        self.calls.clear()
        self.by_sock.clear()
        self.by_pair.clear()
        self.pools.clear()
        self.loose.clear()
        return out

    def _member(self, r: FlowRecord, role: Role, name: str | None, now: datetime,
                out: list[FlowRecord], touched: list[_Call]) -> None:
        sk = _sock(r)
        c = self.by_sock.get(sk)
        if c is not None:  # a newer record of a socket already known
            self._update(c, r, role, now, out, touched)
            return
        side: Side = "out" if role in ("app_out", "near_out", "far_out") else "in"
        if role in ("app_out", "near_out", "near_in", "app_in"):
            c = self.by_pair.get(_pair(r))
            if c is not None and self._slot(c, role) is None and c.state in (WAIT, ALONE):
                self._attach(c, r, role, name, sk, now, touched)
                if c.state == ALONE:
                    out.append(self._marked(r))
                else:
                    self._after_join(c, now)
                return
        if len(self.calls) >= self.max_calls:
            self.drops.count(STAGE, "full", detail="mesh fold full: records sent unfolded")
            out.append(self._marked(r))
            return
        c = _Call(side, now + self.hold)
        self.calls[c] = None
        self._attach(c, r, role, name, sk, now, touched)
        if role == "app_in":
            c.speculative = r.client.ip not in self.distinct
        if role != "far_out" and role != "far_in":
            self.by_pair[_pair(r)] = c
            c.pair = _pair(r)
        self._after_join(c, now)

    def _slot(self, c: _Call, role: Role) -> FlowRecord | None:
        return c.app if role.startswith("app") else c.near if role.startswith("near") else c.far

    def _attach(self, c: _Call, r: FlowRecord, role: Role, name: str | None, sk: SockKey,
                now: datetime, touched: list[_Call]) -> None:
        _set_slot(c, role, r)
        if name is not None and c.proxy is None:
            c.proxy = name
        if role == "app_in" or role == "near_in":
            c.speculative = c.speculative and role == "app_in"
        elif c.speculative:
            c.speculative = False
        c.socks.add(sk)
        self.by_sock[sk] = c
        c.dirty = True
        touched.append(c)
        if role == "far_in":
            c.target = _inbound_target(r, self.inbound.get(name or "", frozenset()))

    def _update(self, c: _Call, r: FlowRecord, role: Role, now: datetime,
                out: list[FlowRecord], touched: list[_Call]) -> None:
        if c.state == DONE:
            if role != "app_out" and role != "app_in":
                self.late += 1
            self._forget_sock(c, r)
            return
        _set_slot(c, role, r)
        if c.state == ALONE:
            out.append(r if c.speculative else self._marked(r))
            c.deadline = now + self.idle
            if r.final:
                self._forget_sock(c, r)
            return
        c.dirty = True
        touched.append(c)

    def _forget_sock(self, c: _Call, r: FlowRecord) -> None:
        sk = _sock(r)
        c.socks.discard(sk)
        self.by_sock.pop(sk, None)
        if not c.socks:
            self._drop(c)

    # -- pairing -------------------------------------------------------------------------------
    def _after_join(self, c: _Call, now: datetime) -> None:
        """`c` gained a member: file it in its pool (when it knows its key) and pair the pool."""
        if c.state != WAIT or c.pool is not None:
            return
        key = self._pool_key(c)
        if key is None:
            return
        c.pool = key
        self.pools.setdefault(key, []).append(c)
        self.loose.setdefault(_loose(key), {})[c] = None
        self._pools_touched[key] = None

    def _pool_key(self, c: _Call) -> PoolKey | None:
        if c.side == "out":
            if c.far is not None and c.app is None and c.near is None:
                r = c.far
                d = dialled_of(r.nat) or r.server
                return ("out", r.netns, _pid(r), d.ip, d.port)
            if c.far is None and c.app is not None and c.near is not None:
                dialled = dialled_of(c.app.nat)
                if dialled is None:
                    return None
                return ("out", c.near.netns, _pid(c.near), dialled.ip, dialled.port)
            return None
        if c.far is not None and c.app is None and c.near is None:
            if c.target is None:
                return None  # the port the client dialled is unknown: nothing to pair with
            return ("in", c.far.netns, _pid(c.far), c.target.port)
        if c.far is None and c.near is not None:
            return ("in", c.near.netns, _pid(c.near), c.near.server.port)
        return None

    def _match(self, key: PoolKey, now: datetime) -> None:
        """Each accept, in order of start, takes the unpaired connect of the pool with the
        nearest start at or after it (within the hold time)."""
        pool = self.pools.get(key, [])
        fars = [c for c in pool if c.app is None and c.near is None and c.far is not None]
        calls = [c for c in pool if c.near is not None and c.far is None]
        if not fars or not calls:
            return
        if key[0] == "out":  # accept: r2 of a call; connect: r3 alone
            accepts = [(c.near.start, c) for c in calls if c.near is not None]
            connects = [(c.far.start, c) for c in fars if c.far is not None]
        else:  # accept: r4 alone; connect: r5 of a call
            accepts = [(c.far.start, c) for c in fars if c.far is not None]
            connects = [(c.near.start, c) for c in calls if c.near is not None]
        connects.sort(key=_order)  # ties broken by the sockets' ends: no arrival order counts
        starts = [start for start, _ in connects]
        for a_start, a in sorted(accepts, key=_order):
            i = bisect.bisect_left(starts, a_start)  # the nearest start at or after the accept
            while i < len(connects) and starts[i] - a_start <= self.hold:
                if key[0] == "out" or self._handoff_to(a, connects[i][1]):
                    break
                i += 1
            else:
                continue
            cc = connects[i][1]
            del connects[i], starts[i]
            call, lone = (a, cc) if key[0] == "out" else (cc, a)
            self._merge(call, lone, now)

    @staticmethod
    def _handoff_to(far_call: _Call, near_call: _Call) -> bool:
        """r5 connects to r4's dialled address, or to a loopback address on its port."""
        t, n = far_call.target, near_call.near
        return t is not None and n is not None and (n.server.ip == t.ip
                                                     or _loopback_ip(n.server.ip))

    def _merge(self, call: _Call, lone: _Call, now: datetime) -> None:
        """The far socket of `lone` joins `call`."""
        assert lone.far is not None
        call.far = lone.far
        call.target = call.target or lone.target
        call.proxy = call.proxy or lone.proxy
        call.deadline = min(call.deadline, lone.deadline)
        call.dirty = True
        for sk in lone.socks:
            call.socks.add(sk)
            self.by_sock[sk] = call
        lone.socks.clear()
        self._unpool(lone)
        self._unpool(call)
        self.calls.pop(lone, None)
        self._touched.append(call)

    def _unpool(self, c: _Call) -> None:
        if c.pool is not None:
            loose = self.loose.get(_loose(c.pool))
            if loose is not None:
                loose.pop(c, None)
                if not loose:
                    del self.loose[_loose(c.pool)]
            pool = self.pools.get(c.pool)
            if pool is not None and c in pool:
                pool.remove(c)
                if not pool:
                    del self.pools[c.pool]
            c.pool = None

    # -- out -----------------------------------------------------------------------------------
    def _emit(self, c: _Call, now: datetime, out: list[FlowRecord]) -> None:
        if c.state != WAIT and c.state != FOLDED:
            return
        if not c.complete():
            return
        if c.state == WAIT:
            c.state = FOLDED
            self.folded += 1
            if c.pair is not None:
                self.by_pair.pop(c.pair, None)
                c.pair = None
        lead = c.app if c.app is not None else c.far  # the record the folded one speaks for
        assert lead is not None
        if lead.final:
            if c.final_at is None:
                c.final_at = now
                c.deadline = now + self.hold
            if all(m.final for m in c.members()):
                self._final(c, out)
            return  # the final waits for the proxies' finals (or the hold time)
        c.deadline = now + self.idle
        out.append(self._folded(c, final=False))

    def _final(self, c: _Call, out: list[FlowRecord]) -> None:
        out.append(self._folded(c, final=True))
        c.state = DONE
        c.deadline = (c.final_at or c.deadline) + self.hold
        for m in c.members():  # sockets whose final is in: nothing more will come
            if m.final:
                sk = _sock(m)
                c.socks.discard(sk)
                self.by_sock.pop(sk, None)
        if not c.socks:
            self._drop(c)

    def _folded(self, c: _Call, *, final: bool) -> FlowRecord:
        app, near, far = c.app, c.near, c.far
        assert near is not None and far is not None
        if app is None:  # the handoff failed: the server side is the sidecar's own socket,
            # and no server app received a byte (the sidecar's counts hold the framing)
            app = far.replace(bytes_c2s=0, bytes_s2c=0)
        name = c.proxy or "?"
        pid = _pid(near)
        inbound = self.inbound.get(name, frozenset())
        if c.side == "out":
            server, nat = _strip_inbound(far, self.all_inbound)
            hops = [MeshHop("app-proxy", app.client, app.server, app.bytes_c2s, app.bytes_s2c,
                            name, pid),
                    MeshHop("proxy-proxy", far.client, server, far.bytes_c2s, far.bytes_s2c,
                            name, _pid(far))]
            client = far.client
        else:
            _, nat = _strip_inbound(far, inbound)
            server = (c.target if c.target is not None
                      else _strip_inbound(far, inbound)[0] if c.app is None else app.server)
            hops = [MeshHop("proxy-proxy", far.client, far.server, far.bytes_c2s, far.bytes_s2c,
                            name, _pid(far)),
                    MeshHop("proxy-app", near.client, near.server, near.bytes_c2s,
                            near.bytes_s2c, name, pid)]
            client = far.client
        return app.replace(record_id=self.next_id(), client=client, server=server,
                           family=far.family, nat=nat or None, loopback=False,
                           final=final and app.final, mesh=Mesh(proxy=name, hops=hops))

    def _marked(self, r: FlowRecord) -> FlowRecord:
        if INCOMPLETE in r.incomplete:
            return r
        return r.replace(incomplete=[*r.incomplete, INCOMPLETE])

    def _alone(self, c: _Call, out: list[FlowRecord]) -> None:
        """`c`'s partners did not come: its records go out as they came, marked."""
        self._unpool(c)
        if c.pair is not None:
            self.by_pair.pop(c.pair, None)
            c.pair = None
        c.state = ALONE
        if not c.speculative:
            self.released += 1
        for m in c.members():
            if c.speculative:
                out.append(m)
            else:
                self.drops.count(STAGE, "unpaired",
                                 detail=f"{c.proxy or 'mesh'} socket {m.client.ip}:{m.client.port}"
                                 f" -> {m.server.ip}:{m.server.port} without its partners")
                out.append(self._marked(m))
            if m.final:
                sk = _sock(m)
                c.socks.discard(sk)
                self.by_sock.pop(sk, None)
        if not c.socks:
            self._drop(c)

    def _leftover(self, c: _Call, now: datetime, out: list[FlowRecord]) -> bool:
        """At its deadline, a call still missing its partner socket takes the pool's unpaired
        one nearest in start (before or after, within the hold time): what is left when
        concurrent calls paired crosswise (the connect its accept would have taken went to an
        earlier accept that came first). True when it was folded."""
        if c.pool is None:
            return False
        lone = c.far is not None and c.near is None
        mine = c.far if lone else c.near
        best: tuple[tuple, _Call] | None = None
        for o in self.loose.get(_loose(c.pool), ()):
            if o is c or (o.far is not None and o.near is None) == lone or o.state != WAIT:
                continue
            theirs = o.near if lone else o.far
            if mine is None or theirs is None:
                continue
            if c.pool[0] == "in" and not (self._handoff_to(c, o) if lone
                                          else self._handoff_to(o, c)):
                continue
            gap = abs(mine.start - theirs.start)
            rank = (gap, _order((theirs.start, o)))  # ties: by the sockets, not by arrival
            if gap <= self.hold and (best is None or rank < best[0]):
                best = (rank, o)
        if best is None:
            return False
        call, other = (best[1], c) if lone else (c, best[1])
        self._merge(call, other, now)
        self._touched = []
        self._emit(call, now, out)
        return True

    def _release(self, now: datetime, out: list[FlowRecord]) -> None:
        for c in list(self.calls):
            if now < c.deadline or c not in self.calls:
                continue
            if c.state == WAIT:
                if self._leftover(c, now, out):
                    continue
                self._alone(c, out)
                c.deadline = now + self.idle
            elif c.state == FOLDED:
                if c.final_at is not None:
                    self._final(c, out)
                else:  # members that stopped reporting without a final: forget them
                    self._drop(c)
            else:
                self._drop(c)

    def _drop(self, c: _Call) -> None:
        for sk in c.socks:
            self.by_sock.pop(sk, None)
        c.socks.clear()
        if c.pair is not None and self.by_pair.get(c.pair) is c:
            del self.by_pair[c.pair]
        self._unpool(c)
        self.calls.pop(c, None)


def _loose(pool: PoolKey) -> tuple:
    """The pools a call's leftover partner may come from: the proxy's (out), its own (in)."""
    return pool[:3] if pool[0] == "out" else pool


def _order(item: tuple[datetime, _Call]) -> tuple:
    start, c = item
    return (start, sorted(c.socks, key=repr))


def _inbound_target(r: FlowRecord, inbound: frozenset[int]) -> Endpoint | None:
    """The address r4's client dialled: the `original` of its trailing inbound redirect."""
    if r.nat:
        last = r.nat[-1]
        if last.type != "snat" and last.translated == r.server and r.server.port in inbound:
            return last.original
    return None


def _strip_inbound(r: FlowRecord, inbound: frozenset[int]) -> tuple[Endpoint, list[Nat]]:
    """`r`'s server and nat without a trailing redirect to an inbound proxy port."""
    nat = list(r.nat or ())
    if nat:
        last = nat[-1]
        if (last.type != "snat" and last.translated == r.server and r.server.port in inbound
                and last.original.ip == last.translated.ip):
            return last.original, nat[:-1]
    return r.server, nat


class MeshFoldingSink:
    """A sink that folds mesh calls before handing records on (`collector.pipeline.Sink`). A
    ticker thread releases held records whose deadline passed when no source writes."""

    def __init__(self, inner: Sink, folder: MeshFolder, now: Callable[[], datetime], *,
                 tick_s: float | None = TICK_S) -> None:
        self.inner, self.folder, self.now = inner, folder, now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if tick_s is not None:
            self._ticker = threading.Thread(target=self._tick, args=(tick_s,), daemon=True,
                                            name="mesh-fold-ticker")
            self._ticker.start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.write([])

    def write(self, records: list[FlowRecord]) -> None:
        with self._lock:
            out = self.folder.add(records, self.now())
            if out or records:
                self.inner.write(out)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(5)
        with self._lock:
            try:
                self.inner.write(self.folder.flush())
            finally:
                self.inner.close()
