/* The columnar correlator's state in and out in bulk: connections loaded from the store
 * (Correlator.load), every held connection selected in index order (materializing them), a
 * shared store's copy of some keys (Correlator.refresh), and the ids the connections refer to
 * (compaction of the Python dictionaries, aggregator/correlate_core.py).
 *
 * Stage: correlation, outside a plan (each refuses while one is pending). In/out: matrices in
 * the `LD_*`/`LV_*` layouts of correlate_native.h, ids, id maps.
 */
#include <stdlib.h>
#include <string.h>

#include "correlate_native.h"

/* -- the ids the held connections refer to (compaction of the Python dictionaries) ----------- */
/* with `map` NULL: mark (1) in `used_*` every string, address and identity id a held
 * connection refers to; else rewrite every such id `x` to `map_*[x]`. */
static inline void id_visit(uint32_t *x, uint8_t *used, const int32_t *map)
{
    if (*x == EW_NONE) return;
    if (map) *x = (uint32_t)map[*x];
    else used[*x] = 1;
}

static int64_t visit_ids(ew_state *st, uint8_t *us, uint8_t *ua, uint8_t *ui, const int32_t *ms,
                         const int32_t *ma, const int32_t *mi)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "compaction while a plan is pending");
    for (uint64_t ci = 0; ci < st->nconn; ci++) {
        ew_conn *c = &st->conns[ci];
        if (!(c->flags & CF_LIVE)) continue;
        id_visit(&c->protocol, us, ms);
        id_visit(&c->cip, ua, ma);
        id_visit(&c->sip, ua, ma);
        id_visit(&c->client, ui, mi);
        id_visit(&c->server, ui, mi);
        ew_proc *procs[2] = {&c->cproc, &c->sproc};
        for (int k = 0; k < 2; k++) {
            id_visit(&procs[k]->comm, us, ms);
            id_visit(&procs[k]->container, us, ms);
            id_visit(&procs[k]->collector, us, ms);
        }
        if (c->tunnel.vni >= 0) {
            id_visit(&c->tunnel.src, ua, ma);
            id_visit(&c->tunnel.dst, ua, ma);
            id_visit(&c->tunnel.src_host, us, ms);
            id_visit(&c->tunnel.dst_host, us, ms);
        }
        if (c->svc_ip != EW_NONE) id_visit(&c->svc_ip, ua, ma);
        for (uint32_t v = c->views; v != EW_NONE; v = st->views[v].next) {
            id_visit(&st->views[v].collector, us, ms);
            id_visit(&st->views[v].reason, us, ms); /* a drops view's reason */
        }
    }
    return 0;
}

int64_t ew_corr_used(ew_state *st, uint8_t *strs, uint8_t *addrs, uint8_t *idents)
{
    return visit_ids(st, strs, addrs, idents, NULL, NULL, NULL);
}

/* ... and the index, whose hashes are of the ids */
int64_t ew_corr_remap(ew_state *st, const int32_t *strs, const int32_t *addrs,
                      const int32_t *idents)
{
    int64_t rc = visit_ids(st, NULL, NULL, NULL, strs, addrs, idents);
    if (rc < 0 || !st->capslot) return rc;
    ew_slot *old = st->slots;
    uint64_t cap = st->capslot;
    ew_slot *slots = malloc(cap * sizeof(ew_slot));
    if (!slots) return ew_fail(st, EW_E_NOMEM, "no memory to rebuild the key index");
    for (uint64_t i = 0; i < cap; i++) slots[i].head = EW_NONE;
    for (uint64_t i = 0; i < cap; i++) {
        if (old[i].head == EW_NONE) continue;
        uint32_t h = ew_key_hash(&st->conns[old[i].head]);
        ew_slot *s = ew_slot_insert(slots, cap, h);
        *s = old[i];
        s->hash = h;
    }
    st->slots = slots;
    free(old);
    return 0;
}

/* -- a shared store's copy of some keys (Correlator.refresh) --------------------------------- */
static void key_of(ew_conn *k, const int64_t *key)
{
    k->protocol = (uint32_t)key[0];
    k->cip = (uint32_t)key[1];
    k->cport = (uint16_t)key[2];
    k->sip = (uint32_t)key[3];
    k->sport = (uint16_t)key[4];
    k->scope = key[5];
}

/* forget a key's connections without settling them (what replaces them is loaded next): the
 * key's seq, 0 when it was not held. `key`: protocol, client ip, client port, server ip,
 * server port, scope (ids where strings). */
int64_t ew_corr_drop_key(ew_state *st, const int64_t *key)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "refresh while a plan is pending");
    ew_conn k;
    key_of(&k, key);
    ew_slot *s = ew_key_find(st, &k, ew_key_hash(&k));
    if (!s) return 0;
    int64_t seq = (int64_t)s->seq;
    for (uint32_t x = s->head; x != EW_NONE;) {
        uint32_t next = st->conns[x].next_key;
        ew_conn_free(st, x);
        x = next;
    }
    ew_slot_delete(st, s);
    return seq;
}

/* the key keeps its place in the index's order (a dict's key replaced in place) */
int64_t ew_corr_key_seq(ew_state *st, const int64_t *key, int64_t seq)
{
    ew_conn k;
    key_of(&k, key);
    ew_slot *s = ew_key_find(st, &k, ew_key_hash(&k));
    if (!s) return ew_fail(st, EW_E_STATE, "no such key");
    s->seq = (uint64_t)seq;
    return 0;
}

/* -- every connection, in index order (keys by seq, then bucket order) ------------------------ */
typedef struct { uint64_t seq; uint64_t slot; } keyorder_t;

static int by_seq(const void *a, const void *b)
{
    const keyorder_t *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

int64_t ew_corr_select_all(ew_state *st)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "select while a plan is pending");
    keyorder_t *keys = malloc((st->usedslot + 1) * sizeof(keyorder_t));
    if (!keys) return ew_fail(st, EW_E_NOMEM, "no memory to list the keys");
    uint64_t nk = 0;
    for (uint64_t i = 0; i < st->capslot; i++)
        if (st->slots[i].head != EW_NONE) {
            keys[nk].seq = st->slots[i].seq;
            keys[nk].slot = i;
            nk++;
        }
    if (nk) qsort(keys, nk, sizeof(keyorder_t), by_seq);
    st->nsel = 0;
    if (!ew_grow((void **)&st->sel, &st->capsel, st->live + 1, sizeof(uint32_t))) {
        free(keys);
        return ew_fail(st, EW_E_NOMEM, "no memory to list the connections");
    }
    for (uint64_t k = 0; k < nk; k++)
        for (uint32_t x = st->slots[keys[k].slot].head; x != EW_NONE; x = st->conns[x].next_key)
            st->sel[st->nsel++] = x;
    free(keys);
    return (int64_t)st->nsel;
}

/* the connections of one key, in bucket order (aggregator/nodeport.py: a NodePort half's) */
int64_t ew_corr_select_key(ew_state *st, const int64_t *key)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "select while a plan is pending");
    ew_conn k;
    key_of(&k, key);
    ew_slot *s = ew_key_find(st, &k, ew_key_hash(&k));
    st->nsel = 0;
    if (!s) return 0;
    uint64_t n = 0;
    for (uint32_t x = s->head; x != EW_NONE; x = st->conns[x].next_key) n++;
    if (!ew_grow((void **)&st->sel, &st->capsel, n + 1, sizeof(uint32_t)))
        return ew_fail(st, EW_E_NOMEM, "no memory to list the connections");
    for (uint32_t x = s->head; x != EW_NONE; x = st->conns[x].next_key) st->sel[st->nsel++] = x;
    return (int64_t)st->nsel;
}

/* -- load --------------------------------------------------------------------------------- */
static uint32_t opt_id(int64_t v, uint8_t valid) { return valid ? (uint32_t)v : EW_NONE; }

static void load_proc(ew_proc *p, const int64_t *row, const uint8_t *ok, int64_t n, int base)
{
    /* base: LD_CPROC or LD_SPROC; the five fields follow it in the LD_* order */
    if (!ok[base * n]) return;
    p->flags = PF_SET;
    if (ok[(base + 1) * n]) { p->flags |= PF_PID; p->pid = row[(base + 1) * n]; }
    p->comm = opt_id(row[(base + 2) * n], ok[(base + 2) * n]);
    if (ok[(base + 3) * n]) { p->flags |= PF_NETNS; p->netns = row[(base + 3) * n]; }
    p->container = opt_id(row[(base + 4) * n], ok[(base + 4) * n]);
    p->collector = opt_id(row[(base + 5) * n], ok[(base + 5) * n]);
}

/* connections as the store gave them back (Correlator.load): `ld` (n x LD_NCOL) with validity,
 * their views in order (`lv`, nv x LV_NCOL), their volume minutes (`lm`, nm x LM_NCOL); ids
 * 16 bytes each. Appended to their keys' lists in this order. */
int64_t ew_corr_load(ew_state *st, int64_t n, const uint8_t *ids, const int64_t *ld,
                     const uint8_t *ldok, int64_t nv, const int64_t *lv, const uint8_t *lvok,
                     int64_t nm, const int64_t *lm)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "load while a plan is pending");
    int64_t v = 0, m = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t *r = ld + i;
        const uint8_t *ok = ldok + i;
        uint32_t ci = ew_conn_alloc(st);
        if (ci == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for connections");
        ew_conn *c = &st->conns[ci];
        memcpy(c->id, ids + 16 * i, 16);
        c->protocol = (uint32_t)r[LD_PROTOCOL * n];
        c->family = (int8_t)r[LD_FAMILY * n];
        c->cip = (uint32_t)r[LD_CIP * n];
        c->cport = (uint16_t)r[LD_CPORT * n];
        c->sip = (uint32_t)r[LD_SIP * n];
        c->sport = (uint16_t)r[LD_SPORT * n];
        c->scope = r[LD_SCOPE * n];
        c->client = (uint32_t)r[LD_CLIENT * n];
        c->server = (uint32_t)r[LD_SERVER * n];
        if (r[LD_LINK_LOCAL * n]) c->flags |= CF_LINK_LOCAL;
        if (ok[LD_UNTIL * n]) {
            c->flags |= CF_NAMING;
            c->until = r[LD_UNTIL * n];
        }
        load_proc(&c->cproc, r, ok, n, LD_CPROC);
        load_proc(&c->sproc, r, ok, n, LD_SPROC);
        if (ok[LD_VNI * n]) {
            c->tunnel.vni = (int32_t)r[LD_VNI * n];
            c->tunnel.src = (uint32_t)r[LD_VTEP_SRC * n];
            c->tunnel.dst = (uint32_t)r[LD_VTEP_DST * n];
            c->tunnel.src_host = opt_id(r[LD_VTEP_SRC_HOST * n], ok[LD_VTEP_SRC_HOST * n]);
            c->tunnel.dst_host = opt_id(r[LD_VTEP_DST_HOST * n], ok[LD_VTEP_DST_HOST * n]);
            if (r[LD_TUNNEL_TYPE * n] < EW_TUNNEL_VXLAN || r[LD_TUNNEL_TYPE * n] > EW_TUNNEL_GPE)
                return ew_fail(st, EW_E_INPUT, "load: tunnel type %lld",
                               (long long)r[LD_TUNNEL_TYPE * n]);
            c->tunnel.type = (uint8_t)r[LD_TUNNEL_TYPE * n];
        }
        if (ok[LD_SVC_IP * n]) {
            c->svc_ip = (uint32_t)r[LD_SVC_IP * n];
            c->svc_port = (uint16_t)r[LD_SVC_PORT * n];
            c->svc_rank = r[LD_SVC_RANK * n];
        }
        uint32_t tail = EW_NONE;
        for (int64_t k = 0; k < r[LD_NVIEWS * n]; k++, v++) {
            if (v >= nv) return ew_fail(st, EW_E_INPUT, "load: fewer views than counted");
            uint32_t vi = ew_view_alloc(st);
            if (vi == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for views");
            c = &st->conns[ci];
            ew_view *w = &st->views[vi];
            const int64_t *q = lv + v;
            const uint8_t *qok = lvok + v;
            w->observer = (uint8_t)q[LV_OBSERVER * nv];
            w->collector = (uint32_t)q[LV_COLLECTOR * nv];
            w->start = q[LV_START * nv];
            w->end = q[LV_END * nv];
            w->flags = (uint8_t)((q[LV_FINAL * nv] ? VF_FINAL : 0) |
                                 (q[LV_INCOMPLETE * nv] ? VF_INCOMPLETE : 0) |
                                 (qok[LV_P_C2S * nv] ? VF_P_C2S : 0) |
                                 (qok[LV_P_S2C * nv] ? VF_P_S2C : 0) |
                                 (qok[LV_RTT_MIN * nv] ? VF_RTT : 0));
            w->b_c2s = q[LV_B_C2S * nv];
            w->b_s2c = q[LV_B_S2C * nv];
            w->p_c2s = qok[LV_P_C2S * nv] ? q[LV_P_C2S * nv] : 0;
            w->p_s2c = qok[LV_P_S2C * nv] ? q[LV_P_S2C * nv] : 0;
            w->retrans = q[LV_RETRANS * nv];
            w->resets = q[LV_RESETS * nv];
            w->connect = (uint8_t)q[LV_CONNECT * nv];
            w->reason = qok[LV_REASON * nv] ? (uint32_t)q[LV_REASON * nv] : EW_NONE;
            for (int j = 0; j < 3; j++) w->rtt[j] = (w->flags & VF_RTT) ? q[(LV_RTT_MIN + j) * nv] : 0;
            if (tail == EW_NONE) c->views = vi;
            else st->views[tail].next = vi;
            tail = vi;
        }
        if (c->views == EW_NONE) return ew_fail(st, EW_E_INPUT, "load: a connection without views");
        tail = EW_NONE;
        for (int64_t k = 0; k < r[LD_NVOLS * n]; k++, m++) {
            if (m >= nm) return ew_fail(st, EW_E_INPUT, "load: fewer volumes than counted");
            uint32_t mi = ew_vol_alloc(st);
            if (mi == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for volumes");
            c = &st->conns[ci];
            st->vols[mi].minute = lm[m];
            for (int j = 0; j < 6; j++) st->vols[mi].c[j] = lm[(1 + j) * nm + m];
            if (tail == EW_NONE) c->volumes = mi;
            else st->vols[tail].next = mi;
            tail = mi;
        }
        ew_conn_bounds(st, c);
        int rc = ew_key_append(st, ci);
        if (rc < 0) return rc;
        ew_slot *s = ew_key_find(st, c, ew_key_hash(c));
        if (s->seq == 0) s->seq = ++st->next_seq;
        ew_raise_high_water(st, st->conns[ci].last);
    }
    return n;
}
