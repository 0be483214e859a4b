"""`eastwest demo` runs its lab with Kubernetes-style Services by default (issue 16), where the
lab can have them; `--no-services` turns them off; asked for where the lab cannot, `Lab.up`
refuses (tests/lab/test_lab_services.py)."""

from __future__ import annotations

import pytest

from eastwest.cli import build_parser
from eastwest.cli.demo import _services


@pytest.mark.parametrize(("argv", "want"), [
    ([], True),
    (["--no-services"], False),
    (["--services"], True),
    (["--ip-family", "ipv6"], False),   # by default only where the lab can have them
    (["--hosts", "2"], False),
    (["--hosts", "2", "--services"], True),  # asked for: Lab.up says why not
    (["--pods-per-host", "2"], False),  # 3 x 2 pods cannot place two backends of two services
    (["--hosts", "4", "--pods-per-host", "3"], True),
])
def test_services_by_default_where_the_lab_can_have_them(argv, want, capsys):
    args = build_parser().parse_args(["demo", *argv])
    assert _services(args) is want
    if not want and "--no-services" not in argv:
        assert "no Services in this lab" in capsys.readouterr().err
