"""The native helper of the bulk VXLAN path: find, check and load `libewvxlan.so` (ctypes).

Stage: support for `pcapfile.py` (record walk), `bulk.py` (frame decoding), `scan.py` (a
capture file -> flow sessions in one pass) and `capture.py` (draining a live socket). In: the library built from `ewvxlan*.c` beside this
file by `python -m collector.vxlan.native_build` (scripts/setup-venv.sh runs it with the
machine's C compiler). Out: a `ctypes.CDLL` with typed functions, or None, with the reason in
`why_not()`: without the library every caller takes its pure Python / numpy path, which gives
the same records, only slower.

A library is loaded only if it was built from exactly the sources beside this file (a digest
compiled into it) and if it names the same column and row layouts as the Python side; a stale
or foreign build is refused, never half used. `EASTWEST_VXLAN_NATIVE=0` refuses it on purpose
(benchmarks, tests of the fallback); `EASTWEST_VXLAN_NATIVE=/path/lib.so` loads another build.
Importing this module imports neither numpy nor scapy.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from collector.vxlan.rows import ROW_FIELDS
from eastwest.native_build import NativeSpec

if TYPE_CHECKING:
    from collector.vxlan.packets import Policy

HERE = Path(__file__).resolve().parent
SOURCES = ("ewvxlan.h", "ewvxlan_walk.c", "ewvxlan_decode.c", "ewvxlan_flows.c",
           "ewvxlan_recv.c")
CFLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Wextra", "-fvisibility=default")
ENV = "EASTWEST_VXLAN_NATIVE"
SPEC = NativeSpec(name="ewvxlan", here=HERE, sources=SOURCES, cflags=CFLAGS, env=ENV,
                  build_module="collector.vxlan.native_build")

_lock = threading.Lock()
_state: dict[str, object] = {}


def source_digest() -> str:
    """CRC-32 of the compiler flags and the sources: what a build must have been made from."""
    return SPEC.source_digest()


def default_path() -> Path:
    """Where setup builds the library: inside the environment (venv), not in the source tree."""
    return SPEC.default_path()


def load() -> ctypes.CDLL | None:
    """The checked library, or None (see `why_not`). Loaded once per process."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
            _state["refused"] = _state["lib"] is None and SPEC.is_refusal(_state["why"])  # type: ignore[arg-type]
        return _state["lib"]  # type: ignore[return-value]


def why_not() -> str | None:
    load()
    return _state.get("why")  # type: ignore[return-value]


def refused() -> bool:
    """True when a library exists but was refused (stale, foreign, broken): worth a warning,
    unlike a machine without a compiler or `EASTWEST_VXLAN_NATIVE=0`."""
    load()
    return bool(_state.get("refused"))


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = SPEC.open(_declare)
    if lib is None:
        return None, why
    path = os.environ.get(ENV) or default_path()
    from collector.vxlan.packets import Decoded

    if lib.ew_columns().decode() != Decoded.native_columns():
        return None, f"{path} decodes other columns than packets.Decoded"
    if lib.ew_row_fields().decode() != ",".join(ROW_FIELDS):
        return None, f"{path} writes other session rows than rows.ROW_FIELDS"
    return lib, None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, u64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
    sigs = {
        "ew_source_digest": (ctypes.c_char_p, []),
        "ew_columns": (ctypes.c_char_p, []),
        "ew_row_fields": (ctypes.c_char_p, []),
        "ew_walk_new": (p, [p, i32, u64, i32, i32, i32, ctypes.c_uint32, u64]),
        "ew_walk_free": (None, [p]),
        "ew_walk_rewind": (None, [p]),
        "ew_walk_clone": (p, [p]),
        "ew_walk_error": (ctypes.POINTER(u64), [p]),
        "ew_walk_count": (i64, [p]),
        "ew_walk_index": (i64, [p, i64, p, p, p, p, p]),
        "ew_decode_columns": (None, [p, p, p, p, i64, p, i32, p]),  # ..., kinds, plain, cols
        "ew_scan_new": (p, []),
        "ew_scan_free": (None, [p]),
        "ew_scan_batch": (i32, [p, p, p, i32, i64, i64, i64, ctypes.POINTER(i64)]),  # kinds, plain
        "ew_scan_rows": (ctypes.POINTER(u64), [p]),
        "ew_scan_drops": (ctypes.POINTER(u64), [p]),
        "ew_recv_drain": (i32, [i32, p, i64, ctypes.POINTER(i64), p, p, p, ctypes.POINTER(i64),
                                i64, i64, i32]),
        "ew_ring_new": (p, [i32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                            ctypes.POINTER(i32)]),
        "ew_ring_free": (None, [p]),
        "ew_ring_drain": (i32, [p, p, i64, ctypes.POINTER(i64), p, p, p, ctypes.POINTER(i64),
                                i64, i32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def policy_args(policy: Policy) -> tuple[ctypes.Array, int]:
    """(the 65,536-byte port -> tunnel type table, plain) as the C functions take them."""
    table = (ctypes.c_uint8 * 65536).from_buffer_copy(policy.table())
    return table, int(policy.plain)
