"""The lab's service-mesh sidecar (`--pattern mesh`): a transparent TCP proxy, as Istio's Envoy.

Runs inside a pod's namespace: `python -m eastwest.lab.sidecar --state DIR --pod NAME`, process
name `ew-sidecar`, as uid PROXY_UID (1337, Istio's proxy uid) once its files and listening
sockets are open. eastwest/lab/mesh.py installs the pod's iptables that send TCP to it.

In: connections the pod's nat table REDIRECTs to it: the application's outbound calls to
OUTBOUND_PORT (15001), inbound calls to the pod to INBOUND_PORT (15006). The original
destination of each comes from `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (the REDIRECT's conntrack
entry; linux/netfilter_ipv4.h).
Out: the relayed connection, and one JSON line per proxied connection in DIR/mesh/<pod>.jsonl
(its hop: `hop_line`).

Rules:
- Outbound: connect to the original destination from the pod's own address (the app's source
  address; a ClusterIP is then DNATed by the host as any pod's packet), write the framing line
  `EWMESH/1 <app-ip> <app-port> <hop-id>\\n` first, relay; the server's sidecar answers
  `EWMESH/1 OK\\n` first, which is stripped before the application sees a byte (an answer that
  does not start with it is relayed as it is: a server without a sidecar).
- Inbound: connect to the original destination (the pod's own address and port) from
  INBOUND_SOURCE (127.0.0.6, bound first, as Istio does); a connection that opens with
  `EWMESH/1 ` has its framing line read and stripped (waiting at most HEADER_WAIT for it) and is
  answered `EWMESH/1 OK\\n`; one that does not (a caller without a sidecar) is relayed as it is.
- Each listener starts the upstream connect of a connection (non-blocking) before it accepts the
  next, as Envoy's worker does in its accept callback: upstream connects come in accept order.
- Every upstream socket is bound first to a port of SIDECAR_PORTS (20000-32767, below the
  kernel's ephemeral range the app draws from) not used within 120 s (app.FreshPorts: a reused
  5-tuple could meet the old connection's lingering conntrack entry, and NAT would move the new
  connection to another port, or not apply to it at all).
- Both directions in one loop per connection (select): an EOF becomes shutdown(SHUT_WR) on the
  other socket (half-close carries through); a connection reset on either side, or an upstream
  connect that is refused or times out, resets the other side (SO_LINGER {1, 0} and close: an
  RST), so the application sees ECONNRESET.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import select
import signal
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from eastwest.lab.app import FreshPorts, Ledger, now_iso, set_comm

COMM = "ew-sidecar"
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
PROXY_UID = 1337
INBOUND_SOURCE = "127.0.0.6"
MAGIC = b"EWMESH/1 "
OK_LINE = b"EWMESH/1 OK\n"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
HEADER_WAIT = 1.0  # seconds an inbound connection may take to show whether it is framed
CONNECT_TIMEOUT = 3.0
IO_TIMEOUT = 30.0  # a connection idle this long (both ways) is closed
MAX_HEADER = 256
# the sidecar's own source ports: below the kernel's ephemeral range (32768-60999), which the
# pod's app draws from, so the two never share a 5-tuple (app.FreshPorts says why that matters)
SIDECAR_PORTS = range(20000, 32768)


def framing_line(app_ip: str, app_port: int, hop_id: str) -> bytes:
    """The line the outbound sidecar writes first on the proxy-to-proxy hop."""
    return f"EWMESH/1 {app_ip} {app_port} {hop_id}\n".encode()


def parse_framing(line: bytes) -> tuple[str, int, str]:
    """`EWMESH/1 <ip> <port> <id>\\n` -> (ip, port, id); ValueError if it is not one."""
    words = line.decode("ascii").split()
    if len(words) != 4 or words[0] != "EWMESH/1":
        raise ValueError(f"not a framing line: {line!r}")
    return words[1], int(words[2]), words[3]


def original_dst(conn: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (struct sockaddr_in from SO_ORIGINAL_DST)."""
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def abort(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, 0 seconds)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _ends(sock: socket.socket, local_first: bool = False) -> dict[str, Any]:
    (lip, lport), (rip, rport) = sock.getsockname()[:2], sock.getpeername()[:2]
    if local_first:
        return {"local_ip": lip, "local_port": lport, "remote_ip": rip, "remote_port": rport}
    return {"client_ip": rip, "client_port": rport, "server_ip": lip, "server_port": lport}


class Sidecar:
    def __init__(self, state: Path, pod: str) -> None:
        self.pod = pod
        self.hops = Ledger(state / "mesh" / f"{pod}.jsonl")
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self._prefix = f"{pod}.{os.getpid()}"
        self.ports = FreshPorts(ports=SIDECAR_PORTS)

    def next_id(self) -> str:
        with self._ids_lock:
            return f"{self._prefix}.{next(self._ids)}"

    # -- accepting ------------------------------------------------------------------------
    def listen(self) -> list[tuple[socket.socket, str]]:
        out = []
        for port, direction in ((OUTBOUND_PORT, "outbound"), (INBOUND_PORT, "inbound")):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(256)
            out.append((s, direction))
        return out

    def accept_loop(self, lsock: socket.socket, direction: str) -> None:
        """Accept, and start the upstream connect before the next accept (Envoy's worker does
        the same in its accept callback): a listener's upstream connects are in the order of
        its accepts, which the collector's mesh fold pairs them by (docs/collector.md)."""
        while True:
            conn, _ = lsock.accept()
            started = self.begin(conn, direction)
            threading.Thread(target=self.handle, args=(conn, direction, started),
                             daemon=True).start()

    def begin(self, down: socket.socket, direction: str
              ) -> tuple[dict[str, Any], socket.socket | None, tuple[str, int] | None,
                         BaseException | None]:
        """The hop's start: the downstream's ends, its original destination, the upstream
        socket with its connect started (non-blocking); an error is kept for `handle`."""
        hop: dict[str, Any] = {"pod": self.pod, "direction": direction, "start": now_iso()}
        up: socket.socket | None = None
        try:
            hop["downstream"] = _ends(down)
            dst = original_dst(down)
            hop["original_dst"] = {"ip": dst[0], "port": dst[1]}
            # from the pod's address (outbound) or 127.0.0.6 (inbound), on a fresh port
            up = self.ports.open(socket.AF_INET, INBOUND_SOURCE if direction == "inbound"
                                   else hop["downstream"]["client_ip"])
            up.setblocking(False)
            rc = up.connect_ex(dst)  # EINPROGRESS, or at once: 0 or the error
            if rc not in (0, errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                return hop, up, dst, _connect_error(rc)
            return hop, up, dst, None
        except (OSError, ValueError) as exc:
            if up is not None:
                up.close()
            return hop, None, None, exc

    # -- one connection -------------------------------------------------------------------
    def handle(self, down: socket.socket, direction: str,
               started: tuple[dict[str, Any], socket.socket | None, tuple[str, int] | None,
                              BaseException | None]) -> None:
        hop, up, dst, failed = started
        counts = {"downstream_bytes_in": 0, "downstream_bytes_out": 0,
                  "upstream_bytes_in": 0, "upstream_bytes_out": 0}
        try:
            if failed is not None and up is None:
                raise failed
            assert up is not None and dst is not None
            if direction == "outbound":
                hop["id"] = self.next_id()
                app = (hop["downstream"]["client_ip"], hop["downstream"]["client_port"])
                hop["app_client"] = {"ip": app[0], "port": app[1]}
                header = framing_line(app[0], app[1], hop["id"])
                hop["framing_c2s"], hop["framing_s2c"] = len(header), 0
            else:
                header = b""
                framing = self._read_framing(down)
                counts["downstream_bytes_in"] += len(framing)
                if framing:
                    ip, port, hop["id"] = parse_framing(framing)
                    hop["app_client"] = {"ip": ip, "port": port}
                else:
                    hop["id"] = None
                    hop["app_client"] = {"ip": hop["downstream"]["client_ip"],
                                         "port": hop["downstream"]["client_port"]}
                hop["framing_c2s"], hop["framing_s2c"] = len(framing), 0
            try:
                if failed is not None:  # the connect failed at once
                    raise failed
                _connected(up)
            except ConnectionRefusedError:
                hop["outcome"] = "refused"
                abort(down)
                return
            except OSError as exc:  # timed out, unreachable, ...
                hop["outcome"] = "timeout" if isinstance(exc, TimeoutError) else "error"
                hop["error"] = f"{type(exc).__name__}: {exc}"
                abort(down)
                return
            up.settimeout(IO_TIMEOUT)
            down.settimeout(IO_TIMEOUT)
            hop["upstream"] = _ends(up, local_first=True)
            if header:
                up.sendall(header)
                counts["upstream_bytes_out"] += len(header)
            elif hop["framing_c2s"]:
                down.sendall(OK_LINE)
                counts["downstream_bytes_out"] += len(OK_LINE)
                hop["framing_s2c"] = len(OK_LINE)
            hop["outcome"] = self.relay(down, up, counts, hop, strip_ok=direction == "outbound")
        except (ConnectionError, TimeoutError, OSError, ValueError) as exc:
            hop.setdefault("outcome", "reset" if isinstance(exc, ConnectionError) else "error")
            hop["error"] = f"{type(exc).__name__}: {exc}"
            abort(down)
            if up is not None:
                abort(up)
        finally:
            for s in (down, up):
                if s is not None and s.fileno() >= 0:
                    s.close()
            self.hops.write({**hop, **counts, "end": now_iso()})

    def _read_framing(self, down: socket.socket) -> bytes:
        """An inbound connection's framing line, read off the socket; b"" (nothing read) if
        the caller does not open with one within HEADER_WAIT."""
        down.settimeout(HEADER_WAIT)
        seen = b""
        try:
            while True:
                seen = down.recv(MAX_HEADER, socket.MSG_PEEK)
                if not seen:
                    return b""  # EOF before a byte: a plain (empty) connection
                if not (seen.startswith(MAGIC) or MAGIC.startswith(seen)):
                    return b""
                if b"\n" in seen:
                    return down.recv(seen.index(b"\n") + 1)
                if len(seen) >= MAX_HEADER:
                    return b""
                # the rest of the line is on its way: wait for more than we have
                select.select([], [], [], 0.001)
        except TimeoutError:
            return b""

    def relay(self, down: socket.socket, up: socket.socket, counts: dict[str, int],
              hop: dict[str, Any], strip_ok: bool) -> str:
        """Both directions until both are closed; the outcome (ok, reset). With `strip_ok`
        (outbound) the server sidecar's OK line is taken off the answer (`hop["framing_s2c"]`)."""
        pending_ok = strip_ok  # outbound: the server sidecar's OK line is not yet stripped
        head = b""
        open_ = {down: True, up: True}
        other = {down: up, up: down}
        names = {down: "downstream", up: "upstream"}
        while any(open_.values()):
            readable, _, _ = select.select([s for s, o in open_.items() if o], [], [], IO_TIMEOUT)
            if not readable:
                raise TimeoutError(f"idle for {IO_TIMEOUT:g} s")
            for s in readable:
                dst = other[s]
                try:
                    raw = s.recv(65536)
                except ConnectionResetError:
                    abort(dst)
                    return "reset"
                counts[f"{names[s]}_bytes_in"] += len(raw)
                data = raw
                if s is up and pending_ok:
                    head += raw
                    if raw and len(head) < len(OK_LINE) and OK_LINE.startswith(head):
                        continue  # the rest of the OK line is on its way
                    pending_ok = False
                    if head.startswith(OK_LINE):
                        hop["framing_s2c"] = len(OK_LINE)
                        data = head[len(OK_LINE):]
                    else:  # a server without a sidecar: its bytes as they are
                        data = head
                if data:
                    try:
                        dst.sendall(data)
                    except (ConnectionResetError, BrokenPipeError):
                        abort(s)
                        return "reset"
                    counts[f"{names[dst]}_bytes_out"] += len(data)
                if not raw:
                    open_[s] = False
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
        return "ok"


def _connected(up: socket.socket) -> None:
    """Wait for a connect started non-blocking; raise what it failed with."""
    _, writable, _ = select.select([], [up], [], CONNECT_TIMEOUT)
    if not writable:
        raise TimeoutError(f"connect timed out after {CONNECT_TIMEOUT} s")
    err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise _connect_error(err)
    up.setblocking(True)


def _connect_error(err: int) -> OSError:
    if err == errno.ECONNREFUSED:
        return ConnectionRefusedError(err, os.strerror(err))
    return OSError(err, os.strerror(err))


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eastwest.lab.sidecar",
                                description="The lab's mesh sidecar: a transparent TCP proxy on "
                                f"{OUTBOUND_PORT} (outbound) and {INBOUND_PORT} (inbound).")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--pod", required=True)
    p.add_argument("--uid", type=int, default=PROXY_UID,
                   help=f"run as this uid once set up (default {PROXY_UID}; the pod's iptables "
                   "exclude its traffic from the redirect by it)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    set_comm(COMM)
    car = Sidecar(args.state, args.pod)
    listeners = car.listen()
    (args.state / "ready").mkdir(exist_ok=True)
    ready = (args.state / "ready" / f"{args.pod}.sidecar").open("w")
    if os.geteuid() == 0 and args.uid != 0:
        drop_privileges(args.uid)
    ready.write(str(os.getpid()))
    ready.close()
    for lsock, direction in listeners[1:]:
        threading.Thread(target=car.accept_loop, args=(lsock, direction), daemon=True).start()
    car.accept_loop(*listeners[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
