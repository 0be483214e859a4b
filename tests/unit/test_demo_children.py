"""`eastwest demo`'s children (tests/lab and the demo start them through `Stack`) stop when the
process that started them dies, even by kill -9: a real `eastwest aggregator` started by a
script that is then killed -9 gets SIGTERM (PR_SET_PDEATHSIG) and stops, leaving its port free;
nothing keeps running that nobody can stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.servers import free_port

STARTER = """
import sys, time
from eastwest.cli.demo import Stack
s = Stack(sys.argv[1], sys.argv[2])
s.start_aggregator()
print(s.aggregator.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child may wait for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_the_aggregator_stops_when_the_demo_that_started_it_is_killed(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "data"), listen],
                               cwd=REPO, stdout=subprocess.PIPE, text=True)
    agg = 0
    try:
        assert starter.stdout is not None
        agg = int(starter.stdout.readline())
        time.sleep(1.0)
        assert running(agg), "the aggregator did not stay up while its starter lived"
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        deadline = time.monotonic() + 30
        while running(agg):
            assert time.monotonic() < deadline, f"aggregator {agg} still runs 30 s after its starter died"
            time.sleep(0.1)
        log = (tmp_path / "data" / "logs" / "aggregator.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-2000:]
        port = int(listen.rsplit(":", 1)[1])
        with socket.socket() as s:  # nothing listens on its port any more
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {listen}"
        with socket.socket() as s:  # and a restarted aggregator can take it: like uvicorn, with
            # SO_REUSEADDR, as the connections of the readiness checks may be in TIME_WAIT
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        if agg and running(agg):
            os.kill(agg, signal.SIGKILL)
