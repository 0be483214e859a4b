"""Workload of the mesh fold lab test (tests/lab/test_mesh_fold_lab.py): an app client, an app
server and a tiny Istio-style sidecar relay, each run in a namespace of the test.

    relay-out  the client pod's sidecar: accepts the app's REDIRECTed connections on
               127.0.0.1:15001, reads the dialled address (SO_ORIGINAL_DST), connects there with
               SO_MARK 0x539 (the pod's REDIRECT skips that mark, as Istio's skips its uid) and
               writes a 4-byte frame header before the app's bytes
    relay-in   the server pod's sidecar: accepts REDIRECTed calls on 15006, reads the header,
               connects to the original destination from 127.0.0.6 (Istio's handoff address)
    serve      the app server on :8080: reads the request to EOF, answers --reply bytes
    call       the app client: --count calls of --send bytes to --to, reads the answer; prints
               one JSON truth line per call (its own port, bytes sent and received)

Both relays set their process name to `ew-sidecar` (prctl PR_SET_NAME) before any thread starts,
so every socket they own is named like the lab's sidecar. Prints `ready` once listening.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80
SO_MARK = 36
MARK = 0x539
HEADER = b"EWSC"


def name_process(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, ctypes.c_char_p(name.encode()), 0, 0, 0)  # PR_SET_NAME


def original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def pump(src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.set()


def relay(down: socket.socket, up: socket.socket) -> None:
    a, b = threading.Event(), threading.Event()
    threading.Thread(target=pump, args=(down, up, a), daemon=True).start()
    threading.Thread(target=pump, args=(up, down, b), daemon=True).start()
    a.wait()
    b.wait()
    up.close()
    down.close()


def read_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def handle_out(conn: socket.socket) -> None:
    ip, port = original_dst(conn)
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    up.connect((ip, port))
    up.sendall(HEADER)
    relay(conn, up)


def handle_in(conn: socket.socket) -> None:
    ip, port = original_dst(conn)
    if read_exact(conn, len(HEADER)) != HEADER:
        conn.close()
        return
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up.bind(("127.0.0.6", 0))
    up.connect((ip, port))
    relay(conn, up)


def listen(ip: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(64)
    return s


def run_relay(ip: str, port: int, handler) -> None:  # type: ignore[no-untyped-def]
    name_process("ew-sidecar")
    s = listen(ip, port)
    print("ready", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def serve(reply: int) -> None:
    s = listen("0.0.0.0", 8080)
    print("ready", flush=True)
    while True:
        conn, _ = s.accept()
        while conn.recv(65536):
            pass
        conn.sendall(b"r" * reply)
        conn.close()


def call(to: str, count: int, send: int) -> None:
    ip, port = to.rsplit(":", 1)
    for _ in range(count):
        s = socket.create_connection((ip, int(port)))
        s.sendall(b"q" * send)
        s.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := s.recv(65536):
            got += len(chunk)
        print(json.dumps({"client_port": s.getsockname()[1], "sent": send, "received": got}),
              flush=True)
        s.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("relay-out", "relay-in", "serve", "call"))
    p.add_argument("--to", default="")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--send", type=int, default=1000)
    p.add_argument("--reply", type=int, default=2000)
    a = p.parse_args()
    if a.what == "relay-out":
        run_relay("127.0.0.1", 15001, handle_out)
    elif a.what == "relay-in":
        run_relay("0.0.0.0", 15006, handle_in)
    elif a.what == "serve":
        serve(a.reply)
    else:
        call(a.to, a.count, a.send)


if __name__ == "__main__":
    sys.exit(main())
