"""BPF programs compiled and attached in a short-lived child process, used from this one.

Stage: the kernel boundary shared by the socket probes (collector/probes/kernel.py) and the
drop probe (collector/drops/kernel.py).
In: the program's C text. Out: `LoadedProgram`: its maps (`BpfMap`: fd, ctypes key and value
types, lookups, updates, batches) and the file descriptors that hold its attachments.

Why a child: bcc compiles with clang/LLVM inside the process that calls `BPF(text=...)`. The
compiler's heap (~65 MB here) and the pages of libLLVM/libclang-cpp it touched (~60 MB more)
would stay in the collector's RSS for its whole life, although the program is compiled once.
So `load()` runs this file as a fresh interpreter (`python -I collector/bpfload.py`), which
compiles and loads the program with bcc, attaches its `TRACEPOINT_PROBE`s and
`RAW_TRACEPOINT_PROBE`s (bcc's auto-attach), and hands every map fd and every attachment fd
(the tracepoints' perf event fds, the raw tracepoints' fds) to this process over a Unix socket
(SCM_RIGHTS, unix(7)), with a JSON description of the maps (bcc's own key/leaf type
descriptions, decoded here as bcc decodes them). The child then leaves with `os._exit`, so that
bcc's exit handler does not detach what it attached: the kernel keeps a program attached as long
as one process holds the attachment's fd (kernel/events/core.c perf_event_release_kernel,
kernel/bpf/syscall.c bpf_raw_tp_link_release), and a map alive as long as a program or an fd
refers to it. Closing those fds (`LoadedProgram.close`) detaches.

This process then needs only `libbcc_bpf.so` (bcc's libbpf part: map syscalls, ring buffers),
never `libbcc.so` and its compiler.
"""

from __future__ import annotations

import ctypes as ct
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH = 5, 6, 10
PERCPU_TYPES = (BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH)
MAX_MESSAGE = 1 << 20  # the maps' description; ~10 KB for the socket probes
MAX_FDS = 253  # SCM_MAX_FD (include/net/scm.h)
RING_CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_int)  # ring_buffer_sample_fn

_C_TYPES: dict[str, Any] = {  # bcc's str2ctype (bcc/__init__.py)
    "_Bool": ct.c_bool, "char": ct.c_char, "wchar_t": ct.c_wchar, "unsigned char": ct.c_ubyte,
    "short": ct.c_short, "unsigned short": ct.c_ushort, "int": ct.c_int, "unsigned int": ct.c_uint,
    "long": ct.c_long, "unsigned long": ct.c_ulong, "long long": ct.c_longlong,
    "unsigned long long": ct.c_ulonglong, "float": ct.c_float, "double": ct.c_double,
    "long double": ct.c_longdouble, "__int128": ct.c_int64 * 2,
    "unsigned __int128": ct.c_uint64 * 2,
}


class LoadError(Exception):
    """The program did not compile, load or attach (the child's message)."""


def ctype_of(desc: Any) -> Any:
    """A ctypes type from bcc's JSON type description (bcc's BPF._decode_table_type):
    a name, or [name, [[field, type(, [dim] | bits | kind)]...](, union|struct|struct_packed)]."""
    if isinstance(desc, str):
        return _C_TYPES[desc]
    anon: list[str] = []
    fields: list[tuple[Any, ...]] = []
    for f in desc[1]:
        if len(f) == 2:
            fields.append((f[0], ctype_of(f[1])))
        elif len(f) == 3 and isinstance(f[2], list):
            fields.append((f[0], ctype_of(f[1]) * f[2][0]))
        elif len(f) == 3 and isinstance(f[2], int):
            fields.append((f[0], ctype_of(f[1]), f[2]))
        elif len(f) == 3 and f[2] in ("union", "struct", "struct_packed"):
            name = f[0] or f"__anon{len(anon)}"
            if not f[0]:
                anon.append(name)
            fields.append((name, ctype_of(f)))
        else:
            raise LoadError(f"unknown BPF type description {f!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ct.Union if kind == "union" else ct.Structure
    body: dict[str, Any] = {"_anonymous_": anon, "_fields_": fields}
    if kind == "struct_packed":
        body["_pack_"] = 1
    return type(str(desc[0]), (base,), body)


def _lib() -> ct.CDLL:
    lib = ct.CDLL("libbcc_bpf.so.0", use_errno=True)
    u32p = ct.POINTER(ct.c_uint32)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "bpf_lookup_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
        "bpf_update_elem": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_ulonglong]),
        "bpf_delete_elem": (ct.c_int, [ct.c_int, ct.c_void_p]),
        "bpf_get_next_key": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
        "bpf_lookup_and_delete": (ct.c_int, [ct.c_int, ct.c_void_p, ct.c_void_p]),
        "bpf_lookup_batch": (ct.c_int, [ct.c_int, u32p, u32p, ct.c_void_p, ct.c_void_p,
                                        ct.c_void_p]),
        "bpf_lookup_and_delete_batch": (ct.c_int, [ct.c_int, u32p, u32p, ct.c_void_p,
                                                   ct.c_void_p, ct.c_void_p]),
        "bpf_new_ringbuf": (ct.c_void_p, [ct.c_int, RING_CB, ct.c_void_p]),
        "bpf_add_ringbuf": (ct.c_int, [ct.c_void_p, ct.c_int, RING_CB, ct.c_void_p]),
        "bpf_poll_ringbuf": (ct.c_int, [ct.c_void_p, ct.c_int]),
        "bpf_consume_ringbuf": (ct.c_int, [ct.c_void_p]),
        "bpf_free_ringbuf": (None, [ct.c_void_p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_LIB: ct.CDLL | None = None


def lib() -> ct.CDLL:
    """libbcc_bpf.so.0 with the signatures used here (loaded once)."""
    global _LIB
    if _LIB is None:
        try:
            _LIB = _lib()
        except OSError as exc:
            raise LoadError(f"libbcc_bpf.so.0 not loadable ({exc}): apt-get install "
                            "libbpfcc") from exc
    return _LIB


def _errno(res: int) -> int:
    return ct.get_errno() or -res


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many values a per-CPU map holds per key: the kernel's possible CPUs ("0-3,8")."""
    with open(path) as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


@dataclass
class BpfMap:
    """One map of a loaded program, by fd: bcc's Table operations this collector uses."""

    name: str
    fd: int
    map_type: int
    max_entries: int
    Key: Any
    Leaf: Any

    @property
    def map_fd(self) -> int:  # bcc's name
        return self.fd

    def _value_type(self) -> Any:
        if self.map_type in PERCPU_TYPES:  # each CPU's value, 8-byte aligned (kernel/bpf/syscall.c)
            size = (ct.sizeof(self.Leaf) + 7) // 8 * 8
            return (ct.c_char * size) * possible_cpus()
        return self.Leaf

    def __getitem__(self, key: Any) -> Any:
        value = self._value_type()()
        if lib().bpf_lookup_elem(self.fd, ct.byref(key), ct.byref(value)) != 0:
            raise KeyError(key)
        if self.map_type in PERCPU_TYPES:
            return [self.Leaf.from_buffer_copy(bytes(v)[:ct.sizeof(self.Leaf)]) for v in value]
        return value

    def __setitem__(self, key: Any, leaf: Any) -> None:
        res = lib().bpf_update_elem(self.fd, ct.byref(key), ct.byref(leaf), 0)
        if res != 0:
            err = _errno(res)
            raise OSError(err, f"update of BPF map {self.name}: {os.strerror(err)}")

    def __delitem__(self, key: Any) -> None:
        if lib().bpf_delete_elem(self.fd, ct.byref(key)) != 0:
            raise KeyError(key)

    def percpu_sum(self, index: int) -> int:
        """The sum over CPUs of a per-CPU array's u64 counter at `index`."""
        return sum(int.from_bytes(bytes(v)[:8], sys.byteorder)
                   for v in self[ct.c_int(index)])  # type: ignore[attr-defined]

    def keys(self) -> Iterator[Any]:
        key, nxt = self.Key(), self.Key()
        if lib().bpf_get_next_key(self.fd, None, ct.byref(nxt)) != 0:
            return
        while True:
            key = self.Key.from_buffer_copy(nxt)
            yield key
            if lib().bpf_get_next_key(self.fd, ct.byref(key), ct.byref(nxt)) != 0:
                return

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in list(self.keys()):
            try:
                out.append((k, self[k]))
            except KeyError:  # deleted meanwhile
                continue
        return out

    def batch(self, *, delete: bool) -> tuple[bytes, bytes, int]:
        """Every entry with BPF_MAP_LOOKUP(_AND_DELETE)_BATCH (kernel/bpf/hashtab.c
        htab_map_lookup_batch): the keys, the values, how many. OSError when the kernel has no
        batch operations for this map."""
        call = lib().bpf_lookup_and_delete_batch if delete else lib().bpf_lookup_batch
        ksize, vsize, cap = ct.sizeof(self.Key), ct.sizeof(self.Leaf), self.max_entries
        keys = (ct.c_char * (cap * ksize))()
        values = (ct.c_char * (cap * vsize))()
        kptr, vptr = ct.addressof(keys), ct.addressof(values)
        in_batch, out_batch, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        total, first = 0, True
        while total < cap:
            count.value = cap - total
            res = call(self.fd, None if first else ct.byref(in_batch), ct.byref(out_batch),
                       kptr + ksize * total, vptr + vsize * total, ct.byref(count))
            total += count.value
            if res != 0:
                err = _errno(res)
                if err == errno.ENOENT:  # the end of the map
                    break
                raise OSError(err, f"batch read of BPF map {self.name}: {os.strerror(err)}")
            first, in_batch.value = False, out_batch.value
        return ct.string_at(kptr, total * ksize), ct.string_at(vptr, total * vsize), total

    def lookup_and_delete(self, key: Any) -> Any | None:
        """BPF_MAP_LOOKUP_AND_DELETE_ELEM: the value taken out, None when the key is absent."""
        value = self.Leaf()
        if lib().bpf_lookup_and_delete(self.fd, ct.byref(key), ct.byref(value)) != 0:
            return None
        return value


@dataclass
class LoadedProgram:
    """A program loaded by the child: its maps by name, its attachments (tracepoint names)."""

    maps: dict[str, BpfMap]
    attached: list[str]
    fds: list[int]
    _rings: Any = None
    _callbacks: list[Any] = field(default_factory=list)

    def __getitem__(self, name: str) -> BpfMap:
        return self.maps[name]

    def memlock(self) -> int:
        """The kernel memory of the maps, as the kernel counts it (`memlock` of each map's
        /proc/self/fdinfo entry; 0 where the kernel does not say)."""
        total = 0
        for m in self.maps.values():
            try:
                text = open(f"/proc/self/fdinfo/{m.fd}").read()  # noqa: SIM115 - tiny file
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
        return total

    def open_ring_buffer(self, name: str, callback: Callable[[Any, int, int], int]) -> None:
        """libbpf's ring buffer consumer on map `name`: `callback(ctx, data, size)` per record,
        from `ring_buffer_poll`/`ring_buffer_consume` (bcc's API)."""
        cb = RING_CB(lambda ctx, data, size: callback(ctx, data, size))
        self._callbacks.append(cb)  # kept alive as long as libbpf may call it
        fd = self.maps[name].fd
        if self._rings is None:
            self._rings = lib().bpf_new_ringbuf(fd, cb, None)
            if not self._rings:
                raise LoadError(f"ring buffer {name} could not be opened")
        elif lib().bpf_add_ringbuf(self._rings, fd, cb, None) < 0:
            raise LoadError(f"ring buffer {name} could not be opened")

    def ring_buffer_poll(self, timeout_ms: int) -> None:
        if self._rings:
            lib().bpf_poll_ringbuf(self._rings, timeout_ms)

    def ring_buffer_consume(self) -> None:
        if self._rings:
            lib().bpf_consume_ringbuf(self._rings)

    def close(self) -> None:
        """Detach (the attachments' fds) and release the maps."""
        if self._rings:
            lib().bpf_free_ringbuf(self._rings)
            self._rings = None
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def load(text: str, what: str, timeout_s: float = 300.0) -> LoadedProgram:
    """Compile, load and attach `text` in a child process; its maps and attachments here.
    `what` names the program in errors ("the socket probes"). LoadError on any failure."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:  # whatever bcc prints goes to our stderr: our stdout may be the records (--stdout)
        out: Any = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out = subprocess.DEVNULL
    try:
        # its own session: a Ctrl-C at the terminal (SIGINT to the foreground process group)
        # stops the collector, which then stops cleanly once the load is over; it must not
        # kill the compiler half-way and turn a clean stop into a failed load
        proc = subprocess.Popen([sys.executable, "-I", __file__, str(child.fileno())],
                                stdin=subprocess.PIPE, stdout=out, pass_fds=(child.fileno(),),
                                start_new_session=True)
        child.close()
        try:
            proc.communicate(text.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise LoadError(f"{what}: the compiler process did not finish in {timeout_s:.0f} s") \
                from exc
        parent.settimeout(1.0)
        try:
            msg, fds, _, _ = socket.recv_fds(parent, MAX_MESSAGE, MAX_FDS)
        except (TimeoutError, OSError) as exc:
            raise LoadError(f"{what} did not load: the compiler process exited "
                            f"{proc.returncode} without an answer (its errors are above)") from exc
    finally:
        parent.close()
    try:
        info = json.loads(msg)
        if "error" in info:
            raise LoadError(f"{what} did not load: {info['error']}")
        maps = {}
        for i, m in enumerate(info["maps"]):
            maps[m["name"]] = BpfMap(m["name"], fds[i], m["type"], m["max_entries"],
                                     ctype_of(m["key"]), ctype_of(m["leaf"]))
        return LoadedProgram(maps, info["attached"], list(fds))
    except Exception:
        for fd in fds:
            os.close(fd)
        raise


def _child(sock_fd: int) -> None:  # pragma: no cover - runs as its own process, see load()
    """Compile and attach with bcc, send the maps and attachments, leave without cleanup."""
    sock = socket.socket(fileno=sock_fd)
    try:
        from bcc import BPF
        from bcc.libbcc import lib as bcc

        for name, res in (("bpf_num_tables", ct.c_size_t), ("bpf_table_name", ct.c_char_p),
                          ("bpf_table_fd_id", ct.c_int), ("bpf_table_type_id", ct.c_int),
                          ("bpf_table_max_entries_id", ct.c_ulonglong),
                          ("bpf_table_key_desc_id", ct.c_char_p),
                          ("bpf_table_leaf_desc_id", ct.c_char_p)):
            fn = getattr(bcc, name)
            fn.restype = res
            fn.argtypes = [ct.c_void_p] if name == "bpf_num_tables" else [ct.c_void_p,
                                                                          ct.c_size_t]
        b = BPF(text=sys.stdin.buffer.read())
        maps, fds = [], []
        for i in range(bcc.bpf_num_tables(b.module)):
            fd = bcc.bpf_table_fd_id(b.module, i)
            if fd < 0:
                continue
            maps.append({"name": bcc.bpf_table_name(b.module, i).decode(),
                         "type": bcc.bpf_table_type_id(b.module, i),
                         "max_entries": bcc.bpf_table_max_entries_id(b.module, i),
                         "key": json.loads(bcc.bpf_table_key_desc_id(b.module, i) or b'"int"'),
                         "leaf": json.loads(bcc.bpf_table_leaf_desc_id(b.module, i)
                                            or b'"int"')})
            fds.append(fd)
        attached = [tp.decode() for tp in b.tracepoint_fds] + \
                   [tp.decode() for tp in b.raw_tracepoint_fds]
        fds += list(b.tracepoint_fds.values()) + list(b.raw_tracepoint_fds.values())
        if len(fds) > MAX_FDS:
            raise LoadError(f"{len(fds)} maps and attachments, more than one message carries")
        socket.send_fds(sock, [json.dumps({"maps": maps, "attached": attached}).encode()], fds)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        sock.send(json.dumps({"error": str(exc) or type(exc).__name__}).encode()[:MAX_MESSAGE])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not bcc's atexit cleanup: it would detach what the parent now holds


if __name__ == "__main__":
    _child(int(sys.argv[1]))
