/* The columnar correlator's C core: shared layouts (aggregator/correlate_native.py mirrors the
 * public ones with ctypes and checks their sizes at load).
 *
 * Stage: correlation (aggregator/correlate.py is the reference; this is the same rules on
 * columns). In: one batch as column buffers (`ew_input`), strings and identities as integer ids
 * (aggregator/correlate_registry.py). Out: the touched connections' store rows, the rollup rows
 * and the workloads, as column buffers (`OUT_*`, `RU_*`, `WL_*` below).
 *
 * The files: correlate_native.c (pools, the key index, commit/rollback/prune),
 * correlate_native_join.c (a plan: the join rule, names, deltas, rollups),
 * correlate_native_rows.c (row values, the `views` blob, rollup/workload rows, the `extra` scan),
 * correlate_native_load.c (load, the selection of every connection, refresh, compaction).
 *
 * Memory (bytes per connection, x86-64): `ew_conn` 184 + one `ew_view` (104) per observer slot
 * (a merged connection seen by its client, its server and both wires: 184 + 4 x 104 = 600),
 * + about 40 for its key in the open-addressing index (24-byte slots at a load of at most 0.6),
 * + 64 per minute of volumes while its names may still change. Measured (RSS growth,
 * bench/bench_correlate.py --memory): 295 bytes a connection with one view (1,000,000 held),
 * 661 with four (250,000 held); the reference Correlator: 711 and 1,442.
 */
#ifndef EW_CORRELATE_NATIVE_H
#define EW_CORRELATE_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define EW_NONE 0xffffffffu /* no index / no string */

/* OBS_DROPS: a drop source (a record of source `drops`), one view per collector and reason */
enum { OBS_CLIENT = 0, OBS_SERVER = 1, OBS_PATH = 2, OBS_DROPS = 3 };
enum { CONNECT_NONE = 0, CONNECT_OK = 1, CONNECT_REFUSED = 2, CONNECT_TIMEOUT = 3,
       CONNECT_RESET = 4 };
enum { OUTCOME_OK = 0, OUTCOME_REFUSED = 1, OUTCOME_TIMEOUT = 2, OUTCOME_RESET = 3,
       OUTCOME_DROPPED = 4 };

/* errors (negative returns); the message is in ew_corr_error() */
enum { EW_E_STATE = -1, EW_E_OVERFLOW = -2, EW_E_IDS = -3, EW_E_NOMEM = -4, EW_E_INPUT = -5 };

/* per record: what its observer knows (`knows`) */
#define KNOWS_OWN_SIDE 1 /* a process (pid) or a non-empty container of its own side */
#define KNOWS_CLIENT_WL 2 /* the record reports a client workload */
#define KNOWS_SERVER_WL 4 /* ... a server workload */

/* -- the state ---------------------------------------------------------------------------- */
#define VF_FINAL 1
#define VF_INCOMPLETE 2
#define VF_P_C2S 4 /* packets_c2s is not None */
#define VF_P_S2C 8
#define VF_RTT 16

typedef struct {        /* one observer's latest cumulative view (connection.View) */
    int64_t start, end; /* µs since the epoch */
    int64_t b_c2s, b_s2c, p_c2s, p_s2c, retrans, resets;
    int64_t rtt[3];
    uint32_t collector; /* string id */
    uint32_t next;      /* the connection's next view (insertion order), EW_NONE at the end */
    uint32_t reason;    /* OBS_DROPS: the drop reason (string id; packets in p_c2s), else EW_NONE */
    uint8_t observer, flags, connect;
} ew_view;

typedef struct { /* a minute of volumes (connection.Naming.volumes) */
    int64_t minute;
    int64_t c[6];
    uint32_t next;
} ew_vol;

#define PF_SET 1
#define PF_PID 2
#define PF_NETNS 4
typedef struct { /* connection.ProcInfo */
    int64_t pid, netns;
    uint32_t comm, container, collector; /* string ids, EW_NONE: None */
    uint32_t flags;
} ew_proc;

/* tunnel types (connection.Tunnel.type; correlate_input.TUNNEL_TYPES) */
enum { EW_TUNNEL_NONE = 0, EW_TUNNEL_VXLAN = 1, EW_TUNNEL_GENEVE = 2, EW_TUNNEL_GPE = 3 };

typedef struct {          /* connection.Tunnel */
    int32_t vni;          /* -1: no tunnel */
    uint32_t src, dst;    /* address ids */
    uint32_t src_host, dst_host; /* string ids, EW_NONE: None */
    uint8_t type;         /* EW_TUNNEL_*: Tunnel.type (whoever supplied the tunnel) */
} ew_tunnel;

#define CF_LIVE 1
#define CF_LINK_LOCAL 2
#define CF_NAMING 4 /* `naming` is not None: names may still change until `until` */
#define CF_CREATED 8 /* created by the pending plan */

typedef struct {
    uint8_t id[16];
    int64_t scope;
    int64_t start, last; /* cached min(view.start), max(view.end) */
    int64_t until;       /* naming.until (µs, the aggregator's wall clock) with CF_NAMING */
    uint32_t protocol, cip, sip; /* string id, address ids */
    uint32_t client, server;     /* identity ids */
    uint32_t views, volumes;     /* first view / first volume minute, EW_NONE: none */
    uint32_t next_key;           /* the next connection with this key (bucket order) */
    uint32_t touched;            /* 1 + index in the pending plan's touched list, 0: untouched */
    uint16_t cport, sport;
    int8_t family;
    uint8_t flags;
    ew_proc cproc, sproc;
    ew_tunnel tunnel;
    /* the dialled Service address (connection.Connection.service_ip/port), EW_NONE: none; of
     * several observers' the one with the lowest `svc_rank` (aggregator/service.py) */
    uint32_t svc_ip;
    uint16_t svc_port;
    int64_t svc_rank;
} ew_conn;

typedef struct {          /* a key of the index: its connections, in the reference's order */
    uint32_t head, tail;  /* head == EW_NONE: empty slot */
    uint32_t hash, pad;
    uint64_t seq;         /* when the key entered the index (dict order); 0: in the pending plan */
} ew_slot;

typedef struct {          /* a connection the pending plan touched (plan.connections order) */
    uint32_t conn;
    uint8_t created, renamed, has_delta;
    int64_t delta[6];
} ew_touch;

typedef struct {          /* a rollup row of the pending plan */
    int64_t minute;
    uint32_t cwh, swh;    /* (wid, host) ids of the key */
    uint32_t protocol, client, server; /* the identities of the last delta added */
    uint16_t sport;
    uint8_t link_local;
    int64_t c[6];
} ew_rollup;

typedef struct {          /* the identity and string tables of the Python side */
    int64_t n_idents;
    const int32_t *id_order;   /* better(a, b) <=> id_order[a] < id_order[b] */
    const int32_t *id_wh;      /* (wid, host or "") id: the rollup key */
    const int32_t *id_wid;     /* wid id: the workloads rows */
    const uint8_t *id_static;  /* source == "static" */
    const int64_t *id_labels;  /* n_idents + 1 offsets into labels: msgpack of `labels or None` */
    const uint8_t *labels;
    int64_t n_strs;
    const int64_t *str_off;    /* n_strs + 1 offsets into str_mp: msgpack of each string */
    const uint8_t *str_mp;
} ew_tables;

typedef struct {          /* one batch, column by column (aggregator/correlate_input.py) */
    int64_t n;
    const int64_t *order;      /* the records by end, stable */
    const int64_t *start, *end;
    const uint8_t *final, *observer, *connect, *incomplete, *knows, *link_local;
    const int8_t *family;
    const int32_t *protocol, *cip, *cport, *sip, *sport;
    const int64_t *scope;
    const int64_t *b_c2s, *b_s2c, *p_c2s, *p_s2c, *retrans, *resets;
    const uint8_t *has_p_c2s, *has_p_s2c, *has_rtt, *has_pid, *has_netns;
    const int64_t *rtt_min, *rtt_avg, *rtt_max, *pid, *netns;
    const int32_t *comm, *container, *collector; /* -1: None */
    const int32_t *vni;                          /* -1: no tunnel */
    const int32_t *outer_src, *outer_dst, *vtep_src_host, *vtep_dst_host;
    const uint8_t *tunnel_type;                  /* EW_TUNNEL_*, with a tunnel */
    const int32_t *cand_client, *cand_server;    /* what the observer knows of each end */
    const int32_t *svc_ip, *svc_port;            /* the dialled address (nat), -1: none */
    const int64_t *svc_rank;
    const int32_t *reason;     /* OBS_DROPS rows: the drop reason (string id), else -1 */
    int64_t n_ids;
    const uint8_t *ids;        /* 16 bytes per connection id, used in order */
    int64_t at;                /* the plan's wall clock (µs) */
} ew_input;

/* -- outputs: int64 matrices, column-major (column c of row r at [c * n + r]), with a validity
 * byte per value (0: None) ----------------------------------------------------------------- */
#define EW_OUT_COLUMNS                                                                        \
    X(PROTOCOL) X(FAMILY) X(CIP) X(CPORT) X(SIP) X(SPORT) X(SCOPE) X(START) X(LAST) X(CLOSED) \
    X(CLOSED_TS) X(OBSERVED) X(CONNECT) X(OUTCOME) X(B_C2S) X(B_S2C) X(P_C2S) X(P_S2C)        \
    X(RETRANS) X(RESETS) X(RTT_MIN) X(RTT_AVG) X(RTT_MAX) X(CB_C2S) X(CB_S2C) X(SB_C2S)       \
    X(SB_S2C) X(PB_C2S) X(PB_S2C) X(MISMATCH) X(INCOMPLETE) X(CLIENT) X(SERVER) X(CPID)       \
    X(CCOMM) X(CNETNS) X(CCONTAINER) X(CCOLLECTOR) X(SPID) X(SCOMM) X(SNETNS) X(SCONTAINER)   \
    X(SCOLLECTOR) X(VNI) X(VTEP_SRC) X(VTEP_DST) X(VTEP_SRC_HOST) X(VTEP_DST_HOST)            \
    X(TUNNEL_TYPE) X(UNTIL) X(CREATED) X(RENAMED) X(HAS_DELTA) X(D0) X(D1) X(D2) X(D3) X(D4) X(D5) \
    X(SVC_IP) X(SVC_PORT) X(DROPPED)
#define X(name) OUT_##name,
enum { EW_OUT_COLUMNS OUT_NCOL };
#undef X

#define EW_RU_COLUMNS X(MINUTE) X(CLIENT) X(SERVER) X(SPORT) X(PROTOCOL) X(LINK_LOCAL) \
    X(C0) X(C1) X(C2) X(C3) X(C4) X(C5)
#define X(name) RU_##name,
enum { EW_RU_COLUMNS RU_NCOL };
#undef X

#define EW_WL_COLUMNS X(IDENT) X(FIRST) X(LAST)
#define X(name) WL_##name,
enum { EW_WL_COLUMNS WL_NCOL };
#undef X

/* load: the connections (`LD_*` matrix), their views in order (`LV_*`), their volumes (`LM_*`) */
#define EW_LD_COLUMNS                                                                         \
    X(PROTOCOL) X(FAMILY) X(CIP) X(CPORT) X(SIP) X(SPORT) X(SCOPE) X(CLIENT) X(SERVER)        \
    X(LINK_LOCAL) X(UNTIL) X(CPROC) X(CPID) X(CCOMM) X(CNETNS) X(CCONTAINER) X(CCOLLECTOR)    \
    X(SPROC) X(SPID) X(SCOMM) X(SNETNS) X(SCONTAINER) X(SCOLLECTOR) X(VNI) X(VTEP_SRC)        \
    X(VTEP_DST) X(VTEP_SRC_HOST) X(VTEP_DST_HOST) X(TUNNEL_TYPE) X(NVIEWS) X(NVOLS)           \
    X(SVC_IP) X(SVC_PORT) X(SVC_RANK)
#define X(name) LD_##name,
enum { EW_LD_COLUMNS LD_NCOL };
#undef X

#define EW_LV_COLUMNS X(OBSERVER) X(COLLECTOR) X(START) X(END) X(FINAL) X(B_C2S) X(B_S2C) \
    X(P_C2S) X(P_S2C) X(RETRANS) X(RESETS) X(CONNECT) X(RTT_MIN) X(RTT_AVG) X(RTT_MAX)    \
    X(INCOMPLETE) X(REASON)
#define X(name) LV_##name,
enum { EW_LV_COLUMNS LV_NCOL };
#undef X
#define LM_NCOL 7 /* minute, 6 counters */

/* -- the state and the functions the C files share ----------------------------------------- */
typedef struct ew_state ew_state;
struct ew_state {
    ew_conn *conns;
    uint64_t nconn, capconn, live;
    uint32_t free_conn; /* free list through next_key */
    ew_view *views;
    uint64_t nview, capview, views_used;
    uint32_t free_view; /* free list through next */
    ew_vol *vols;
    uint64_t nvol, capvol, vols_used;
    uint32_t free_vol;
    ew_slot *slots;
    uint64_t capslot, usedslot, next_seq;
    int64_t slack, keep_closed, keep_open, settle;
    int64_t high_water;
    int has_high_water;
    uint64_t since_prune;
    int64_t renames, late_names;
    /* the pending plan */
    int pending;
    int64_t at;
    ew_touch *touch;
    ew_conn *undo; /* per touched connection that existed: the connection as committed */
    uint64_t ntouch, captouch, capundo;
    uint64_t pending_created;
    int any_renamed;
    int64_t ids_used;
    ew_rollup *ru;
    uint64_t nru, capru;
    uint32_t *ru_slots; /* 1 + entry index, 0: empty */
    uint64_t ru_capslot;
    /* forgotten by prune, not yet handed to Python */
    uint8_t *settled;
    uint64_t nsettled, capsettled;
    /* a selection of connections (every one, in index order) for `rows` */
    uint32_t *sel;
    uint64_t nsel, capsel;
    /* the views blobs of the last `rows` call */
    uint8_t *blob;
    uint64_t nblob, capblob;
    char error[256];
};

int ew_fail(ew_state *st, int code, const char *fmt, ...);
int ew_grow(void **p, uint64_t *cap, uint64_t need, size_t size);
uint32_t ew_view_alloc(ew_state *st);
void ew_view_free_chain(ew_state *st, uint32_t v);
uint32_t ew_vol_alloc(ew_state *st);
void ew_vol_free_chain(ew_state *st, uint32_t v);
uint32_t ew_conn_alloc(ew_state *st);
void ew_conn_free(ew_state *st, uint32_t ci);
void ew_conn_bounds(ew_state *st, ew_conn *c);
ew_slot *ew_key_find(ew_state *st, const ew_conn *k, uint32_t hash);
ew_slot *ew_slot_insert(ew_slot *slots, uint64_t cap, uint32_t hash);
void ew_slot_delete(ew_state *st, ew_slot *s);
int ew_rehash(ew_state *st, uint64_t cap);
void ew_raise_high_water(ew_state *st, int64_t t);
int ew_key_append(ew_state *st, uint32_t ci);
uint32_t ew_key_hash(const ew_conn *k);
int ew_best(ew_state *st, const ew_conn *c, int64_t out[6]);
void ew_hex(const uint8_t *id, char *out);
int ew_is_closed(const ew_state *st, const ew_conn *c);
void ew_rollback_plan(ew_state *st);

#endif
