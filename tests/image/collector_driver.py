"""Runs INSIDE the image (tests/image/test_image.py mounts this folder at /probe): starts
`eastwest collector` with its socket probes, makes a known workload, prints what it saw as JSON.

Workload: connects to a closed port on 127.0.0.1 of the container's own network namespace,
first to a warm-up port until a record of it shows the probes are attached, then exactly
`count` times to the measured port. Out (stdout, one JSON object): the records of the measured
port, the container's network namespace inode, the collector's exit status and stderr tail.

Usage: python3 /probe/collector_driver.py COUNT WARMUP_PORT PORT [COLLECTOR FLAG...]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def connect_refused(port: int) -> None:
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", port))


def main() -> int:
    count, warm_port, port = (int(a) for a in sys.argv[1:4])
    netns = os.stat("/proc/self/ns/net").st_ino
    proc = subprocess.Popen(
        ["eastwest", "collector", "--no-vxlan", "--stdout", "--interval", "1",
         "--spool-dir", "/tmp/spool", "--collector-id", "image-test", *sys.argv[4:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, list[dict]] = {warm_port: [], port: []}
    lock = threading.Lock()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            srv = (rec.get("server") or {}).get("port")
            if srv in seen and rec.get("netns") == netns:
                with lock:
                    seen[srv].append(rec)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    attached = False
    deadline = time.monotonic() + 120  # bcc compiles the probes first
    while time.monotonic() < deadline and proc.poll() is None:
        connect_refused(warm_port)
        time.sleep(0.5)
        with lock:
            if seen[warm_port]:
                attached = True
                break
    if attached:
        for _ in range(count):
            connect_refused(port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if len([r for r in seen[port] if r.get("final")]) >= count:
                    break
            time.sleep(0.2)
        time.sleep(2)  # a duplicate would arrive now
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    reader.join(5)
    err = proc.stderr.read() if proc.stderr else ""
    with lock:
        out = {"attached": attached, "netns": netns, "exit": rc, "stderr": err[-3000:],
               "records": seen[port]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
