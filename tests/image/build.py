"""The image build of tests/image, run as a user runs it (scripts/build-image.sh), and started
early: a first build takes ~90 s, mostly waiting on dpkg, pip and podman, so when the suite
collects tests/image, tests/conftest.py starts the build in the background at collection and
the image tests, which run later, wait for that same build (`result`). Run alone, or when the
early start was not possible (no root, tools missing: the fixture then fails naming them), the
build runs when the first image test needs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ARTIFACTS, REPO

LOGS = ARTIFACTS / "image"
TOOLS = ("podman", "mmdebstrap", "runc")
TIMEOUT_S = 1700


@dataclass
class Build:
    proc: subprocess.Popen[bytes]
    started: float
    log: Path


_early: Build | None = None


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not shutil.which(t)]


def start(*args: str) -> Build:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"build-{os.getpid()}-{time.monotonic_ns()}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "scripts/build-image.sh", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env=os.environ | {"PYTHON": sys.executable})
    return Build(proc, time.monotonic(), log)


def start_early() -> None:
    """Start the first build now (at collection), if it can run here."""
    global _early
    if _early is None and os.geteuid() == 0 and not missing_tools():
        _early = start()


def wait(b: Build) -> tuple[float, str]:
    """The build's seconds and output (also appended to test-artifacts/image/build.log);
    asserts it succeeded."""
    try:
        rc = b.proc.wait(max(1.0, TIMEOUT_S - (time.monotonic() - b.started)))
    except subprocess.TimeoutExpired:
        b.proc.kill()
        rc = b.proc.wait()
    took = time.monotonic() - b.started
    out = b.log.read_text(errors="replace")
    b.log.unlink(missing_ok=True)
    with open(LOGS / "build.log", "a") as f:
        f.write(f"=== build-image.sh: exit {rc} in {took:.1f} s\n{out}\n")
    assert rc == 0, f"scripts/build-image.sh exited {rc}:\n{out[-4000:]}"
    return took, out


def result() -> tuple[float, str, bool]:
    """The first build of this run: the early one if it was started (its seconds, output, and
    True), else one run now."""
    global _early
    if _early is not None:
        b, _early = _early, None
        return (*wait(b), True)
    return (*wait(start()), False)


def build(*args: str) -> tuple[float, str]:
    """One more build, run now (e.g. the second build of the cache test)."""
    return wait(start(*args))
