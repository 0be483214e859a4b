"""UDP flow map entries decoded in bulk (numpy columns, as the collector reads 100,000 flows)
give exactly the states of the one-by-one ctypes decoder, on random bytes."""

from __future__ import annotations

import random

from collector.bpfload import ctype_of
from collector.probes.udpflow import decode, decode_many

KEY = ctype_of(["udp_key_t", [["sk", "unsigned long long"], ["ino", "unsigned long long"],
                              ["raddr", "unsigned char", [16]], ["rport", "unsigned short"],
                              ["family", "unsigned short"], ["pad", "unsigned int"]], "struct"])
LEAF = ctype_of(["udp_flow_t", [
    ["start_ns", "unsigned long long"], ["last_ns", "unsigned long long"],
    ["bytes_sent", "unsigned long long"], ["bytes_recv", "unsigned long long"],
    ["dgrams_sent", "unsigned long long"], ["dgrams_recv", "unsigned long long"],
    ["cgroup_id", "unsigned long long"], ["pid", "unsigned int"], ["netns", "unsigned int"],
    ["lport", "unsigned short"], ["lfamily", "unsigned short"], ["first", "unsigned char"],
    ["refused", "unsigned char"], ["connected", "unsigned char"], ["pad", "unsigned char"],
    ["laddr", "unsigned char", [16]], ["comm", "char", [16]]], "struct"])


def test_bulk_decoding_equals_one_by_one_on_random_entries() -> None:
    rnd = random.Random(23)
    n = 1013
    keys = rnd.randbytes(40 * n)
    values = bytearray(rnd.randbytes(104 * n))
    for i in range(n):  # comm: NUL-padded, full, or with bytes after the NUL
        values[i * 104 + 88:i * 104 + 104] = rnd.choice(
            [b"abc" + bytes(13), b"x" * 16, b"py\0zz" + bytes(11), "é".encode() + bytes(14)])
    one = [decode(KEY, LEAF, keys[i * 40:(i + 1) * 40], bytes(values[i * 104:(i + 1) * 104]))
           for i in range(n)]
    bulk = decode_many(KEY, LEAF, keys, bytes(values), 0, 500) + \
        decode_many(KEY, LEAF, keys, bytes(values), 500, n)
    assert bulk == one
    assert {s.comm for s in bulk} == {"abc", "x" * 16, "py", "é"}
