"""The flow session row: the one layout every VXLAN grouper writes and the flow table reads.

Stage: between grouping (grouping.py with numpy; ewvxlan_flows.c, whose `EW_ROW_FIELDS`,
`EW_NFIELDS` and `EW_DIR_NONE` in ewvxlan.h must equal these: native.py refuses a library
whose row names differ) and `flows.FlowTable.merge`. In: nothing (definitions). Out: the field
names of one session, in order, and the "direction not seen" value.

One session (the packets of one key within a batch, between cuts), flat, uint64 each: the key
(the tunnel's VNI and type, 0 and 0 for plain traffic; A = the lower endpoint; `xkey` the
nested tunnels around it, `packets.outer_key`, 0 when not nested), then sums and evidence.
Directions: 0 A->B, 1 B->A, `DIR_NONE` not seen. o0_* / o1_*: the outer headers of the first
A->B / B->A packet: the one that carried the flow's tunnel, then (x1, x2) the ones around it
(fam 0: none).
"""

from __future__ import annotations

_OUTER = ("fam", "src_hi", "src_lo", "dst_hi", "dst_lo", "dport")
ROW_FIELDS = (
    "vni", "ttype", "fam", "proto", "a_hi", "a_lo", "a_port", "b_hi", "b_lo", "b_port", "xkey",
    "newkey", "tmin", "tmax", "start_syn", "pk0", "cnt", "by0", "by1", "l30", "l31", "flags",
    "rst", "fin0", "fin1", "first_dir", "syn_dir", "synack_dir", "req_dir", "rep_dir",
    "has_syn", "tail_fr",
    *(f"{d}_{x}{name}" for d in ("o0", "o1") for x in ("", "x1", "x2") for name in _OUTER),
)
KEY_FIELDS = ROW_FIELDS.index("newkey")  # the key: the first 11
OUTER_WORDS = 3 * len(_OUTER)  # per direction: the flow's tunnel, then x1, x2 (fam 0: none)
NFIELDS = len(ROW_FIELDS)
DIR_NONE = 2
