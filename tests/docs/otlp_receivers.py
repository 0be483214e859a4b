"""The fake OTLP receivers (gRPC and HTTP) the docs' Tempo examples are pointed at, in a process
of their own: a gRPC server's threads in the test process would make every fork of it (each
example is a child process) inherit gRPC's state (an aborted child was seen). Prints
`GRPC_PORT HTTP_PORT` on one line once both listen; serves until stdin closes."""

from __future__ import annotations

import sys

from tests.unit.fake_otlp import FakeOtlpHttp, FakeTempo


def main() -> None:
    with FakeTempo() as grpc_rx, FakeOtlpHttp() as http_rx:
        print(grpc_rx.port, http_rx.server.server_address[1], flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
