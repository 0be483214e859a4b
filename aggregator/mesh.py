"""A connection's service-mesh annotation: merged from its observers' records, stored, shown.

Stage: correlation (aggregator/correlate.py, and aggregator/correlate_mesh.py for the C core)
-> store (the `mesh` column) -> API (GET /api/v1/flows, /graph; docs/api.md).
In:  records with `mesh` (docs/flow-record.md, "mesh": a call the collector folded from its
     sidecars' sockets, keyed by the proxy-to-proxy hop). The client's collector sends a
     `client` record with hops [app-proxy, proxy-proxy], the server's a `server` record with
     [proxy-proxy, proxy-app]; the wire's record of the same key has none.
Out: `Connection.mesh`, one `MeshSide` per socket observer (client first), and its forms:
     `stored` (the `mesh` column: JSON of the sides), `shown` (the API's object).

Rules:
- Per observer, the hops are those of the record that made the observer's view: a record that
  replaces the view replaces the observer's hops (a newer record without `mesh` removes them);
  a record its view supersedes changes nothing. So the result is the same in every order of
  arrival (the views' rule, aggregator/correlate.py `_superseded`).
- Only socket observers (`client`, `server`) carry a mesh into the connection: a wire or drops
  record has none by contract, and one that had would be ignored.
- One entry per (hop, observer): a record listing a hop twice keeps its first.
- `proxy`: the client side's sidecar name, else the server side's.
- The wire's bytes of a meshed connection (`wire_bytes_c2s/s2c`) are its path views' (the stored
  `path_bytes_*`: the app's bytes plus the proxies' framing), null when no wire saw it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from aggregator.connection import MeshSide
from eastwest.record import FlowRecord, Mesh, MeshHop

SIDES = ("client", "server")
HOP_ORDER = {"app-proxy": 0, "proxy-proxy": 1, "proxy-app": 2}
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(list[MeshSide])


def side_of(rec: FlowRecord) -> MeshSide | None:
    """The mesh a socket record tells (None: no mesh, or not a socket observer's record)."""
    if rec.source == "drops":
        return None
    return side_from(rec.observer, rec.mesh)


def side_from(observer: str, m: Mesh | None) -> MeshSide | None:
    """`side_of` from a record's observer and `mesh`."""
    if m is None or observer not in SIDES:
        return None
    seen: set[str] = set()
    hops = []
    for h in m.hops:
        if h.hop not in seen:
            seen.add(h.hop)
            hops.append(h)
    hops.sort(key=lambda h: HOP_ORDER[h.hop])
    return MeshSide(observer, m.proxy, tuple(hops))


def merged(sides: tuple[MeshSide, ...] | None, observer: str,
           new: MeshSide | None) -> tuple[MeshSide, ...] | None:
    """`sides` with `observer`'s replaced by `new` (removed when None); None when none is left."""
    if observer not in SIDES:
        return sides
    keep = [s for s in sides or () if s.observer != observer]
    if new is not None:
        keep.append(new)
    keep.sort(key=lambda s: SIDES.index(s.observer))
    return tuple(keep) or None


def stored(sides: tuple[MeshSide, ...] | None) -> str | None:
    """The `mesh` column: the sides as JSON (None: not meshed)."""
    return _enc.encode(list(sides)).decode() if sides else None


def sides_of(text: str | None) -> tuple[MeshSide, ...] | None:
    """The inverse of `stored`."""
    return tuple(_dec.decode(text)) or None if text else None


def proxy_of(sides: tuple[MeshSide, ...]) -> str:
    return sides[0].proxy  # sorted client first


def _end(e: Any) -> dict[str, Any]:
    return {"ip": e.ip, "port": e.port}


def _hop(h: MeshHop, observer: str) -> dict[str, Any]:
    return {"hop": h.hop, "observer": observer, "client": _end(h.client),
            "server": _end(h.server), "bytes_c2s": h.bytes_c2s, "bytes_s2c": h.bytes_s2c,
            "process": h.process, "pid": h.pid}


def shown(text: str | None, wire_c2s: int | None, wire_s2c: int | None) -> dict[str, Any] | None:
    """A flow's `mesh` (docs/api.md): {proxy, hops, wire_bytes_c2s, wire_bytes_s2c}; hops in
    the call's order (app-proxy, proxy-proxy as the client saw it, then as the server saw it,
    proxy-app)."""
    sides = sides_of(text)
    if not sides:
        return None
    hops = sorted(((h, s.observer) for s in sides for h in s.hops),
                  key=lambda x: (HOP_ORDER[x[0].hop], SIDES.index(x[1])))
    return {"proxy": proxy_of(sides), "hops": [_hop(h, o) for h, o in hops],
            "wire_bytes_c2s": wire_c2s, "wire_bytes_s2c": wire_s2c}
