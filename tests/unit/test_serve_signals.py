"""`eastwest aggregator` stops cleanly on Ctrl-C (SIGINT) and on SIGTERM (systemd, Kubernetes):
exit 0 and no traceback, after uvicorn's graceful shutdown (which re-raises the signal it stopped
on: aggregator/serve.py ends it there). A real process on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.servers import free_port


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_aggregator_exits_0_on_a_stop_signal(tmp_path, sig):
    port = free_port()
    env = os.environ | {"EASTWEST_INGEST_TOKEN": "i" * 32, "EASTWEST_READ_TOKEN": "r" * 32}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eastwest", "aggregator", "--listen", f"127.0.0.1:{port}",
         "--data", str(tmp_path / "data")], env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("the aggregator did not come up in 60 s")
        proc.send_signal(sig)
        rc = proc.wait(60)
        err = proc.stderr.read() if proc.stderr else ""
        assert rc == 0, err
        assert "Traceback" not in err and "interrupted" not in err, err
        assert (tmp_path / "data").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
