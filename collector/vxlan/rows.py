"""The flow session row: the one layout every VXLAN grouper writes and the flow table reads.

Stage: between grouping (grouping.py with numpy; ewvxlan_flows.c, whose `EW_ROW_FIELDS`,
`EW_NFIELDS` and `EW_DIR_NONE` in ewvxlan.h must equal these: native.py refuses a library
whose row names differ) and `flows.FlowTable.merge`. In: nothing (definitions). Out: the field
names of one session, in order, and the "direction not seen" value.

One session (the packets of one key within a batch, between cuts), flat, uint64 each: the key
(the tunnel's VNI and type, 0 and 0 for plain traffic; A = the lower endpoint), then sums and evidence. Directions: 0 A->B, 1 B->A, `DIR_NONE` not
seen. o0_* / o1_*: outer header of the first A->B / B->A packet (fam 0: none).
"""

from __future__ import annotations

ROW_FIELDS = (
    "vni", "ttype", "fam", "proto", "a_hi", "a_lo", "a_port", "b_hi", "b_lo", "b_port",
    "newkey", "tmin", "tmax", "start_syn", "pk0", "cnt", "by0", "by1", "l30", "l31", "flags",
    "rst", "fin0", "fin1", "first_dir", "syn_dir", "synack_dir", "req_dir", "rep_dir",
    "has_syn", "tail_fr",
    "o0_fam", "o0_src_hi", "o0_src_lo", "o0_dst_hi", "o0_dst_lo", "o0_dport",
    "o1_fam", "o1_src_hi", "o1_src_lo", "o1_dst_hi", "o1_dst_lo", "o1_dport",
)
NFIELDS = len(ROW_FIELDS)
DIR_NONE = 2
