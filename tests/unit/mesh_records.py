"""The records of one folded service-mesh call as each observer reports it (docs/flow-record.md
"mesh"): the client's collector (the app's bytes; hops app-proxy and its proxy-proxy), the
server's (hops proxy-proxy at the inbound port 15006, and proxy-app from 127.0.0.6) and the
wire (the proxy-to-proxy hop's key, the app's bytes plus the proxies' framing, no mesh)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from eastwest.record import Endpoint, FlowRecord, Mesh, MeshHop
from tests.unit.test_correlate import T0, rec

FRAMING = 40  # the proxies' framing per direction, on the wire only
CLIENT_SIDECAR = Endpoint("10.244.1.11", 40000)  # the record's client: the sidecar's socket
SERVER = Endpoint("10.244.2.11", 9090)


def hops(observer: str, k: int = 1) -> list[MeshHop]:
    """The hops of `observer`'s side, their bytes those of its k-th record."""
    c2s, s2c = 1000 * k, 5000 * k
    if observer == "client":
        return [MeshHop("app-proxy", Endpoint("10.244.1.11", 51000), Endpoint("127.0.0.1", 15001),
                        c2s, s2c, "ew-sidecar", 301),
                MeshHop("proxy-proxy", CLIENT_SIDECAR, SERVER, c2s + FRAMING, s2c + FRAMING,
                        "ew-sidecar", 301)]
    return [MeshHop("proxy-proxy", CLIENT_SIDECAR, Endpoint("10.244.2.11", 15006),
                    c2s + FRAMING, s2c + FRAMING, "ew-sidecar", 402),
            MeshHop("proxy-app", Endpoint("127.0.0.6", 52000), Endpoint("127.0.0.1", 9090),
                    c2s, s2c, "ew-sidecar", 402)]


def meshed(observer: str, k: int = 1, *, final: bool = True, mesh: bool = True,
           **over: Any) -> FlowRecord:
    """`observer`'s k-th record of the call (k = 1 interim, 2 the final one by default)."""
    c2s, s2c = 1000 * k, 5000 * k
    wire = observer == "path"
    return rec(observer, final=final, dur=2.0 * k, c2s=c2s + FRAMING * wire,
               s2c=s2c + FRAMING * wire,
               mesh=Mesh("ew-sidecar", hops(observer, k)) if mesh and not wire else None,
               **over)


def call(observers: tuple[str, ...]) -> list[tuple[str, int, bool]]:
    """Each observer's interim (k=1) and final (k=2) record."""
    return [(o, k, k == 2) for o in observers for k in (1, 2)]


START = T0
END = T0 + timedelta(seconds=4)
