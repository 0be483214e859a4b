"""scripts/build-image.sh's command line, without building anything: its --help names every
option the script accepts, and a wrong option or value is one clear line and exit 1 before
anything is checked or fetched. The build itself: tests/image/test_image.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "build-image.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=30)


def test_help_names_every_option_the_script_accepts():
    r = run("--help")
    assert r.returncode == 0 and r.stderr == ""
    accepted = set(re.findall(r"^\s+(?:-h\|)?(--[a-z-]+)\)", SCRIPT.read_text(), flags=re.M))
    assert accepted == {"--save", "--format", "--no-web", "--rebuild-base", "--mirror",
                        "--cache", "--help"}
    documented = set(re.findall(r"^  (--[a-z-]+)", r.stdout, flags=re.M))
    assert accepted - {"--help"} <= documented, accepted - documented
    for word in ("ghcr.io/eastwest/eastwest:<version", "mmdebstrap", "--network none",
                 "kind load image-archive", "ctr -n k8s.io images import"):
        assert word in r.stdout, word


@pytest.mark.parametrize(("args", "message"), [
    (("--bogus",), "unknown option '--bogus' (see --help)"),
    (("--save",), "--save needs a file name"),
    (("--format", "zip"), "--format 'zip': use oci-archive or docker-archive"),
    (("--cache",), "--cache needs a folder"),
])
def test_a_wrong_option_is_one_line_and_exit_1(args, message):
    r = run(*args)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"eastwest image: error: {message}\n"
