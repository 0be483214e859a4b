/* Outputs: connections -> the store's row values (`OUT_*` columns, aggregator/store/derived.py
 * `row_values` from `Connection.summary()`), each with its `views` blob encoded as msgspec
 * encodes `views_blob()`; the plan's rollup rows and workloads; and the scan of the records'
 * `extra` blobs for reported workloads.
 *
 * Stage: correlation -> store. In: the pending plan's touched connections, or a selection of
 * every connection (correlate_native.c). Out: int64 matrices (column-major, a validity byte per
 * value), connection ids as hex, the blobs with their offsets.
 *
 * msgpack (https://github.com/msgpack/msgpack/blob/master/spec.md) as msgspec writes it: the
 * smallest int form, timestamps as extension -1 (32-bit seconds when there are no
 * nanoseconds and they fit, else 64-bit nanoseconds<<34|seconds, else the 96-bit form for
 * negative or large seconds), strings pre-encoded by Python (`str_mp`), a struct as a map of
 * its field names in order.
 */
#include <stdlib.h>
#include <string.h>

#include "correlate_native.h"

#define MSS 1460 /* connection.MSS */

static inline int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b) != 0 && ((a < 0) != (b < 0))) q--;
    return q;
}

/* -- msgpack writing ---------------------------------------------------------------------- */
typedef struct { uint8_t *p; } wr_t;

static inline void put8(wr_t *w, uint8_t b) { *w->p++ = b; }
static inline void put16(wr_t *w, uint16_t v) { put8(w, (uint8_t)(v >> 8)); put8(w, (uint8_t)v); }
static inline void put32(wr_t *w, uint32_t v) { put16(w, (uint16_t)(v >> 16)); put16(w, (uint16_t)v); }
static inline void put64(wr_t *w, uint64_t v) { put32(w, (uint32_t)(v >> 32)); put32(w, (uint32_t)v); }
static inline void put_bytes(wr_t *w, const void *s, size_t n) { memcpy(w->p, s, n); w->p += n; }

static void mp_int(wr_t *w, int64_t x)
{
    if (x < 0) {
        if (x >= -32) put8(w, (uint8_t)(int8_t)x);
        else if (x >= -128) { put8(w, 0xd0); put8(w, (uint8_t)(int8_t)x); }
        else if (x >= -32768) { put8(w, 0xd1); put16(w, (uint16_t)(int16_t)x); }
        else if (x >= -2147483648LL) { put8(w, 0xd2); put32(w, (uint32_t)(int32_t)x); }
        else { put8(w, 0xd3); put64(w, (uint64_t)x); }
    } else if (x < 128) put8(w, (uint8_t)x);
    else if (x < 256) { put8(w, 0xcc); put8(w, (uint8_t)x); }
    else if (x < 65536) { put8(w, 0xcd); put16(w, (uint16_t)x); }
    else if (x < 4294967296LL) { put8(w, 0xce); put32(w, (uint32_t)x); }
    else { put8(w, 0xcf); put64(w, (uint64_t)x); }
}

static void mp_array(wr_t *w, uint64_t n)
{
    if (n < 16) put8(w, (uint8_t)(0x90 | n));
    else if (n < 65536) { put8(w, 0xdc); put16(w, (uint16_t)n); }
    else { put8(w, 0xdd); put32(w, (uint32_t)n); }
}

static void mp_ts(wr_t *w, int64_t us)
{
    int64_t sec = floor_div(us, 1000000);
    uint32_t nsec = (uint32_t)((us - sec * 1000000) * 1000);
    if (((uint64_t)sec >> 34) == 0) {
        if (nsec == 0 && sec < 4294967296LL) {
            put8(w, 0xd6); put8(w, 0xff); put32(w, (uint32_t)sec);
        } else {
            put8(w, 0xd7); put8(w, 0xff); put64(w, (uint64_t)nsec << 34 | (uint64_t)sec);
        }
    } else {
        put8(w, 0xc7); put8(w, 12); put8(w, 0xff); put32(w, nsec); put64(w, (uint64_t)sec);
    }
}

static inline void mp_bool(wr_t *w, int b) { put8(w, b ? 0xc3 : 0xc2); }
static inline void mp_nil(wr_t *w) { put8(w, 0xc0); }

static const char *const OBSERVER_NAME[] = {"client", "server", "path", "drops"};
static const char *const CONNECT_NAME[] = {NULL, "ok", "refused", "timeout", "reset"};

static void mp_lit(wr_t *w, const char *s)
{
    size_t n = strlen(s); /* the literals here are all fixstr */
    put8(w, (uint8_t)(0xa0 | n));
    put_bytes(w, s, n);
}

static uint64_t str_len(const ew_tables *tb, uint32_t id)
{
    return (uint64_t)(tb->str_off[id + 1] - tb->str_off[id]);
}

/* an upper bound of the blob's size (so that writing needs no checks) */
static uint64_t blob_bound(const ew_state *st, const ew_tables *tb, const ew_conn *c)
{
    uint64_t n = 16 + (uint64_t)(tb->id_labels[c->client + 1] - tb->id_labels[c->client]) +
                 (uint64_t)(tb->id_labels[c->server + 1] - tb->id_labels[c->server]) + 48;
    for (uint32_t v = c->views; v != EW_NONE; v = st->views[v].next)
        n += 200 + str_len(tb, st->views[v].collector) +
             (st->views[v].reason != EW_NONE ? str_len(tb, st->views[v].reason) : 0);
    for (uint32_t m = c->volumes; m != EW_NONE; m = st->vols[m].next) n += 80;
    return n;
}

/* derived.views_blob: (views as tuples, client labels, server labels[, naming]) */
static void write_blob(wr_t *w, const ew_state *st, const ew_tables *tb, const ew_conn *c)
{
    put8(w, (c->flags & CF_NAMING) ? 0x94 : 0x93);
    uint64_t nv = 0;
    for (uint32_t v = c->views; v != EW_NONE; v = st->views[v].next) nv++;
    mp_array(w, nv);
    for (uint32_t vi = c->views; vi != EW_NONE; vi = st->views[vi].next) {
        const ew_view *v = &st->views[vi];
        /* 14 fields, View's order; a drops view has a 15th, its reason */
        put8(w, v->reason != EW_NONE ? 0x9f : 0x9e);
        mp_lit(w, OBSERVER_NAME[v->observer]);
        put_bytes(w, tb->str_mp + tb->str_off[v->collector], str_len(tb, v->collector));
        mp_ts(w, v->start);
        mp_ts(w, v->end);
        mp_bool(w, v->flags & VF_FINAL);
        mp_int(w, v->b_c2s);
        mp_int(w, v->b_s2c);
        if (v->flags & VF_P_C2S) mp_int(w, v->p_c2s); else mp_nil(w);
        if (v->flags & VF_P_S2C) mp_int(w, v->p_s2c); else mp_nil(w);
        mp_int(w, v->retrans);
        mp_int(w, v->resets);
        if (v->connect) mp_lit(w, CONNECT_NAME[v->connect]); else mp_nil(w);
        if (v->flags & VF_RTT) {
            put8(w, 0x93);
            for (int k = 0; k < 3; k++) mp_int(w, v->rtt[k]);
        } else {
            mp_nil(w);
        }
        mp_bool(w, v->flags & VF_INCOMPLETE);
        if (v->reason != EW_NONE)
            put_bytes(w, tb->str_mp + tb->str_off[v->reason], str_len(tb, v->reason));
    }
    put_bytes(w, tb->labels + tb->id_labels[c->client],
              (size_t)(tb->id_labels[c->client + 1] - tb->id_labels[c->client]));
    put_bytes(w, tb->labels + tb->id_labels[c->server],
              (size_t)(tb->id_labels[c->server + 1] - tb->id_labels[c->server]));
    if (!(c->flags & CF_NAMING)) return;
    put8(w, 0x82); /* Naming: {"until": ts, "volumes": [[minute, [6 ints]], ...]} */
    mp_lit(w, "until");
    mp_ts(w, c->until);
    mp_lit(w, "volumes");
    uint64_t nm = 0;
    for (uint32_t m = c->volumes; m != EW_NONE; m = st->vols[m].next) nm++;
    mp_array(w, nm);
    for (uint32_t m = c->volumes; m != EW_NONE; m = st->vols[m].next) {
        put8(w, 0x92);
        mp_ts(w, st->vols[m].minute);
        put8(w, 0x96);
        for (int k = 0; k < 6; k++) mp_int(w, st->vols[m].c[k]);
    }
}

/* -- the row values ----------------------------------------------------------------------- */
static inline __int128 abs128(__int128 x) { return x < 0 ? -x : x; }

/* connection._mismatch */
static int mismatch(const ew_state *st, const ew_conn *c, const ew_view *cv, const ew_view *sv,
                    int64_t retrans)
{
    __int128 tol = (__int128)retrans * MSS;
    const ew_view *fc = cv && (cv->flags & VF_FINAL) ? cv : NULL;
    const ew_view *fs = sv && (sv->flags & VF_FINAL) ? sv : NULL;
    if (fc && fs && (abs128((__int128)fc->b_c2s - fs->b_c2s) > tol ||
                     abs128((__int128)fc->b_s2c - fs->b_s2c) > tol))
        return 1;
    if (!fc && !fs) return 0;
    const ew_view *sock[2] = {fc, fs};
    for (uint32_t vi = c->views; vi != EW_NONE; vi = st->views[vi].next) {
        const ew_view *p = &st->views[vi];
        if (p->observer != OBS_PATH || !(p->flags & VF_FINAL)) continue;
        __int128 ptol = (__int128)p->retrans * MSS;
        if (tol > ptol) ptol = tol;
        for (int k = 0; k < 2; k++) {
            const ew_view *v = sock[k];
            if (!v) continue;
            if ((__int128)p->b_c2s - v->b_c2s > ptol || v->b_c2s > p->b_c2s ||
                (__int128)p->b_s2c - v->b_s2c > ptol || v->b_s2c > p->b_s2c)
                return 1;
        }
    }
    return 0;
}

#define SET(col, value) (out[(uint64_t)(col) * n + r] = (int64_t)(value), ok[(uint64_t)(col) * n + r] = 1)
#define SET_ID(col, id) ((id) == EW_NONE ? (void)0 : (void)SET(col, id))

static void proc_row(int64_t *out, uint8_t *ok, uint64_t n, uint64_t r, const ew_proc *p, int base)
{
    if (!(p->flags & PF_SET)) return;
    if (p->flags & PF_PID) SET(base, p->pid);
    SET_ID(base + 1, p->comm);
    if (p->flags & PF_NETNS) SET(base + 2, p->netns);
    SET_ID(base + 3, p->container);
    SET_ID(base + 4, p->collector);
}

/* Connection.summary() + derived.row_values: one row */
static int conn_row(ew_state *st, const ew_conn *c, const ew_touch *t, int64_t *out,
                    uint8_t *ok, uint64_t n, uint64_t r)
{
    int64_t best[6];
    int rc = ew_best(st, c, best);
    if (rc < 0) return rc;
    const ew_view *cv = NULL, *sv = NULL, *any_rtt = NULL;
    int64_t closed_at = 0;
    int closed = 0, inc = 0, paths = 0;
    unsigned mask = 0;
    uint8_t connect = CONNECT_NONE, drops_connect = CONNECT_NONE;
    int64_t pb1 = 0, pb2 = 0;
    int hp1 = 0, hp2 = 0; /* a view counted packets: else the row's packets are null */
    int has_drops = 0, drops_closed = 0;
    int64_t dropped = 0, drops_closed_at = 0;
    for (uint32_t vi = c->views; vi != EW_NONE; vi = st->views[vi].next) {
        const ew_view *v = &st->views[vi];
        if (v->observer == OBS_DROPS) { /* time span, observed_by, incomplete, drops only */
            mask |= 8u;
            if (v->flags & VF_INCOMPLETE) inc = 1;
            if ((v->flags & VF_FINAL) && (!drops_closed || v->end < drops_closed_at)) {
                drops_closed_at = v->end;
                drops_closed = 1;
            }
            if (__builtin_add_overflow(dropped, v->p_c2s, &dropped))
                return ew_fail(st, EW_E_OVERFLOW, "dropped packets of a connection exceed int64");
            has_drops = 1;
            if (drops_connect == CONNECT_NONE) drops_connect = v->connect;
            continue;
        }
        if (v->flags & VF_FINAL) {
            if (!closed || v->end < closed_at) closed_at = v->end;
            closed = 1;
        }
        mask |= v->observer == OBS_CLIENT ? 1u : v->observer == OBS_PATH ? 2u : 4u;
        if (v->flags & VF_INCOMPLETE) inc = 1;
        if (connect == CONNECT_NONE) connect = v->connect;
        if (!any_rtt && (v->flags & VF_RTT)) any_rtt = v;
        if (v->flags & VF_P_C2S) hp1 = 1;
        if (v->flags & VF_P_S2C) hp2 = 1;
        if (v->observer == OBS_CLIENT) cv = v;
        else if (v->observer == OBS_SERVER) sv = v;
        else {
            paths++;
            if (v->b_c2s > pb1) pb1 = v->b_c2s;
            if (v->b_s2c > pb2) pb2 = v->b_s2c;
        }
    }
    if (mask == 8u) { /* only drop sources saw it: their final closes it */
        closed = drops_closed;
        closed_at = drops_closed_at;
    }
    /* connect and rtt: the client's first, then the server's, then any view's (in order) */
    if (cv && cv->connect) connect = cv->connect;
    else if (sv && sv->connect) connect = sv->connect;
    if (connect == CONNECT_NONE) connect = drops_connect; /* connection.refused_by_drop */
    const ew_view *rv = cv && (cv->flags & VF_RTT) ? cv : sv && (sv->flags & VF_RTT) ? sv : any_rtt;
    SET(OUT_PROTOCOL, c->protocol);
    SET(OUT_FAMILY, c->family);
    SET(OUT_CIP, c->cip);
    SET(OUT_CPORT, c->cport);
    SET(OUT_SIP, c->sip);
    SET(OUT_SPORT, c->sport);
    SET(OUT_SCOPE, c->scope);
    SET(OUT_START, c->start);
    SET(OUT_LAST, c->last);
    SET(OUT_CLOSED, closed);
    if (closed) SET(OUT_CLOSED_TS, closed_at);
    SET(OUT_OBSERVED, mask);
    if (connect) SET(OUT_CONNECT, connect);
    SET(OUT_OUTCOME, connect == CONNECT_REFUSED ? OUTCOME_REFUSED
                   : has_drops && (connect == CONNECT_TIMEOUT || mask == 8u) ? OUTCOME_DROPPED
                   : connect == CONNECT_TIMEOUT ? OUTCOME_TIMEOUT
                   : (best[5] > 0 || connect == CONNECT_RESET) ? OUTCOME_RESET : OUTCOME_OK);
    for (int k = 0; k < 6; k++)
        if ((k != 2 || hp1) && (k != 3 || hp2)) SET(OUT_B_C2S + k, best[k]);
    if (rv)
        for (int k = 0; k < 3; k++) SET(OUT_RTT_MIN + k, rv->rtt[k]);
    if (cv) { SET(OUT_CB_C2S, cv->b_c2s); SET(OUT_CB_S2C, cv->b_s2c); }
    if (sv) { SET(OUT_SB_C2S, sv->b_c2s); SET(OUT_SB_S2C, sv->b_s2c); }
    if (paths) { SET(OUT_PB_C2S, pb1); SET(OUT_PB_S2C, pb2); }
    SET(OUT_MISMATCH, closed && mismatch(st, c, cv, sv, best[4]));
    SET(OUT_INCOMPLETE, inc);
    SET(OUT_CLIENT, c->client);
    SET(OUT_SERVER, c->server);
    proc_row(out, ok, n, r, &c->cproc, OUT_CPID);
    proc_row(out, ok, n, r, &c->sproc, OUT_SPID);
    if (c->tunnel.vni >= 0) {
        SET(OUT_VNI, c->tunnel.vni);
        SET(OUT_VTEP_SRC, c->tunnel.src);
        SET(OUT_VTEP_DST, c->tunnel.dst);
        SET_ID(OUT_VTEP_SRC_HOST, c->tunnel.src_host);
        SET_ID(OUT_VTEP_DST_HOST, c->tunnel.dst_host);
        SET(OUT_TUNNEL_TYPE, c->tunnel.type);
    }
    if (c->svc_ip != EW_NONE) {
        SET(OUT_SVC_IP, c->svc_ip);
        SET(OUT_SVC_PORT, c->svc_port);
    }
    if (c->flags & CF_NAMING) SET(OUT_UNTIL, c->until);
    SET(OUT_CREATED, t ? t->created : 0);
    SET(OUT_RENAMED, t ? t->renamed : 0);
    SET(OUT_HAS_DELTA, t ? t->has_delta : 0);
    for (int k = 0; k < 6; k++) SET(OUT_D0 + k, t ? t->delta[k] : 0);
    if (has_drops) SET(OUT_DROPPED, dropped);
    return 0;
}

/* rows [from, to) of the pending plan's touched connections (which = 0) or of the selection
 * (which = 1): `out`/`ok` (to - from) x OUT_NCOL, ids as 32 hex digits each, the blobs' end
 * offsets (`blob_end`, int32 n + 1 with 0 first). The blobs stay here for ew_corr_blob. Their
 * size, or an error. */
int64_t ew_corr_rows(ew_state *st, int which, int64_t from, int64_t to, const ew_tables *tb,
                     int64_t *out, uint8_t *ok, char *hex, int32_t *blob_end)
{
    uint64_t total = which ? st->nsel : st->ntouch;
    if (from < 0 || to < from || (uint64_t)to > total)
        return ew_fail(st, EW_E_STATE, "rows %lld..%lld of %llu", (long long)from, (long long)to,
                       (unsigned long long)total);
    uint64_t n = (uint64_t)(to - from);
    memset(ok, 0, n * OUT_NCOL);
    st->nblob = 0;
    blob_end[0] = 0;
    for (uint64_t r = 0; r < n; r++) {
        uint64_t k = (uint64_t)from + r;
        const ew_touch *t = which ? NULL : &st->touch[k];
        const ew_conn *c = &st->conns[which ? st->sel[k] : t->conn];
        int rc = conn_row(st, c, t, out, ok, n, r);
        if (rc < 0) return rc;
        ew_hex(c->id, hex + 32 * r);
        uint64_t need = blob_bound(st, tb, c);
        if (!ew_grow((void **)&st->blob, &st->capblob, st->nblob + need, 1))
            return ew_fail(st, EW_E_NOMEM, "no memory for the views blobs");
        wr_t w = {st->blob + st->nblob};
        write_blob(&w, st, tb, c);
        st->nblob = (uint64_t)(w.p - st->blob);
        if (st->nblob > 0x7fffffffULL)
            return ew_fail(st, EW_E_OVERFLOW, "views blobs beyond 2 GiB in one call");
        blob_end[r + 1] = (int32_t)st->nblob;
    }
    return (int64_t)st->nblob;
}

void ew_corr_blob(ew_state *st, uint8_t *dst)
{
    if (st->nblob) memcpy(dst, st->blob, st->nblob);
}

/* the pending plan's rollup rows (RU_* columns, `cap` rows), in insertion order; a key whose
 * deltas add up to nothing is no row (as in the reference) */
int64_t ew_corr_rollups(ew_state *st, int64_t *out, int64_t cap)
{
    int64_t r = 0;
    for (uint64_t e = 0; e < st->nru; e++) {
        const ew_rollup *x = &st->ru[e];
        if (!(x->c[0] | x->c[1] | x->c[2] | x->c[3] | x->c[4] | x->c[5]))
            continue;
        if (r >= cap) return ew_fail(st, EW_E_STATE, "more rollup rows than room");
        out[RU_MINUTE * cap + r] = x->minute;
        out[RU_CLIENT * cap + r] = x->client;
        out[RU_SERVER * cap + r] = x->server;
        out[RU_SPORT * cap + r] = x->sport;
        out[RU_PROTOCOL * cap + r] = x->protocol;
        out[RU_LINK_LOCAL * cap + r] = x->link_local;
        for (int k = 0; k < 6; k++) out[(RU_C0 + k) * cap + r] = x->c[k];
        r++;
    }
    return r;
}

/* derived.Derived.workloads: per wid over the touched connections (client, then server), the
 * first identity seen, the earliest start and the latest last_seen; first-seen order */
int64_t ew_corr_workloads(ew_state *st, const ew_tables *tb, int64_t *out, int64_t cap)
{
    uint64_t hcap = 64;
    while (hcap < (uint64_t)cap * 2) hcap *= 2;
    uint32_t *slots = calloc(hcap, sizeof(uint32_t)); /* 1 + row */
    if (!slots) return ew_fail(st, EW_E_NOMEM, "no memory for workloads");
    int64_t r = 0;
    for (uint64_t t = 0; t < st->ntouch; t++) {
        const ew_conn *c = &st->conns[st->touch[t].conn];
        uint32_t ends[2] = {c->client, c->server};
        for (int k = 0; k < 2; k++) {
            uint32_t wid = (uint32_t)tb->id_wid[ends[k]];
            uint64_t j = (wid * 0x9E3779B1u) & (hcap - 1);
            while (slots[j] && (uint32_t)tb->id_wid[out[WL_IDENT * cap + slots[j] - 1]] != wid)
                j = (j + 1) & (hcap - 1);
            if (slots[j]) {
                int64_t row = slots[j] - 1;
                if (c->start < out[WL_FIRST * cap + row]) out[WL_FIRST * cap + row] = c->start;
                if (c->last > out[WL_LAST * cap + row]) out[WL_LAST * cap + row] = c->last;
                continue;
            }
            if (r >= cap) {
                free(slots);
                return ew_fail(st, EW_E_STATE, "more workloads than room");
            }
            out[WL_IDENT * cap + r] = ends[k];
            out[WL_FIRST * cap + r] = c->start;
            out[WL_LAST * cap + r] = c->last;
            slots[j] = (uint32_t)++r;
        }
    }
    free(slots);
    return r;
}

/* -- extra: where the records report workloads ------------------------------------------------ */
static int mp_skip(const uint8_t **pp, const uint8_t *end, int depth)
{
    const uint8_t *p = *pp;
    if (p >= end || depth > 64) return 0;
    uint8_t b = *p++;
    uint64_t n = 0, items = 0; /* n: bytes of payload to skip; items: objects that follow */
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) n = 0;
    else if ((b & 0xf0) == 0x80) items = 2u * (b & 0x0f);
    else if ((b & 0xf0) == 0x90) items = b & 0x0f;
    else if ((b & 0xe0) == 0xa0) n = b & 0x1f;
    else {
        size_t w;
        switch (b) {
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: case 0xca: n = 4; break;
        case 0xcf: case 0xd3: case 0xcb: n = 8; break;
        case 0xd4: n = 2; break;
        case 0xd5: n = 3; break;
        case 0xd6: n = 5; break;
        case 0xd7: n = 9; break;
        case 0xd8: n = 17; break;
        case 0xc4: case 0xd9: case 0xc7: w = 1; goto sized;
        case 0xc5: case 0xda: case 0xc8: case 0xdc: case 0xde: w = 2; goto sized;
        case 0xc6: case 0xdb: case 0xc9: case 0xdd: case 0xdf: w = 4; goto sized;
        default: return 0;
        sized:
            if ((size_t)(end - p) < w) return 0;
            uint64_t len = w == 1 ? p[0] : w == 2 ? (uint64_t)p[0] << 8 | p[1]
                         : (uint64_t)p[0] << 24 | (uint64_t)p[1] << 16 | (uint64_t)p[2] << 8 | p[3];
            p += w;
            if (b == 0xdc || b == 0xdd) items = len;
            else if (b == 0xde || b == 0xdf) items = 2 * len;
            else n = len + (b >= 0xc7 && b <= 0xc9 ? 1 : 0); /* ext: its type byte */
        }
    }
    if ((uint64_t)(end - p) < n) return 0;
    p += n;
    for (uint64_t k = 0; k < items; k++)
        if (!mp_skip(&p, end, depth + 1)) return 0;
    *pp = p;
    return 1;
}

/* per record with an `extra` blob (columns.Extra as a msgpack array): the byte range of its
 * client_workload (element 7) and server_workload (element 8) when not nil, else -1: `out`
 * holds 4 int64 a record (offset, length, offset, length; offsets into `data`). The number of
 * records with either, or -1 with the bad record in *bad. */
int64_t ew_corr_scan_extra(int64_t n, const uint8_t *valid, const int32_t *offsets,
                           const uint8_t *data, int64_t *out, int64_t *bad)
{
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t *o = out + 4 * i;
        o[0] = o[1] = o[2] = o[3] = -1;
        if (!valid[i]) continue;
        const uint8_t *p = data + offsets[i], *end = data + offsets[i + 1];
        if (p >= end) goto fail;
        uint64_t count;
        uint8_t b = *p++;
        if ((b & 0xf0) == 0x90) count = b & 0x0f;
        else if (b == 0xdc && end - p >= 2) { count = (uint64_t)p[0] << 8 | p[1]; p += 2; }
        else if (b == 0xdd && end - p >= 4) {
            count = (uint64_t)p[0] << 24 | (uint64_t)p[1] << 16 | (uint64_t)p[2] << 8 | p[3];
            p += 4;
        } else goto fail;
        int any = 0;
        for (uint64_t k = 0; k < count && k < 9; k++) {
            const uint8_t *at = p;
            if (!mp_skip(&p, end, 0)) goto fail;
            if (k >= 7 && *at != 0xc0) {
                o[2 * (k - 7)] = at - data;
                o[2 * (k - 7) + 1] = p - at;
                any = 1;
            }
        }
        found += any;
        continue;
    fail:
        *bad = i;
        return -1;
    }
    return found;
}
