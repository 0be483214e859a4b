"""Workload of the socket probe lab tests (a script, run inside the test namespaces; no tests).

    serve   --ip IP [--port P]            comm `ewp-srv`; prints `ready` once it listens
    connect --ip IP [--port P] [--count N] [--size-base B] [--reset I,J] [--hold]
                                          comm `ewp-cli`; one JSON truth line per connection

Protocol per connection: the client sends a 12-byte header (payload length, response length,
flags; network order) and the payload, then shuts down its sending side; the server reads to
EOF, then answers with the response bytes and closes, or (flag 1) resets the connection with
SO_LINGER 0. The truth lines hold what the client wrote and read, exactly.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import struct
import sys

HEADER = struct.Struct("!III")
FLAG_RESET = 1


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def read_to_eof(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def serve(args: argparse.Namespace) -> None:
    set_comm("ewp-srv")
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.ip, args.port))
    srv.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        request = read_to_eof(conn)
        _, resp_len, flags = HEADER.unpack_from(request)
        if flags & FLAG_RESET:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(b"r" * resp_len)
        conn.close()


def connect(args: argparse.Namespace) -> None:
    set_comm("ewp-cli")
    resets = {int(x) for x in args.reset.split(",") if x}
    for i in range(args.count):
        payload_len, resp_len = args.size_base + 517 * i, 2 * args.size_base + 733 * i
        flags = FLAG_RESET if i in resets else 0
        s = socket.socket()
        s.bind((args.client_ip, 0)) if args.client_ip else None
        port = s.getsockname()[1]
        sent = received = 0
        outcome = "ok"
        try:
            s.connect((args.ip, args.port))
            port = s.getsockname()[1]
            header = HEADER.pack(payload_len, resp_len, flags)
            if args.hold:  # a long-lived connection: half now, the rest after a line on stdin
                s.sendall(header)
                sent += len(header)
                print(json.dumps({"client_port": port, "held_bytes_c2s": sent}), flush=True)
                sys.stdin.readline()
            body = header[sent:] + b"q" * payload_len
            s.sendall(body)
            sent += len(body)
            s.shutdown(socket.SHUT_WR)
            while True:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if not data:
                    break
                received += len(data)
        except ConnectionRefusedError:
            outcome = "refused"
        finally:
            s.close()
        print(json.dumps({"client_port": port, "bytes_c2s": sent, "bytes_s2c": received,
                          "outcome": outcome}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("serve", "connect"))
    p.add_argument("--ip", required=True)
    p.add_argument("--client-ip", default="")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--size-base", type=int, default=1000)
    p.add_argument("--reset", default="")
    p.add_argument("--hold", action="store_true")
    args = p.parse_args()
    serve(args) if args.mode == "serve" else connect(args)


if __name__ == "__main__":
    main()
