"""`eastwest demo` runs its lab with Kubernetes-style Services by default, where the lab can
have them (IPv4, 3 or more hosts, enough pods: the plan with Services is not refused), else
without; `--no-services` turns them off, `--services` asks for them (where the lab cannot have
them, `Lab.up` refuses naming why: tests/lab/test_lab_services.py). A NodePort call's halves
are held off the map until joined (tests/unit/test_graph_nodeport_hold.py; the demo itself:
tests/web/test_demo_dashboard.py)."""

from __future__ import annotations

import pytest

from eastwest.cli import build_parser
from eastwest.cli.demo import _services


@pytest.mark.parametrize(("argv", "want"), [
    ([], True),
    (["--mesh"], True),
    (["--no-services"], False),
    (["--services"], True),
    (["--hosts", "4"], True),
    (["--pods-per-host", "4"], True),
    # where the lab cannot have them, the default is without; asked for, Lab.up says why not
    (["--hosts", "2"], False),
    (["--ip-family", "ipv6"], False),
    (["--ip-family", "dual"], False),
    (["--pods-per-host", "2"], False),  # 3 x 2 pods: no service on two hosts
    (["--hosts", "2", "--services"], True),
])
def test_services_by_default_where_the_lab_can_have_them(argv, want):
    args = build_parser().parse_args(["demo", *argv])
    assert _services(args) is want


@pytest.mark.parametrize(("argv", "want"), [([], []), (["--mesh"], ["mesh"]),
                                            (["--services", "--mesh"], ["mesh"])])
def test_the_mesh_pattern_only_when_asked(argv, want):
    from eastwest.cli.demo import _patterns

    assert _patterns(build_parser().parse_args(["demo", *argv])) == want
