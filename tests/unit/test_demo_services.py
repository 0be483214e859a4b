"""`eastwest demo` runs its lab with Kubernetes-style Services only when asked (`--services`):
a NodePort call's two halves are joined only once the middle host's record arrives (issue 16),
and the demo's live map would show them as extra nodes meanwhile. Asked for where the lab cannot have them, `Lab.up` refuses
(tests/lab/test_lab_services.py)."""

from __future__ import annotations

import pytest

from eastwest.cli import build_parser
from eastwest.cli.demo import _services


@pytest.mark.parametrize(("argv", "want"), [
    ([], False),
    (["--no-services"], False),
    (["--services"], True),
    (["--hosts", "2", "--services"], True),  # asked for: Lab.up says why not
])
def test_services_only_when_asked(argv, want):
    args = build_parser().parse_args(["demo", *argv])
    assert _services(args) is want


@pytest.mark.parametrize(("argv", "want"), [([], []), (["--mesh"], ["mesh"]),
                                            (["--services", "--mesh"], ["mesh"])])
def test_the_mesh_pattern_only_when_asked(argv, want):
    from eastwest.cli.demo import _patterns

    assert _patterns(build_parser().parse_args(["demo", *argv])) == want
