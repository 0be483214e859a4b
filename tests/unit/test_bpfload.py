"""collector/bpfload.py without the kernel: map types decoded from bcc's descriptions as bcc
decodes them, per-CPU value counts. Loading in the child process is exercised by every lab test
of the socket probes and the drop probe (tests/lab/test_socket_probes*.py, test_policy_lab.py)."""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

import pytest

from collector.bpfload import LoadError, ctype_of, possible_cpus

DESCS = [
    "unsigned long long",
    ["conn_t", [["start_ns", "unsigned long long"], ["pid", "unsigned int"],
                ["sport", "unsigned short"], ["role", "unsigned char"],
                ["saddr", "unsigned char", [16]], ["comm", "char", [16]]], "struct"],
    ["packed_t", [["a", "unsigned char"], ["b", "unsigned long long"]], "struct_packed"],
    ["u_t", [["x", "unsigned int"], ["y", "unsigned long long"]], "union"],
    ["bits_t", [["lo", "unsigned int", 3], ["hi", "unsigned int", 29], ["z", "long"]], "struct"],
    ["outer_t", [["k", "int"], ["", [["p", "int"], ["q", "int"]], "struct"],
                 ["inner", [["r", "short"]], "struct"]], "struct"],
]


def layout(t: object) -> object:
    if not hasattr(t, "_fields_"):
        return ct.sizeof(t)  # type: ignore[arg-type]
    return [(f[0], getattr(t, f[0]).offset, getattr(t, f[0]).size) for f in t._fields_]  # type: ignore[attr-defined]


@pytest.mark.parametrize("desc", DESCS, ids=lambda d: d if isinstance(d, str) else d[0])
def test_types_decode_to_the_layout_bcc_gives_them(desc: object) -> None:
    bcc = pytest.importorskip("bcc")
    ours, theirs = ctype_of(desc), bcc.BPF._decode_table_type(desc)
    assert ct.sizeof(ours) == ct.sizeof(theirs)
    assert layout(ours) == layout(theirs)


def test_anonymous_members_are_reachable_by_name() -> None:
    t = ctype_of(DESCS[-1])
    v = t()
    v.p, v.q, v.inner.r = 1, 2, 3
    assert (v.p, v.q, v.inner.r) == (1, 2, 3)


def test_an_unknown_description_is_an_error_naming_it() -> None:
    with pytest.raises(LoadError, match="weird"):
        ctype_of(["t", [["a", "int", "weird"]]])


@pytest.mark.parametrize(("text", "n"), [("0-1\n", 2), ("0\n", 1), ("0-3,8-11\n", 12), ("0,2\n", 3)])
def test_possible_cpus_counts_up_to_the_highest(tmp_path: Path, text: str, n: int) -> None:
    f = tmp_path / "possible"
    f.write_text(text)
    assert possible_cpus(str(f)) == n
