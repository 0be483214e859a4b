"""`eastwest aggregator --listen`: the socket is bound before the store opens and before
"serving" is printed (aggregator/serve.py). A port in use is one line naming the flag and how
to find its holder, exit 1 (a runtime error: eastwest/cli/__init__.py), with nothing opened; an
address not on this host is a usage error (2); port 0 serves on the port it got, and says it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from aggregator.serve import bind
from eastwest.cli import main
from eastwest.errors import ConfigError


@pytest.fixture
def no_tokens(monkeypatch):
    for name in ("EASTWEST_INGEST_TOKEN", "EASTWEST_READ_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_a_port_in_use_is_one_line_before_anything_is_served(tmp_path, capsys, no_tokens):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["aggregator", "--listen", f"127.0.0.1:{port}", "--data",
                   str(tmp_path / "data"), "--insecure-open"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert err == (f"eastwest aggregator: --listen 127.0.0.1:{port}: address already in use "
                   f"(another aggregator? `ss -ltnp 'sport = :{port}'`)\n")
    assert not (tmp_path / "data").exists()  # the store was not opened


def test_bind_names_the_flag_for_an_address_not_on_this_host():
    with pytest.raises(ConfigError) as info:
        bind("192.0.2.1", 0).close()  # TEST-NET-1: on no interface here (nothing is sent)
    assert str(info.value) == "--listen='192.0.2.1:0': not an address of this host"


def test_port_0_serves_on_the_port_it_got_and_says_which(tmp_path):
    env = os.environ | {"EASTWEST_INGEST_TOKEN": "i" * 32, "EASTWEST_READ_TOKEN": "r" * 32}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eastwest", "aggregator", "--listen", "127.0.0.1:0", "--data",
         str(tmp_path / "data")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.match(r"eastwest aggregator: serving http://127\.0\.0\.1:(\d+) ", line)
        assert found and int(found[1]) != 0, line
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{found[1]}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
