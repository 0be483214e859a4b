"""The columnar correlator's C core (aggregator/correlate_native*.c): build spec, loader, layouts.

Stage: correlation (set-up builds it, run time loads it). In: the C sources beside this file.
Out: the checked library (`load()`), its ctypes structures (`Input`, `Tables`, mirroring
correlate_native.h; their sizes are checked against the build) and its column layouts (`OUT`,
`RU`, `WL`, `LD`, `LV`: name -> index, read from the library itself, so Python and C can never
disagree on an order silently).

Built like the other helpers (eastwest/native_build.py): `python -m aggregator.correlate_columns`
(scripts/setup-venv.sh); `EASTWEST_CORRELATE_NATIVE=0` refuses it (the reference correlator
runs instead), a path loads another build (tests: a sanitizer build).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

from eastwest import native_build

HERE = Path(__file__).resolve().parent
ENV = "EASTWEST_CORRELATE_NATIVE"
SOURCES = ("correlate_native.h", "correlate_native.c", "correlate_native_join.c",
           "correlate_native_rows.c", "correlate_native_load.c")
SPEC = native_build.NativeSpec(
    name="ewcorrelate", here=HERE, sources=SOURCES, env=ENV,
    build_module="aggregator.correlate_columns",
    cflags=("-O2", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Wextra", "-fvisibility=default"))

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

# error codes of correlate_native.h
E_STATE, E_OVERFLOW, E_IDS, E_NOMEM, E_INPUT = -1, -2, -3, -4, -5


class Tables(ctypes.Structure):
    """`ew_tables`: the identity and string tables (pointers into registry arrays)."""

    _fields_ = [("n_idents", _i64), ("id_order", _p), ("id_wh", _p), ("id_wid", _p),
                ("id_static", _p), ("id_labels", _p), ("labels", _p), ("n_strs", _i64),
                ("str_off", _p), ("str_mp", _p)]


INPUT_ARRAYS = (
    "order", "start", "end", "final", "observer", "connect", "incomplete", "knows",
    "link_local", "family", "protocol", "cip", "cport", "sip", "sport", "scope", "b_c2s",
    "b_s2c", "p_c2s", "p_s2c", "retrans", "resets", "has_p_c2s", "has_p_s2c", "has_rtt",
    "has_pid", "has_netns", "rtt_min", "rtt_avg", "rtt_max", "pid", "netns", "comm",
    "container", "collector", "vni", "outer_src", "outer_dst", "vtep_src_host",
    "vtep_dst_host", "tunnel_type", "cand_client", "cand_server", "svc_ip", "svc_port", "svc_rank",
    "reason")


class Input(ctypes.Structure):
    """`ew_input`: one batch, column by column (aggregator/correlate_input.py fills it)."""

    _fields_ = [("n", _i64), *((name, _p) for name in INPUT_ARRAYS), ("n_ids", _i64),
                ("ids", _p), ("at", _i64)]


LM_NCOL = 7  # a volume minute: minute, then the 6 counters
# the load matrices' columns, in the order aggregator/correlate_core.py writes them
LD_NAMES = ("PROTOCOL", "FAMILY", "CIP", "CPORT", "SIP", "SPORT", "SCOPE", "CLIENT", "SERVER",
            "LINK_LOCAL", "UNTIL", "CPROC", "CPID", "CCOMM", "CNETNS", "CCONTAINER", "CCOLLECTOR",
            "SPROC", "SPID", "SCOMM", "SNETNS", "SCONTAINER", "SCOLLECTOR", "VNI", "VTEP_SRC",
            "VTEP_DST", "VTEP_SRC_HOST", "VTEP_DST_HOST", "TUNNEL_TYPE", "NVIEWS", "NVOLS",
            "SVC_IP", "SVC_PORT", "SVC_RANK")
LV_NAMES = ("OBSERVER", "COLLECTOR", "START", "END", "FINAL", "B_C2S", "B_S2C", "P_C2S", "P_S2C",
            "RETRANS", "RESETS", "CONNECT", "RTT_MIN", "RTT_AVG", "RTT_MAX", "INCOMPLETE",
            "REASON")


@dataclass(frozen=True)
class Layout:
    """Column name -> index of each output/load matrix, as the library defines them."""

    out: dict[str, int]
    ru: dict[str, int]
    wl: dict[str, int]
    ld: dict[str, int]
    lv: dict[str, int]


def _declare(lib: ctypes.CDLL) -> None:
    def fn(name: str, res: object, *args: object) -> None:
        f = getattr(lib, name)
        f.restype, f.argtypes = res, list(args)

    fn("ew_source_digest", ctypes.c_char_p)
    fn("ew_corr_layout", ctypes.c_char_p)
    fn("ew_corr_sizes", None, _p)
    fn("ew_corr_new", _p)
    fn("ew_corr_free", None, _p)
    fn("ew_corr_configure", None, _p, _i64, _i64, _i64, _i64)
    fn("ew_corr_error", ctypes.c_char_p, _p)
    fn("ew_corr_reset", None, _p)
    fn("ew_corr_info", None, _p, _p)
    fn("ew_corr_plan", _i64, _p, ctypes.POINTER(Input), ctypes.POINTER(Tables))
    fn("ew_corr_rows", _i64, _p, _i32, _i64, _i64, ctypes.POINTER(Tables), _p, _p, _p, _p)
    fn("ew_corr_blob", None, _p, _p)
    fn("ew_corr_rollups", _i64, _p, _p, _i64)
    fn("ew_corr_workloads", _i64, _p, ctypes.POINTER(Tables), _p, _i64)
    fn("ew_corr_commit", _i64, _p)
    fn("ew_corr_rollback", _i32, _p)
    fn("ew_corr_prune", _i64, _p)
    fn("ew_corr_settled", _i64, _p, _p, _i64)
    fn("ew_corr_nsettled", _i64, _p)
    fn("ew_corr_select_all", _i64, _p)
    fn("ew_corr_select_key", _i64, _p, _p)
    fn("ew_corr_load", _i64, _p, _i64, _p, _p, _p, _i64, _p, _p, _i64, _p)
    fn("ew_corr_scan_extra", _i64, _i64, _p, _p, _p, _p, _p)
    fn("ew_corr_drop_key", _i64, _p, _p)
    fn("ew_corr_used", _i64, _p, _p, _p, _p)
    fn("ew_corr_remap", _i64, _p, _p, _p, _p)
    fn("ew_corr_key_seq", _i64, _p, _p, _i64)


def _layout(lib: ctypes.CDLL) -> Layout:
    parts = dict(part.split(":", 1) for part in lib.ew_corr_layout().decode().split(";"))
    return Layout(**{k: {n: i for i, n in enumerate(v.strip(",").split(","))}
                     for k, v in parts.items()})


_lock = threading.Lock()
_loaded: list[tuple[ctypes.CDLL | None, Layout | None, str]] = []


def load() -> tuple[ctypes.CDLL | None, Layout | None, str]:
    """(the checked library, its layout, why not). Loaded once per process."""
    with _lock:
        if not _loaded:
            lib, why = SPEC.open(_declare)
            layout = None
            if lib is not None:
                sizes = (ctypes.c_int64 * 6)()
                lib.ew_corr_sizes(sizes)
                if (sizes[0], sizes[1]) != (ctypes.sizeof(Input), ctypes.sizeof(Tables)):
                    lib, why = None, "the library's input layout differs from correlate_native.py"
                else:
                    layout = _layout(lib)
                    if (tuple(layout.ld), tuple(layout.lv)) != (LD_NAMES, LV_NAMES):
                        lib, layout = None, None
                        why = "the library's load layout differs from correlate_native.py"
            _loaded.append((lib, layout, why or ""))
    return _loaded[0]


def refused() -> bool:
    """True when a library exists but was refused (stale, foreign): worth a warning."""
    lib, _, why = load()
    return lib is None and SPEC.is_refusal(why)


def struct_sizes(lib: ctypes.CDLL) -> dict[str, int]:
    """The sizes of the C structures (bytes): connection, view, volume minute, index slot."""
    sizes = (ctypes.c_int64 * 6)()
    lib.ew_corr_sizes(sizes)
    return {"conn": sizes[2], "view": sizes[3], "volume": sizes[4], "slot": sizes[5]}
