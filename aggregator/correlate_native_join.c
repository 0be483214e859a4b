/* A plan: the records of one batch joined to their connections, by the rules of
 * aggregator/correlate.py (`Correlator.plan`, `_find`, `_apply`, `_rename`, `_improve`), on
 * columns (`ew_input`, one record per index) and integer ids (correlate_native.h).
 *
 * Stage: correlation. In: the batch (records in `order`: by end, stable), the identity tables.
 * Out: the state changed in place with an undo log (correlate_native.c), the touched
 * connections in plan order with their created/renamed flags and deltas, the rollup rows.
 *
 * What the Python side decided per record: the candidate identity of each end
 * (`cand_client`/`cand_server`: `Correlator._identity` for the record), what the observer knows
 * (`knows`), the link-local flag of the key's addresses; and per identity, the total order of
 * `identity.better()` (`id_order`), whether it is static, its rollup (wid, host) id.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "correlate_native.h"

static inline int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b) != 0 && ((a < 0) != (b < 0))) q--;
    return q;
}

/* the connection's view in the record's slot ("client", "server", "path:<collector>"; for a
 * drop source, its first view of any reason: the join rule's view of that observer) */
static uint32_t find_view(const ew_state *st, const ew_conn *c, uint8_t obs, uint32_t coll)
{
    for (uint32_t v = c->views; v != EW_NONE; v = st->views[v].next) {
        const ew_view *w = &st->views[v];
        if (w->observer == obs && (obs < OBS_PATH || w->collector == coll)) return v;
    }
    return EW_NONE;
}

/* a drop source's view of one reason ("drops:<collector>:<reason>") */
static uint32_t find_drops_view(const ew_state *st, const ew_conn *c, uint32_t coll,
                                uint32_t reason)
{
    for (uint32_t v = c->views; v != EW_NONE; v = st->views[v].next) {
        const ew_view *w = &st->views[v];
        if (w->observer == OBS_DROPS && w->collector == coll && w->reason == reason) return v;
    }
    return EW_NONE;
}

/* Correlator._find: among the key's connections (in candidate order), the one the record joins.
 * The distance is the reference's float (`abs(timedelta.total_seconds())`): record times are
 * bounded (the Python side refuses others) so that |difference| < 2^53 µs and the double
 * computed here is the same, ties included (the first candidate wins). */
static uint32_t find(const ew_state *st, uint32_t head, uint8_t obs, uint32_t coll, int64_t rs,
                     int64_t re)
{
    uint32_t best = EW_NONE;
    double best_d = 0.0;
    for (uint32_t ci = head; ci != EW_NONE; ci = st->conns[ci].next_key) {
        const ew_conn *c = &st->conns[ci];
        int outside = re < c->start - st->slack || rs > c->last + st->slack;
        /* outside the window, a view of the record's slot cannot have its start either (that
         * start would lie in [c->start, c->last]): skip without walking the views */
        if (outside && st->slack >= 0) continue;
        uint32_t mine = find_view(st, c, obs, coll);
        double d;
        if (mine != EW_NONE) {
            if (st->views[mine].start != rs) continue;
            d = 0.0;
        } else {
            if (outside) continue;
            /* the reference's `same` test cannot hold here: without a view in the record's
             * slot the connection has none of a socket observer's either (slot == observer) */
            d = fabs((double)(c->start - rs) / 1e6);
        }
        if (best == EW_NONE || d < best_d) {
            best = ci;
            best_d = d;
        }
    }
    return best;
}

static int touch_add(ew_state *st, uint32_t ci, uint8_t created)
{
    if (!ew_grow((void **)&st->touch, &st->captouch, st->ntouch + 1, sizeof(ew_touch)) ||
        !ew_grow((void **)&st->undo, &st->capundo, st->ntouch + 1, sizeof(ew_conn)))
        return ew_fail(st, EW_E_NOMEM, "no memory for the plan");
    ew_touch *t = &st->touch[st->ntouch];
    memset(t, 0, sizeof *t);
    t->conn = ci;
    t->created = created;
    st->conns[ci].touched = (uint32_t)++st->ntouch;
    return 0;
}

/* the first time the plan touches a committed connection: remember it, and give it copies of
 * its views and volumes to change (the reference's `found.clone()`) */
static int clone(ew_state *st, uint32_t ci)
{
    int rc = touch_add(st, ci, 0);
    if (rc < 0) return rc;
    st->undo[st->ntouch - 1] = st->conns[ci];
    uint32_t tail = EW_NONE, head = EW_NONE;
    for (uint32_t v = st->conns[ci].views; v != EW_NONE; v = st->views[v].next) {
        uint32_t nv = ew_view_alloc(st);
        if (nv == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for views");
        st->views[nv] = st->views[v];
        st->views[nv].next = EW_NONE;
        if (tail == EW_NONE) head = nv;
        else st->views[tail].next = nv;
        tail = nv;
    }
    st->conns[ci].views = head;
    tail = head = EW_NONE;
    for (uint32_t m = st->conns[ci].volumes; m != EW_NONE; m = st->vols[m].next) {
        uint32_t nm = ew_vol_alloc(st);
        if (nm == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for volumes");
        st->vols[nm] = st->vols[m];
        st->vols[nm].next = EW_NONE;
        if (tail == EW_NONE) head = nm;
        else st->vols[tail].next = nm;
        tail = nm;
    }
    st->conns[ci].volumes = head;
    return 0;
}

/* Correlator._new */
static uint32_t new_conn(ew_state *st, const ew_input *in, const ew_tables *tb, int64_t i,
                         const ew_conn *key, int *rc)
{
    if (st->ids_used >= in->n_ids) {
        *rc = ew_fail(st, EW_E_IDS, "no connection id left for record %lld", (long long)i);
        return EW_NONE;
    }
    uint32_t ci = ew_conn_alloc(st);
    if (ci == EW_NONE) {
        *rc = ew_fail(st, EW_E_NOMEM, "no memory for connections");
        return EW_NONE;
    }
    ew_conn *c = &st->conns[ci];
    memcpy(c->id, in->ids + 16 * st->ids_used++, 16);
    c->protocol = key->protocol;
    c->cip = key->cip;
    c->cport = key->cport;
    c->sip = key->sip;
    c->sport = key->sport;
    c->scope = key->scope;
    c->family = in->family[i];
    c->client = (uint32_t)in->cand_client[i];
    c->server = (uint32_t)in->cand_server[i];
    c->flags |= CF_CREATED | (in->link_local[i] ? CF_LINK_LOCAL : 0);
    if (st->settle && !(tb->id_static[c->client] && tb->id_static[c->server])) {
        c->flags |= CF_NAMING;
        c->until = st->at + st->settle;
    }
    st->pending_created++;
    *rc = ew_key_append(st, ci);
    if (*rc < 0) return EW_NONE;
    *rc = touch_add(st, ci, 1);
    return *rc < 0 ? EW_NONE : ci;
}

/* the record's view replaces the slot's (same position) or is appended (insertion order) */
static int set_view(ew_state *st, uint32_t ci, uint32_t v, const ew_input *in, int64_t i)
{
    if (v == EW_NONE) {
        v = ew_view_alloc(st);
        if (v == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for views");
        uint32_t t = st->conns[ci].views;
        if (t == EW_NONE) {
            st->conns[ci].views = v;
        } else {
            while (st->views[t].next != EW_NONE) t = st->views[t].next;
            st->views[t].next = v;
        }
    }
    ew_view *w = &st->views[v];
    w->start = in->start[i];
    w->end = in->end[i];
    w->b_c2s = in->b_c2s[i];
    w->b_s2c = in->b_s2c[i];
    w->p_c2s = in->has_p_c2s[i] ? in->p_c2s[i] : 0;
    w->p_s2c = in->has_p_s2c[i] ? in->p_s2c[i] : 0;
    w->retrans = in->retrans[i];
    w->resets = in->resets[i];
    w->rtt[0] = in->has_rtt[i] ? in->rtt_min[i] : 0;
    w->rtt[1] = in->has_rtt[i] ? in->rtt_avg[i] : 0;
    w->rtt[2] = in->has_rtt[i] ? in->rtt_max[i] : 0;
    w->collector = (uint32_t)in->collector[i];
    w->observer = in->observer[i];
    w->reason = in->reason[i] < 0 ? EW_NONE : (uint32_t)in->reason[i];
    w->connect = in->connect[i];
    w->flags = (uint8_t)((in->final[i] ? VF_FINAL : 0) | (in->incomplete[i] ? VF_INCOMPLETE : 0) |
                         (in->has_p_c2s[i] ? VF_P_C2S : 0) | (in->has_p_s2c[i] ? VF_P_S2C : 0) |
                         (in->has_rtt[i] ? VF_RTT : 0));
    if (w->observer == OBS_DROPS) { /* Correlator._drops: the reason's packets, nothing else */
        w->b_c2s = w->b_s2c = w->p_s2c = w->retrans = w->resets = 0;
        w->rtt[0] = w->rtt[1] = w->rtt[2] = 0;
        /* connect: refused for a UDP datagram no socket wanted, set by the expansion
         * (correlate_drops.py, connection.refused_by_drop), else none */
        w->flags = (uint8_t)((w->flags & (VF_FINAL | VF_INCOMPLETE)) | VF_P_C2S);
    }
    ew_conn_bounds(st, &st->conns[ci]);
    return 0;
}

static inline uint32_t opt(int32_t id) { return id < 0 ? EW_NONE : (uint32_t)id; }

/* Correlator._absorb_side_facts: the observer's own process; the first tunnel */
static void absorb(ew_conn *c, const ew_input *in, int64_t i)
{
    uint8_t obs = in->observer[i];
    if (obs != OBS_PATH) {
        ew_proc *p = obs == OBS_CLIENT ? &c->cproc : &c->sproc;
        p->flags = PF_SET | (in->has_pid[i] ? PF_PID : 0) | (in->has_netns[i] ? PF_NETNS : 0);
        p->pid = in->has_pid[i] ? in->pid[i] : 0;
        p->comm = in->has_pid[i] ? opt(in->comm[i]) : EW_NONE;
        p->netns = in->has_netns[i] ? in->netns[i] : 0;
        p->container = opt(in->container[i]);
        p->collector = opt(in->collector[i]);
    }
    if (in->vni[i] >= 0 && c->tunnel.vni < 0) {
        c->tunnel.vni = in->vni[i];
        c->tunnel.src = (uint32_t)in->outer_src[i];
        c->tunnel.dst = (uint32_t)in->outer_dst[i];
        c->tunnel.src_host = opt(in->vtep_src_host[i]);
        c->tunnel.dst_host = opt(in->vtep_dst_host[i]);
        c->tunnel.type = in->tunnel_type[i];
    }
    /* the dialled Service address: of every observer's, the lowest rank (any arrival order) */
    if (in->svc_ip[i] >= 0 && (c->svc_ip == EW_NONE || in->svc_rank[i] < c->svc_rank)) {
        c->svc_ip = (uint32_t)in->svc_ip[i];
        c->svc_port = (uint16_t)in->svc_port[i];
        c->svc_rank = in->svc_rank[i];
    }
}

/* -- rollups: a hash of the plan's rows, in insertion order -------------------------------- */
static inline uint32_t ru_hash(int64_t minute, uint32_t cwh, uint32_t swh, uint32_t proto,
                               uint16_t sport, uint8_t ll)
{
    uint64_t h = (uint64_t)minute * 0x9E3779B97F4A7C15ULL;
    h ^= ((uint64_t)cwh << 32 | swh) * 0xC2B2AE3D27D4EB4FULL;
    h ^= ((uint64_t)proto << 24 | (uint64_t)sport << 8 | ll) * 0x165667B19E3779F9ULL;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 32;
    return (uint32_t)h;
}

static int ru_rehash(ew_state *st, uint64_t cap)
{
    uint32_t *slots = calloc(cap, sizeof(uint32_t));
    if (!slots) return 0;
    for (uint64_t e = 0; e < st->nru; e++) {
        const ew_rollup *r = &st->ru[e];
        uint64_t j = ru_hash(r->minute, r->cwh, r->swh, r->protocol, r->sport, r->link_local) &
                     (cap - 1);
        while (slots[j]) j = (j + 1) & (cap - 1);
        slots[j] = (uint32_t)e + 1;
    }
    free(st->ru_slots);
    st->ru_slots = slots;
    st->ru_capslot = cap;
    return 1;
}

/* Correlator._add: `delta` (negated with `neg`) onto the rollup row of the connection's current
 * names in `minute`; the row remembers these identities (the last ones added win) */
static int ru_add(ew_state *st, const ew_tables *tb, uint32_t ci, int64_t minute,
                  const int64_t d[6], int neg)
{
    const ew_conn *c = &st->conns[ci];
    uint32_t cwh = (uint32_t)tb->id_wh[c->client], swh = (uint32_t)tb->id_wh[c->server];
    uint8_t ll = (c->flags & CF_LINK_LOCAL) ? 1 : 0;
    if ((st->nru + 1) * 2 > st->ru_capslot &&
        !ru_rehash(st, st->ru_capslot ? st->ru_capslot * 2 : 1024))
        return ew_fail(st, EW_E_NOMEM, "no memory for rollups");
    uint64_t mask = st->ru_capslot - 1;
    uint64_t j = ru_hash(minute, cwh, swh, c->protocol, c->sport, ll) & mask;
    ew_rollup *r = NULL;
    for (; st->ru_slots[j]; j = (j + 1) & mask) {
        ew_rollup *x = &st->ru[st->ru_slots[j] - 1];
        if (x->minute == minute && x->cwh == cwh && x->swh == swh && x->sport == c->sport &&
            x->protocol == c->protocol && x->link_local == ll) {
            r = x;
            break;
        }
    }
    if (!r) {
        if (!ew_grow((void **)&st->ru, &st->capru, st->nru + 1, sizeof(ew_rollup)))
            return ew_fail(st, EW_E_NOMEM, "no memory for rollups");
        r = &st->ru[st->nru];
        memset(r, 0, sizeof *r);
        r->minute = minute;
        r->cwh = cwh;
        r->swh = swh;
        r->protocol = c->protocol;
        r->sport = c->sport;
        r->link_local = ll;
        st->ru_slots[j] = (uint32_t)++st->nru;
    }
    r->client = c->client;
    r->server = c->server;
    for (int k = 0; k < 6; k++) {
        int64_t x = d[k];
        if (neg && __builtin_sub_overflow((int64_t)0, x, &x))
            return ew_fail(st, EW_E_OVERFLOW, "a rollup volume exceeds int64");
        if (__builtin_add_overflow(r->c[k], x, &r->c[k]))
            return ew_fail(st, EW_E_OVERFLOW, "a rollup volume exceeds int64");
    }
    return 0;
}

/* connection.Naming.volumes: `delta` added to `minute` (appended when new) */
static int vol_add(ew_state *st, uint32_t ci, int64_t minute, const int64_t d[6])
{
    uint32_t tail = EW_NONE;
    for (uint32_t m = st->conns[ci].volumes; m != EW_NONE; tail = m, m = st->vols[m].next) {
        if (st->vols[m].minute != minute) continue;
        for (int k = 0; k < 6; k++)
            if (__builtin_add_overflow(st->vols[m].c[k], d[k], &st->vols[m].c[k]))
                return ew_fail(st, EW_E_OVERFLOW, "a connection's volume exceeds int64");
        return 0;
    }
    uint32_t m = ew_vol_alloc(st);
    if (m == EW_NONE) return ew_fail(st, EW_E_NOMEM, "no memory for volumes");
    st->vols[m].minute = minute;
    memcpy(st->vols[m].c, d, sizeof st->vols[m].c);
    if (tail == EW_NONE) st->conns[ci].volumes = m;
    else st->vols[tail].next = m;
    return 0;
}

static void drop_naming(ew_state *st, ew_conn *c)
{
    ew_vol_free_chain(st, c->volumes);
    c->volumes = EW_NONE;
    c->flags &= (uint8_t)~CF_NAMING;
}

/* Correlator._improve: `cur`, or what the record's observer knows of `side` if better */
static uint32_t improve(const ew_tables *tb, const ew_input *in, int64_t i, uint8_t side,
                        uint32_t cur)
{
    if (tb->id_static[cur]) return cur;
    uint8_t k = in->knows[i];
    int wl = side == OBS_CLIENT ? (k & KNOWS_CLIENT_WL) : (k & KNOWS_SERVER_WL);
    if (!wl && !(in->observer[i] == side && (k & KNOWS_OWN_SIDE))) return cur;
    uint32_t cand = (uint32_t)(side == OBS_CLIENT ? in->cand_client[i] : in->cand_server[i]);
    return tb->id_order[cand] < tb->id_order[cur] ? cand : cur;
}

/* Correlator._rename: better names move the volumes attributed so far; after `until`, they
 * are counted (late_names) and the names are final */
static int rename_ends(ew_state *st, const ew_input *in, const ew_tables *tb, int64_t i,
                       uint32_t ci)
{
    ew_conn *c = &st->conns[ci];
    uint32_t nc = improve(tb, in, i, OBS_CLIENT, c->client);
    uint32_t ns = improve(tb, in, i, OBS_SERVER, c->server);
    if (nc == c->client && ns == c->server) return 0;
    if (!(c->flags & CF_NAMING) || st->at >= c->until) {
        drop_naming(st, c);
        st->late_names++;
        return 0;
    }
    int rc;
    for (uint32_t m = c->volumes; m != EW_NONE; m = st->vols[m].next)
        if ((rc = ru_add(st, tb, ci, st->vols[m].minute, st->vols[m].c, 1)) < 0) return rc;
    c = &st->conns[ci];
    c->client = nc;
    c->server = ns;
    for (uint32_t m = c->volumes; m != EW_NONE; m = st->vols[m].next)
        if ((rc = ru_add(st, tb, ci, st->vols[m].minute, st->vols[m].c, 0)) < 0) return rc;
    c = &st->conns[ci];
    if (tb->id_static[nc] && tb->id_static[ns]) drop_naming(st, c);
    st->touch[c->touched - 1].renamed = 1;
    st->any_renamed = 1;
    st->renames++;
    return 0;
}

/* Correlator._apply: one record */
static int apply(ew_state *st, const ew_input *in, const ew_tables *tb, int64_t i)
{
    ew_conn key;
    key.protocol = (uint32_t)in->protocol[i];
    key.cip = (uint32_t)in->cip[i];
    key.cport = (uint16_t)in->cport[i];
    key.sip = (uint32_t)in->sip[i];
    key.sport = (uint16_t)in->sport[i];
    key.scope = in->scope[i];
    uint8_t obs = in->observer[i];
    uint32_t coll = (uint32_t)in->collector[i];
    int64_t rs = in->start[i], re = in->end[i];
    ew_slot *s = ew_key_find(st, &key, ew_key_hash(&key));
    uint32_t ci = s ? find(st, s->head, obs, coll, rs, re) : EW_NONE;
    int64_t before[6] = {0, 0, 0, 0, 0, 0}, after[6], delta[6];
    int created = ci == EW_NONE, rc = 0;
    uint32_t v = EW_NONE;
    if (created) {
        ci = new_conn(st, in, tb, i, &key, &rc);
        if (ci == EW_NONE) return rc;
    } else if (!st->conns[ci].touched && (rc = clone(st, ci)) < 0) {
        return rc;
    }
    if (obs == OBS_DROPS) {
        /* Correlator._drops: one row per reason (correlate_input.py expands a drops record),
         * its view superseded like any; no volumes, no names, no side facts */
        v = find_drops_view(st, &st->conns[ci], coll, (uint32_t)in->reason[i]);
        if (v != EW_NONE) {
            const ew_view *old = &st->views[v];
            int old_final = (old->flags & VF_FINAL) != 0;
            if ((old_final && !in->final[i]) || (old->end > re && (old_final || !in->final[i])))
                return 0;
        }
        return set_view(st, ci, v, in, i);
    }
    if (!created) {
        v = find_view(st, &st->conns[ci], obs, coll);
        if (v != EW_NONE) {
            const ew_view *old = &st->views[v];
            /* an interim record after its observer's final one, or a late interim: the final
             * (or newer cumulative) view supersedes it (the connection stays touched, as the
             * reference's clone does) */
            int old_final = (old->flags & VF_FINAL) != 0;
            if ((old_final && !in->final[i]) || (old->end > re && (old_final || !in->final[i])))
                return 0;
        }
        if ((rc = ew_best(st, &st->conns[ci], before)) < 0) return rc;
    }
    if ((rc = set_view(st, ci, v, in, i)) < 0) return rc;
    absorb(&st->conns[ci], in, i);
    if (!created && (obs != OBS_PATH || (in->knows[i] & (KNOWS_CLIENT_WL | KNOWS_SERVER_WL))) &&
        (rc = rename_ends(st, in, tb, i, ci)) < 0)
        return rc;
    if ((rc = ew_best(st, &st->conns[ci], after)) < 0) return rc;
    if (!memcmp(before, after, sizeof before)) return 0;
    for (int k = 0; k < 6; k++)
        if (__builtin_sub_overflow(after[k], before[k], &delta[k]))
            return ew_fail(st, EW_E_OVERFLOW, "a delta exceeds int64");
    int64_t minute = floor_div(re, 60000000) * 60000000;
    if ((rc = ru_add(st, tb, ci, minute, delta, 0)) < 0) return rc;
    ew_touch *t = &st->touch[st->conns[ci].touched - 1];
    t->has_delta = 1;
    for (int k = 0; k < 6; k++)
        if (__builtin_add_overflow(t->delta[k], delta[k], &t->delta[k]))
            return ew_fail(st, EW_E_OVERFLOW, "a connection's delta exceeds int64");
    if (st->conns[ci].flags & CF_NAMING) return vol_add(st, ci, minute, delta);
    return 0;
}

/* Correlator.plan: every record in `order`; the plan stays pending until commit or rollback.
 * The number of touched connections, or an error (the state is then as before). */
int64_t ew_corr_plan(ew_state *st, const ew_input *in, const ew_tables *tb)
{
    if (st->pending) return ew_fail(st, EW_E_STATE, "a plan is pending");
    st->ntouch = 0;
    st->nru = 0;
    st->ids_used = 0;
    st->any_renamed = 0;
    st->pending_created = 0;
    st->at = in->at;
    if (st->ru_capslot) memset(st->ru_slots, 0, st->ru_capslot * sizeof(uint32_t));
    st->pending = 1;
    for (int64_t k = 0; k < in->n; k++) {
        int64_t i = in->order[k];
        int rc = apply(st, in, tb, i);
        if (rc < 0) {
            ew_rollback_plan(st);
            return rc;
        }
    }
    return (int64_t)st->ntouch;
}
