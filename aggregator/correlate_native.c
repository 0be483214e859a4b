/* The columnar correlator's state: connections, views and volumes in pools, the key index, and
 * what ends a plan (commit, rollback), prune, load and the selection of every connection.
 *
 * Stage: correlation; the rules of a plan are in correlate_native_join.c, the outputs in
 * correlate_native_rows.c, the layouts in correlate_native.h. Loaded by
 * aggregator/correlate_native.py (ctypes; every call runs without the GIL; the caller holds the
 * correlator's lock, so one state is never used by two threads at once).
 *
 * Loading, the selection of every connection, refresh and compaction: correlate_native_load.c.
 *
 * The index (aggregator/correlate.py `Correlator.index`): an open-addressing hash table (linear
 * probing, backward-shift deletion) from the key (protocol, client ip, client port, server ip,
 * server port, scope) to the list of its connections, linked through `next_key` in the
 * reference's candidate order: the bucket as committed, then those the pending plan created, in
 * creation order. Each key keeps when it entered the index (`seq`): prune hands the forgotten
 * connections over in the reference's order (its dict's key order, then bucket order).
 *
 * A plan changes the state in place and logs how to undo it: a connection it creates is flagged
 * (rollback unlinks and frees it); a connection it touches first is copied (`undo`) and gets a
 * copy of its views and volumes (the reference's `clone()`), so rollback frees the copies and
 * restores the connection, commit frees the originals.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "correlate_native.h"

#ifndef EW_SOURCE_DIGEST
#define EW_SOURCE_DIGEST "unknown"
#endif

const char *ew_source_digest(void) { return EW_SOURCE_DIGEST; }

#define X(name) #name ","
const char *ew_corr_layout(void)
{
    return "out:" EW_OUT_COLUMNS ";ru:" EW_RU_COLUMNS ";wl:" EW_WL_COLUMNS ";ld:" EW_LD_COLUMNS
           ";lv:" EW_LV_COLUMNS;
}
#undef X

/* sizes the ctypes side checks its structures against */
void ew_corr_sizes(int64_t *out)
{
    out[0] = (int64_t)sizeof(ew_input);
    out[1] = (int64_t)sizeof(ew_tables);
    out[2] = (int64_t)sizeof(ew_conn);
    out[3] = (int64_t)sizeof(ew_view);
    out[4] = (int64_t)sizeof(ew_vol);
    out[5] = (int64_t)sizeof(ew_slot);
}

int ew_fail(ew_state *st, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->error, sizeof st->error, fmt, ap);
    va_end(ap);
    return code;
}

const char *ew_corr_error(ew_state *st) { return st->error; }

/* *p holds *cap elements of `size`; make room for `need` (doubling). 0 on failure. */
int ew_grow(void **p, uint64_t *cap, uint64_t need, size_t size)
{
    if (need <= *cap) return 1;
    uint64_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * size);
    if (!q) return 0;
    *p = q;
    *cap = n;
    return 1;
}

/* -- pools ------------------------------------------------------------------------------------ */
uint32_t ew_view_alloc(ew_state *st)
{
    uint32_t v = st->free_view;
    if (v != EW_NONE) {
        st->free_view = st->views[v].next;
    } else {
        if (st->nview >= EW_NONE - 1 ||
            !ew_grow((void **)&st->views, &st->capview, st->nview + 1, sizeof(ew_view)))
            return EW_NONE;
        v = (uint32_t)st->nview++;
    }
    st->views[v].next = EW_NONE;
    st->views_used++;
    return v;
}

void ew_view_free_chain(ew_state *st, uint32_t v)
{
    while (v != EW_NONE) {
        uint32_t next = st->views[v].next;
        st->views[v].next = st->free_view;
        st->free_view = v;
        st->views_used--;
        v = next;
    }
}

uint32_t ew_vol_alloc(ew_state *st)
{
    uint32_t v = st->free_vol;
    if (v != EW_NONE) {
        st->free_vol = st->vols[v].next;
    } else {
        if (st->nvol >= EW_NONE - 1 ||
            !ew_grow((void **)&st->vols, &st->capvol, st->nvol + 1, sizeof(ew_vol)))
            return EW_NONE;
        v = (uint32_t)st->nvol++;
    }
    st->vols[v].next = EW_NONE;
    st->vols_used++;
    return v;
}

void ew_vol_free_chain(ew_state *st, uint32_t v)
{
    while (v != EW_NONE) {
        uint32_t next = st->vols[v].next;
        st->vols[v].next = st->free_vol;
        st->free_vol = v;
        st->vols_used--;
        v = next;
    }
}

uint32_t ew_conn_alloc(ew_state *st)
{
    uint32_t c = st->free_conn;
    if (c != EW_NONE) {
        st->free_conn = st->conns[c].next_key;
    } else {
        if (st->nconn >= EW_NONE - 1 ||
            !ew_grow((void **)&st->conns, &st->capconn, st->nconn + 1, sizeof(ew_conn)))
            return EW_NONE;
        c = (uint32_t)st->nconn++;
    }
    memset(&st->conns[c], 0, sizeof(ew_conn));
    ew_conn *x = &st->conns[c];
    x->views = x->volumes = x->next_key = EW_NONE;
    x->cproc.comm = x->cproc.container = x->cproc.collector = EW_NONE;
    x->sproc = x->cproc;
    x->tunnel.vni = -1;
    x->tunnel.src = x->tunnel.dst = x->tunnel.src_host = x->tunnel.dst_host = EW_NONE;
    x->tunnel.type = EW_TUNNEL_NONE;
    x->svc_ip = EW_NONE;
    x->flags = CF_LIVE;
    st->live++;
    return c;
}

void ew_conn_free(ew_state *st, uint32_t ci)
{
    ew_conn *c = &st->conns[ci];
    ew_view_free_chain(st, c->views);
    ew_vol_free_chain(st, c->volumes);
    c->views = c->volumes = EW_NONE;
    c->flags = 0;
    c->next_key = st->free_conn;
    st->free_conn = ci;
    st->live--;
}

/* the connection's start and last_seen (min start, max end of its views) */
void ew_conn_bounds(ew_state *st, ew_conn *c)
{
    uint32_t v = c->views;
    if (v == EW_NONE) return;
    int64_t s = st->views[v].start, e = st->views[v].end;
    for (v = st->views[v].next; v != EW_NONE; v = st->views[v].next) {
        if (st->views[v].start < s) s = st->views[v].start;
        if (st->views[v].end > e) e = st->views[v].end;
    }
    c->start = s;
    c->last = e;
}

/* connection.Connection.closed: a final view other than a drop source's, or, when only drop
 * sources observed the connection, a final drops view */
int ew_is_closed(const ew_state *st, const ew_conn *c)
{
    int others = 0, drops_final = 0;
    for (uint32_t v = c->views; v != EW_NONE; v = st->views[v].next) {
        const ew_view *w = &st->views[v];
        if (w->observer == OBS_DROPS) {
            if (w->flags & VF_FINAL) drops_final = 1;
            continue;
        }
        others = 1;
        if (w->flags & VF_FINAL) return 1;
    }
    return !others && drops_final;
}

/* connection.Connection.best(): the socket views' maxima (retransmits: their sum), else the
 * path views'; packets from the socket views that counted them (UDP datagrams), else from the
 * path views; resets the maximum of all. -1 on overflow. */
int ew_best(ew_state *st, const ew_conn *c, int64_t out[6])
{
    int sock = 0, spk = 0;
    int64_t sb1 = 0, sb2 = 0, sret = 0, pb1 = 0, pb2 = 0, pk1 = 0, pk2 = 0, pret = 0, res = 0;
    int64_t sk1 = 0, sk2 = 0;
    for (uint32_t vi = c->views; vi != EW_NONE; vi = st->views[vi].next) {
        const ew_view *v = &st->views[vi];
        if (v->observer == OBS_DROPS) continue; /* drops count no volumes */
        if (v->resets > res) res = v->resets;
        if (v->observer != OBS_PATH) {
            sock = 1;
            if (v->b_c2s > sb1) sb1 = v->b_c2s;
            if (v->b_s2c > sb2) sb2 = v->b_s2c;
            if (v->flags & VF_P_C2S) { spk = 1; if (v->p_c2s > sk1) sk1 = v->p_c2s; }
            if (v->flags & VF_P_S2C) { spk = 1; if (v->p_s2c > sk2) sk2 = v->p_s2c; }
            if (__builtin_add_overflow(sret, v->retrans, &sret))
                return ew_fail(st, EW_E_OVERFLOW, "retransmits of a connection exceed int64");
        } else {
            if (v->b_c2s > pb1) pb1 = v->b_c2s;
            if (v->b_s2c > pb2) pb2 = v->b_s2c;
            if ((v->flags & VF_P_C2S) && v->p_c2s > pk1) pk1 = v->p_c2s;
            if ((v->flags & VF_P_S2C) && v->p_s2c > pk2) pk2 = v->p_s2c;
            if (v->retrans > pret) pret = v->retrans;
        }
    }
    out[0] = sock ? sb1 : pb1;
    out[1] = sock ? sb2 : pb2;
    out[2] = spk ? sk1 : pk1;
    out[3] = spk ? sk2 : pk2;
    out[4] = sock ? sret : pret;
    out[5] = res;
    return 0;
}

/* -- the key index ------------------------------------------------------------------------------ */
static inline uint64_t fmix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

uint32_t ew_key_hash(const ew_conn *k)
{
    uint64_t h = fmix64((uint64_t)k->protocol << 32 | k->cip);
    h = fmix64(h ^ ((uint64_t)k->sip << 32 | (uint64_t)k->cport << 16 | k->sport));
    h = fmix64(h ^ (uint64_t)k->scope);
    return (uint32_t)(h ^ (h >> 32));
}

static inline int key_eq(const ew_conn *a, const ew_conn *b)
{
    return a->cip == b->cip && a->sip == b->sip && a->cport == b->cport &&
           a->sport == b->sport && a->scope == b->scope && a->protocol == b->protocol;
}

ew_slot *ew_key_find(ew_state *st, const ew_conn *k, uint32_t hash)
{
    if (!st->capslot) return NULL;
    uint64_t mask = st->capslot - 1;
    for (uint64_t i = hash & mask;; i = (i + 1) & mask) {
        ew_slot *s = &st->slots[i];
        if (s->head == EW_NONE) return NULL;
        if (s->hash == hash && key_eq(&st->conns[s->head], k)) return s;
    }
}

ew_slot *ew_slot_insert(ew_slot *slots, uint64_t cap, uint32_t hash)
{
    uint64_t mask = cap - 1;
    uint64_t i = hash & mask;
    while (slots[i].head != EW_NONE) i = (i + 1) & mask;
    return &slots[i];
}

int ew_rehash(ew_state *st, uint64_t cap)
{
    ew_slot *slots = malloc(cap * sizeof(ew_slot));
    if (!slots) return 0;
    for (uint64_t i = 0; i < cap; i++) slots[i].head = EW_NONE;
    for (uint64_t i = 0; i < st->capslot; i++)
        if (st->slots[i].head != EW_NONE) *ew_slot_insert(slots, cap, st->slots[i].hash) = st->slots[i];
    free(st->slots);
    st->slots = slots;
    st->capslot = cap;
    return 1;
}

/* append connection `ci` to its key's list (a new key gets seq 0: the pending plan's, or the
 * caller sets it) */
int ew_key_append(ew_state *st, uint32_t ci)
{
    ew_conn *c = &st->conns[ci];
    uint32_t h = ew_key_hash(c);
    ew_slot *s = ew_key_find(st, c, h);
    if (s) {
        st->conns[s->tail].next_key = ci;
        s->tail = ci;
        c->next_key = EW_NONE;
        return 0;
    }
    if ((st->usedslot + 1) * 5 > st->capslot * 3) {
        uint64_t cap = st->capslot ? st->capslot * 2 : 1024;
        if (!ew_rehash(st, cap)) return ew_fail(st, EW_E_NOMEM, "no memory for the key index");
    }
    s = ew_slot_insert(st->slots, st->capslot, h);
    s->head = s->tail = ci;
    s->hash = h;
    s->pad = 0;
    s->seq = 0;
    c->next_key = EW_NONE;
    st->usedslot++;
    return 0;
}

void ew_slot_delete(ew_state *st, ew_slot *s)
{
    uint64_t mask = st->capslot - 1;
    uint64_t i = (uint64_t)(s - st->slots);
    for (uint64_t j = i;;) {
        j = (j + 1) & mask;
        if (st->slots[j].head == EW_NONE) break;
        uint64_t k = st->slots[j].hash & mask;
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
        st->slots[i] = st->slots[j];
        i = j;
    }
    st->slots[i].head = EW_NONE;
    st->usedslot--;
}

/* remove connection `ci` from its key's list; the key goes when its list is empty */
static void key_unlink(ew_state *st, uint32_t ci)
{
    ew_conn *c = &st->conns[ci];
    ew_slot *s = ew_key_find(st, c, ew_key_hash(c));
    if (!s) return;
    uint32_t prev = EW_NONE;
    for (uint32_t x = s->head; x != EW_NONE; prev = x, x = st->conns[x].next_key) {
        if (x != ci) continue;
        uint32_t next = st->conns[x].next_key;
        if (prev == EW_NONE) s->head = next;
        else st->conns[prev].next_key = next;
        if (s->tail == ci) s->tail = prev;
        break;
    }
    if (s->head == EW_NONE) ew_slot_delete(st, s);
}

/* -- life cycle ----------------------------------------------------------------------------- */
ew_state *ew_corr_new(void)
{
    ew_state *st = calloc(1, sizeof(ew_state));
    if (!st) return NULL;
    st->free_conn = st->free_view = st->free_vol = EW_NONE;
    return st;
}

static void release(ew_state *st)
{
    free(st->conns);
    free(st->views);
    free(st->vols);
    free(st->slots);
    free(st->touch);
    free(st->undo);
    free(st->ru);
    free(st->ru_slots);
    free(st->settled);
    free(st->sel);
    free(st->blob);
}

void ew_corr_free(ew_state *st)
{
    if (!st) return;
    release(st);
    free(st);
}

void ew_corr_configure(ew_state *st, int64_t slack, int64_t keep_closed, int64_t keep_open,
                       int64_t settle)
{
    st->slack = slack;
    st->keep_closed = keep_closed;
    st->keep_open = keep_open;
    st->settle = settle;
}

/* forget every connection (a reload from the store follows); counters and settings stay */
void ew_corr_reset(ew_state *st)
{
    ew_state keep = *st;
    release(st);
    memset(st, 0, sizeof *st);
    st->free_conn = st->free_view = st->free_vol = EW_NONE;
    st->slack = keep.slack;
    st->keep_closed = keep.keep_closed;
    st->keep_open = keep.keep_open;
    st->settle = keep.settle;
    st->renames = keep.renames;
    st->late_names = keep.late_names;
    st->since_prune = keep.since_prune;
}

void ew_raise_high_water(ew_state *st, int64_t t)
{
    if (!st->has_high_water || t > st->high_water) {
        st->high_water = t;
        st->has_high_water = 1;
    }
}

/* live, views, volume minutes, keys, bytes held, high water, has high water, pending,
 * touched, rollups, ids used, renames, late names, pending created */
void ew_corr_info(ew_state *st, int64_t *out)
{
    out[0] = (int64_t)st->live;
    out[1] = (int64_t)st->views_used;
    out[2] = (int64_t)st->vols_used;
    out[3] = (int64_t)st->usedslot;
    out[4] = (int64_t)(st->capconn * sizeof(ew_conn) + st->capview * sizeof(ew_view) +
                       st->capvol * sizeof(ew_vol) + st->capslot * sizeof(ew_slot));
    out[5] = st->high_water;
    out[6] = st->has_high_water;
    out[7] = st->pending;
    out[8] = (int64_t)st->ntouch;
    out[9] = (int64_t)st->nru;
    out[10] = st->ids_used;
    out[11] = st->renames;
    out[12] = st->late_names;
    out[13] = (int64_t)st->pending_created;
}

/* -- the end of a plan ---------------------------------------------------------------------- */
void ew_rollback_plan(ew_state *st)
{
    for (uint64_t t = st->ntouch; t-- > 0;) {
        uint32_t ci = st->touch[t].conn;
        ew_conn *c = &st->conns[ci];
        if (st->touch[t].created) {
            key_unlink(st, ci);
            ew_conn_free(st, ci);
        } else {
            ew_view_free_chain(st, c->views);
            ew_vol_free_chain(st, c->volumes);
            uint32_t next = c->next_key; /* bucket links are the index's, not the snapshot's */
            *c = st->undo[t];
            c->next_key = next;
            c->touched = 0;
        }
    }
    st->ntouch = 0;
    st->nru = 0;
    st->pending = 0;
    st->pending_created = 0;
    st->any_renamed = 0;
}

int ew_corr_rollback(ew_state *st)
{
    if (!st->pending) return ew_fail(st, EW_E_STATE, "no pending plan to roll back");
    ew_rollback_plan(st);
    return 0;
}

int64_t ew_corr_prune(ew_state *st);

/* the pending plan becomes the state: the originals of copied connections are freed, new keys
 * enter the index in plan order, the high water rises; every 50 commits, a prune. Returns the
 * connections pruned. */
int64_t ew_corr_commit(ew_state *st)
{
    if (!st->pending) return ew_fail(st, EW_E_STATE, "no pending plan to commit");
    for (uint64_t t = 0; t < st->ntouch; t++) {
        uint32_t ci = st->touch[t].conn;
        ew_conn *c = &st->conns[ci];
        if (st->touch[t].created) {
            c->flags &= (uint8_t)~CF_CREATED;
            ew_slot *s = ew_key_find(st, c, ew_key_hash(c));
            if (s && s->seq == 0) s->seq = ++st->next_seq;
        } else {
            ew_view_free_chain(st, st->undo[t].views);
            ew_vol_free_chain(st, st->undo[t].volumes);
        }
        c->touched = 0;
        ew_raise_high_water(st, c->last);
    }
    st->ntouch = 0;
    st->nru = 0;
    st->pending = 0;
    st->pending_created = 0;
    st->any_renamed = 0;
    if (++st->since_prune >= 50) {
        st->since_prune = 0;
        return ew_corr_prune(st);
    }
    return 0;
}

/* -- prune ------------------------------------------------------------------------------------ */
typedef struct { uint64_t seq; uint64_t pos; uint32_t conn; } pruned_t;

static int by_order(const void *a, const void *b)
{
    const pruned_t *x = a, *y = b;
    if (x->seq != y->seq) return x->seq < y->seq ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static int settle_id(ew_state *st, const uint8_t *id)
{
    if (!ew_grow((void **)&st->settled, &st->capsettled, (st->nsettled + 1) * 16, 1))
        return ew_fail(st, EW_E_NOMEM, "no memory for settled ids");
    memcpy(st->settled + st->nsettled * 16, id, 16);
    st->nsettled++;
    return 0;
}

/* forget connections that can no longer be joined (Correlator.prune): closed ones
 * `keep_closed` after their last record, open ones `keep_open` (record time: the high water) */
int64_t ew_corr_prune(ew_state *st)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "prune while a plan is pending");
    if (!st->has_high_water || !st->usedslot) return 0;
    int64_t closed_after = st->high_water - st->keep_closed;
    int64_t open_after = st->high_water - st->keep_open;
    pruned_t *gone = NULL;
    uint64_t ngone = 0, capgone = 0;
    int emptied = 0;
    for (uint64_t i = 0; i < st->capslot; i++) {
        ew_slot *s = &st->slots[i];
        if (s->head == EW_NONE) continue;
        uint32_t head = EW_NONE, tail = EW_NONE;
        uint64_t pos = 0;
        for (uint32_t x = s->head; x != EW_NONE; pos++) {
            ew_conn *c = &st->conns[x];
            uint32_t next = c->next_key;
            if (c->last >= (ew_is_closed(st, c) ? closed_after : open_after)) {
                if (head == EW_NONE) head = x;
                else st->conns[tail].next_key = x;
                tail = x;
                c->next_key = EW_NONE;
            } else {
                if (!ew_grow((void **)&gone, &capgone, ngone + 1, sizeof(pruned_t))) {
                    free(gone);
                    return ew_fail(st, EW_E_NOMEM, "no memory to prune");
                }
                gone[ngone].seq = s->seq;
                gone[ngone].pos = pos;
                gone[ngone].conn = x;
                ngone++;
            }
            x = next;
        }
        s->head = head;
        s->tail = tail;
        if (head == EW_NONE) emptied = 1;
    }
    if (emptied) { /* rebuild without the emptied keys */
        ew_slot *old = st->slots;
        uint64_t cap = st->capslot;
        st->slots = NULL;
        st->capslot = 0;
        uint64_t used = 0;
        for (uint64_t i = 0; i < cap; i++) used += old[i].head != EW_NONE;
        uint64_t want = 1024;
        while (used * 5 > want * 3) want *= 2;
        if (!ew_rehash(st, want)) {
            st->slots = old;
            st->capslot = cap;
            free(gone);
            return ew_fail(st, EW_E_NOMEM, "no memory to rebuild the key index");
        }
        for (uint64_t i = 0; i < cap; i++)
            if (old[i].head != EW_NONE) *ew_slot_insert(st->slots, st->capslot, old[i].hash) = old[i];
        st->usedslot = used;
        free(old);
    }
    if (ngone) qsort(gone, ngone, sizeof(pruned_t), by_order);
    int rc = 0;
    for (uint64_t k = 0; k < ngone; k++) {
        if (!rc) rc = settle_id(st, st->conns[gone[k].conn].id);
        ew_conn_free(st, gone[k].conn);
    }
    free(gone);
    return rc ? rc : (int64_t)ngone;
}

static const char HEX[] = "0123456789abcdef";

void ew_hex(const uint8_t *id, char *out)
{
    for (int k = 0; k < 16; k++) {
        out[2 * k] = HEX[id[k] >> 4];
        out[2 * k + 1] = HEX[id[k] & 15];
    }
}

/* hand over (as 32 hex digits each) and forget the settled ids; how many */
int64_t ew_corr_settled(ew_state *st, char *out, int64_t cap)
{
    int64_t n = (int64_t)st->nsettled < cap ? (int64_t)st->nsettled : cap;
    for (int64_t k = 0; k < n; k++) ew_hex(st->settled + 16 * k, out + 32 * k);
    if (n && st->nsettled > (uint64_t)n)
        memmove(st->settled, st->settled + 16 * n, (st->nsettled - (uint64_t)n) * 16);
    st->nsettled -= (uint64_t)n;
    return n;
}

int64_t ew_corr_nsettled(ew_state *st) { return (int64_t)st->nsettled; }
