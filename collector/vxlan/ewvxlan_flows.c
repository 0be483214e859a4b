/* ewvxlan_flows.c: a capture file -> batches of flow sessions, one pass, no per-packet output.
 *
 * Stage: the bulk path of `eastwest collector --pcap` (collector/vxlan/scan.py drives it).
 * In: a walker (ewvxlan_walk.c) positioned at the next record. Out, per call (one batch): the
 * number of records consumed, whether the batch ends at a tick (and its time), drop counts per
 * reason, and one row of EW_NFIELDS uint64 per session: what flows.FlowTable.merge adds into
 * its flows. Nothing is kept per packet: each frame is decoded (ew_decode) and summed into its
 * session in a hash table as it is read.
 *
 * Batches end where source.chunks cuts the capture: where the running maximum of packet time
 * enters a new `interval` (a tick), or after `chunk` records. Within a batch the rules are
 * those of the numpy grouping (collector/vxlan/grouping.py), which the tests hold this to:
 * a flow key is (VNI, tunnel type, family, protocol, lower endpoint, higher endpoint, the
 * nested tunnels around the flow's: packets.outer_key); a key's
 * packets are
 * cut into sessions where the gap since its previous packet exceeds the idle timeout, or where
 * a TCP SYN without ACK follows a FIN or RST of the same key since its previous SYN (or gap).
 * Rows come out in the numpy order: by a 64-bit key hash (the same function), sessions of one
 * key in capture order; if two keys share a hash, by key, exactly as the numpy lexsort.
 */
#include "ewvxlan.h"

#include <stdlib.h>
#include <string.h>

#define M1 0x9E3779B97F4A7C15ull
#define M2 0xBF58476D1CE4E5B9ull
#define SYN 0x02
#define ACK 0x10
#define FIN 0x01
#define RST 0x04
#ifndef EW_ORDER_HASH_MASK /* tests make hashes collide on purpose (grouping.ORDER_HASH_MASK) */
#define EW_ORDER_HASH_MASK 0xFFFFFFFFFFFFFFFFull
#endif

/* Per packet, the loop touches one cache line of its key and one of its session: a key is
 * packed into 6 words and kept with its per-packet state in 64 bytes; a session's sums are
 * 64 bytes too, apart from what only its first packet, SYNs, FINs, RSTs and the first outer
 * header of each direction touch. */
struct key {
    uint64_t k[6]; /* vni | proto << 24 | a_port << 32 | b_port << 48,
                      fam | ttype << 4 | xkey << 8 (xkey < 2^52), a_hi, a_lo, b_hi, b_lo */
    int64_t last_ts;
    uint32_t sess;
    uint8_t fr; /* a FIN or RST since the key's last SYN-without-ACK, gap or start */
    uint8_t pad[3];
};

struct slot {
    uint32_t key; /* key index + 1; 0 = empty */
    uint32_t probe;
};

enum { HAVE_O0 = 1, HAVE_O1 = 2, HAVE_REQ = 4, HAVE_REP = 8 }; /* struct hot .have */

struct hot {
    uint64_t by0, by1, l30, l31;
    int64_t tmin, tmax;
    uint32_t cnt, pk0;
    uint8_t flags, tail_fr, have, pad[5];
};

struct cold {
    uint32_t key, rst, fin0, fin1, has_syn;
    uint8_t newkey, start_syn, first_dir, syn_dir, synack_dir, req_dir, rep_dir;
    uint64_t outer[2][EW_OUTER_WORDS]; /* per direction, per tunnel (the flow's, x1, x2):
                                          fam, src hi/lo, dst hi/lo, dport */
};

_Static_assert(sizeof(struct key) == 64, "a key is one cache line");
_Static_assert(sizeof(struct hot) == 64, "a session's sums are one cache line");

struct ord;

struct ew_scan {
    struct key *keys;
    uint64_t *ohash; /* each key's order hash */
    uint32_t nkeys, capkeys;
    struct slot *slots;
    uint32_t capslots; /* a power of two */
    struct hot *hot;
    struct cold *cold;
    uint32_t nsess, capsess;
    struct ord *order;
    uint64_t *rows;
    uint64_t caprows;
    uint64_t drops[EW_NREASONS], decoded;
    int started;
    int64_t runmax, bucket, lo, hi; /* the current interval: [lo, hi) = bucket's */
};

const char *ew_row_fields(void) { return EW_ROW_FIELDS; }

struct ew_scan *ew_scan_new(void) { return calloc(1, sizeof(struct ew_scan)); }

void ew_scan_free(struct ew_scan *s) {
    if (!s)
        return;
    free(s->keys);
    free(s->ohash);
    free(s->slots);
    free(s->hot);
    free(s->cold);
    free(s->order);
    free(s->rows);
    free(s);
}

/* *p (n elements of size) moved to a cache-line aligned block of cap elements */
static int grow(void **p, uint32_t n, uint32_t cap, size_t size) {
    void *q;
    if (posix_memalign(&q, 64, (size_t)cap * size))
        return -1;
    if (n)
        memcpy(q, *p, (size_t)n * size);
    free(*p);
    *p = q;
    return 0;
}

static void unpack(const uint64_t *p, uint64_t *k) {
    k[0] = p[0] & 0xFFFFFF;         /* vni */
    k[1] = p[1] >> 4 & 0xF;         /* tunnel type */
    k[2] = p[1] & 0xF;              /* family */
    k[3] = p[0] >> 24 & 0xFF;       /* protocol */
    k[4] = p[2];                    /* A */
    k[5] = p[3];
    k[6] = p[0] >> 32 & 0xFFFF;
    k[7] = p[4];                    /* B */
    k[8] = p[5];
    k[9] = p[0] >> 48;
    k[10] = p[1] >> 8;              /* xkey: the nested tunnels around the flow's */
}

#define KEY_COLUMNS 11

/* the order hash of grouping.py's `group`, over the key columns */
static uint64_t key_hash(const uint64_t *k) {
    uint64_t h = 0;
    for (int i = 0; i < KEY_COLUMNS; i++) {
        h = (h ^ k[i]) * M1;
        h ^= h >> 31;
        h *= M2;
    }
    return h & EW_ORDER_HASH_MASK;
}

/* the table's hash: cheap (independent multiplies), computed per packet */
static inline uint32_t probe_hash(const uint64_t *p) {
    uint64_t h = p[0] * 0x9E3779B97F4A7C15ull ^ p[1] * 0x94D049BB133111EBull ^
                 p[2] * 0xC2B2AE3D27D4EB4Full ^ p[3] * 0x165667B19E3779F9ull ^
                 p[4] * 0xD6E8FEB86659FD93ull ^ p[5] * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
    h *= 0xC4CEB9FE1A85EC53ull;
    return (uint32_t)(h ^ h >> 29);
}

static int grow_slots(struct ew_scan *s) {
    uint32_t cap = s->capslots ? s->capslots * 2 : 1024;
    struct slot *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    for (uint32_t i = 0; i < s->capslots; i++) {
        if (!s->slots[i].key)
            continue;
        uint32_t j = s->slots[i].probe & (cap - 1);
        while (slots[j].key)
            j = (j + 1) & (cap - 1);
        slots[j] = s->slots[i];
    }
    free(s->slots);
    s->slots = slots;
    s->capslots = cap;
    return 0;
}

static inline int same_key(const uint64_t *a, const uint64_t *b) {
    return a[0] == b[0] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5] &&
           a[1] == b[1];
}

static struct key *find_key(struct ew_scan *s, const uint64_t *p) {
    if ((uint64_t)(s->nkeys + 1) * 2 > s->capslots && grow_slots(s))
        return NULL;
    uint32_t h = probe_hash(p), mask = s->capslots - 1, j = h & mask;
    for (; s->slots[j].key; j = (j + 1) & mask) {
        if (s->slots[j].probe == h) {
            struct key *e = &s->keys[s->slots[j].key - 1];
            if (same_key(e->k, p))
                return e;
        }
    }
    if (s->nkeys == s->capkeys) {
        uint32_t cap = s->capkeys ? s->capkeys * 2 : 1024;
        if (grow((void **)&s->keys, s->nkeys, cap, sizeof *s->keys) ||
            grow((void **)&s->ohash, s->nkeys, cap, sizeof *s->ohash))
            return NULL;
        s->capkeys = cap;
    }
    struct key *e = &s->keys[s->nkeys];
    uint64_t kc[KEY_COLUMNS];
    memcpy(e->k, p, sizeof e->k);
    e->sess = UINT32_MAX;
    e->fr = 0;
    unpack(p, kc);
    s->ohash[s->nkeys] = key_hash(kc);
    s->slots[j].key = ++s->nkeys;
    s->slots[j].probe = h;
    return e;
}

static struct hot *new_sess(struct ew_scan *s, struct key *e, int newkey, int64_t ts,
                            int pure_syn, int dir) {
    if (s->nsess == s->capsess) {
        uint32_t cap = s->capsess ? s->capsess * 2 : 1024;
        if (grow((void **)&s->hot, s->nsess, cap, sizeof *s->hot) ||
            grow((void **)&s->cold, s->nsess, cap, sizeof *s->cold))
            return NULL;
        s->capsess = cap;
    }
    struct hot *x = &s->hot[s->nsess];
    struct cold *c = &s->cold[s->nsess];
    memset(x, 0, sizeof *x);
    memset(c, 0, sizeof *c);
    x->tmin = x->tmax = ts;
    c->key = (uint32_t)(e - s->keys);
    c->newkey = (uint8_t)newkey;
    c->start_syn = (uint8_t)pure_syn;
    c->first_dir = (uint8_t)dir;
    c->syn_dir = c->synack_dir = c->req_dir = c->rep_dir = EW_DIR_NONE;
    e->sess = s->nsess++;
    return x;
}

/* one tunnel's outer header as a session row keeps it: fam, src hi/lo, dst hi/lo, dport */
static inline void put_outer(uint64_t *q, uint64_t fam, uint64_t src_hi, uint64_t src_lo,
                             uint64_t dst_hi, uint64_t dst_lo, uint64_t dport) {
    q[0] = fam;
    q[1] = src_hi;
    q[2] = src_lo;
    q[3] = dst_hi;
    q[4] = dst_lo;
    q[5] = dport;
}

static int add(struct ew_scan *s, const struct ew_row *r, int64_t ts, int64_t idle_us) {
    int swap = r->src_hi > r->dst_hi ||
               (r->src_hi == r->dst_hi &&
                (r->src_lo > r->dst_lo || (r->src_lo == r->dst_lo && r->sport > r->dport)));
    uint64_t ap = swap ? r->dport : r->sport, bp = swap ? r->sport : r->dport;
    uint64_t xkey = ((uint64_t)r->x[0].type << 24 | r->x[0].vni) |
                    ((uint64_t)r->x[1].type << 24 | r->x[1].vni) << 26; /* packets.outer_key */
    uint64_t p[6] = {(uint64_t)r->vni | (uint64_t)r->proto << 24 | ap << 32 | bp << 48,
                     (uint64_t)r->fam | (uint64_t)r->ttype << 4 | xkey << 8,
                     swap ? r->dst_hi : r->src_hi, swap ? r->dst_lo : r->src_lo,
                     swap ? r->src_hi : r->dst_hi, swap ? r->src_lo : r->dst_lo};
    struct key *e = find_key(s, p);
    if (!e)
        return -1;
    int tcp = r->proto == 6, fl = r->flags;
    int pure_syn = tcp && (fl & (SYN | ACK)) == SYN;
    struct hot *x;
    if (e->sess == UINT32_MAX) {
        x = new_sess(s, e, 1, ts, pure_syn, swap);
        e->fr = 0;
    } else if (ts - e->last_ts > idle_us) {
        x = new_sess(s, e, 0, ts, pure_syn, swap);
        e->fr = 0;
    } else if (pure_syn) {
        x = e->fr ? new_sess(s, e, 0, ts, pure_syn, swap) : &s->hot[e->sess];
        e->fr = 0;
    } else {
        x = &s->hot[e->sess];
    }
    if (!x)
        return -1;
    if (tcp && (fl & (FIN | RST)))
        e->fr = 1;
    e->last_ts = ts;
    x->cnt++;
    x->pk0 += !swap;
    if (swap) {
        x->by1 += (uint64_t)r->payload;
        x->l31 += (uint64_t)r->l3len;
    } else {
        x->by0 += (uint64_t)r->payload;
        x->l30 += (uint64_t)r->l3len;
    }
    x->flags |= (uint8_t)fl;
    if (ts < x->tmin)
        x->tmin = ts;
    if (ts > x->tmax)
        x->tmax = ts;
    x->tail_fr = e->fr;
    int synack = tcp && (fl & (SYN | ACK)) == (SYN | ACK);
    int icmp = (r->fam == 4 && r->proto == 1) || (r->fam == 6 && r->proto == 58);
    int req = icmp && r->icmp_type == (r->fam == 4 ? 8 : 128);
    int rep = icmp && r->icmp_type == (r->fam == 4 ? 0 : 129);
    int have = swap ? HAVE_O1 : HAVE_O0;
    if ((tcp && (fl & (FIN | RST | SYN))) || (req && !(x->have & HAVE_REQ)) ||
        (rep && !(x->have & HAVE_REP)) || !(x->have & have)) {
        struct cold *c = &s->cold[e->sess];
        c->rst += tcp && (fl & RST);
        c->fin0 += tcp && !swap && (fl & FIN);
        c->fin1 += tcp && swap && (fl & FIN);
        c->has_syn += pure_syn;
        if (pure_syn && c->syn_dir == EW_DIR_NONE)
            c->syn_dir = (uint8_t)swap;
        if (synack && c->synack_dir == EW_DIR_NONE)
            c->synack_dir = (uint8_t)swap;
        if (req && c->req_dir == EW_DIR_NONE)
            c->req_dir = (uint8_t)swap;
        if (rep && c->rep_dir == EW_DIR_NONE)
            c->rep_dir = (uint8_t)swap;
        x->have |= (uint8_t)((c->req_dir != EW_DIR_NONE ? HAVE_REQ : 0) |
                             (c->rep_dir != EW_DIR_NONE ? HAVE_REP : 0));
        if (!(x->have & have)) {
            uint64_t *o = c->outer[swap];
            put_outer(o, r->ofam, r->osrc_hi, r->osrc_lo, r->odst_hi, r->odst_lo, r->odport);
            for (int k = 0; k < EW_MAX_TUNNELS - 1; k++) {
                const struct ew_around *t = &r->x[k];
                put_outer(o + 6 * (k + 1), t->fam, t->src_hi, t->src_lo, t->dst_hi, t->dst_lo,
                          t->dport);
            }
            x->have |= (uint8_t)have;
        }
    }
    return 0;
}

struct ord {
    uint64_t hash;
    const uint64_t *key; /* packed */
    uint32_t sess;
};

static int by_hash(const void *a, const void *b) {
    const struct ord *x = a, *y = b;
    if (x->hash != y->hash)
        return x->hash < y->hash ? -1 : 1;
    return x->sess < y->sess ? -1 : x->sess > y->sess;
}

static int by_key(const void *a, const void *b) {
    const struct ord *x = a, *y = b;
    uint64_t kx[KEY_COLUMNS], ky[KEY_COLUMNS];
    unpack(x->key, kx);
    unpack(y->key, ky);
    for (int i = 0; i < KEY_COLUMNS; i++)
        if (kx[i] != ky[i])
            return kx[i] < ky[i] ? -1 : 1;
    return x->sess < y->sess ? -1 : x->sess > y->sess;
}

static int emit_rows(struct ew_scan *s) {
    uint32_t n = s->nsess;
    struct ord *order = realloc(s->order, (n ? n : 1) * sizeof *order);
    if (!order)
        return -1;
    s->order = order;
    if ((uint64_t)n * EW_NFIELDS > s->caprows) {
        uint64_t *rows = realloc(s->rows, (uint64_t)n * EW_NFIELDS * sizeof *rows);
        if (!rows)
            return -1;
        s->rows = rows;
        s->caprows = (uint64_t)n * EW_NFIELDS;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = s->cold[i].key;
        order[i] = (struct ord){s->ohash[k], s->keys[k].k, i};
    }
    qsort(order, n, sizeof *order, by_hash); /* sessions are numbered in capture order */
    for (uint32_t i = 1; i < n; i++) {
        if (order[i - 1].hash == order[i].hash && order[i - 1].key != order[i].key) {
            qsort(order, n, sizeof *order, by_key); /* two keys, one hash: by key */
            break;
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        const struct hot *x = &s->hot[order[i].sess];
        const struct cold *c = &s->cold[order[i].sess];
        uint64_t *w = s->rows + (uint64_t)i * EW_NFIELDS;
        unpack(order[i].key, w);
        uint64_t rest[EW_NFIELDS - KEY_COLUMNS - 2 * EW_OUTER_WORDS] = {
            c->newkey, (uint64_t)x->tmin, (uint64_t)x->tmax, c->start_syn, x->pk0, x->cnt,
            x->by0, x->by1, x->l30, x->l31, x->flags, c->rst, c->fin0, c->fin1, c->first_dir,
            c->syn_dir, c->synack_dir, c->req_dir, c->rep_dir, c->has_syn, x->tail_fr};
        memcpy(w + KEY_COLUMNS, rest, sizeof rest);
        memcpy(w + EW_NFIELDS - 2 * EW_OUTER_WORDS, c->outer, sizeof c->outer);
    }
    return 0;
}

/* One batch from the walker's position. out[0] records consumed, out[1] 1 if the batch ends
 * at a tick, out[2] the tick's time (µs), out[3] 1 at the end of the file, out[4] sessions.
 * Returns 0, -1 on a walk error (ew_walk_error), -2 when out of memory. */
int ew_scan_batch(struct ew_scan *s, struct ew_walk *w, const uint8_t *kinds, int plain,
                  int64_t idle_us, int64_t interval_us, int64_t chunk, int64_t *out) {
    struct ew_policy pol = {kinds, plain};
    int64_t k = 0;
    s->nkeys = s->nsess = 0;
    if (s->slots)
        memset(s->slots, 0, s->capslots * sizeof *s->slots);
    memset(s->drops, 0, sizeof s->drops);
    s->decoded = 0;
    out[1] = out[2] = out[3] = 0;
    while (k < chunk) {
        struct ew_rec rec;
        int rc = ew_walk_peek(w, &rec);
        if (rc < 0)
            return -1;
        if (rc == 0) {
            out[3] = 1;
            break;
        }
        int64_t m = s->started && s->runmax > rec.ts ? s->runmax : rec.ts, b = s->bucket;
        if (!s->started || m < s->lo || m >= s->hi) { /* floor division, as numpy's // */
            b = m / interval_us - (m % interval_us < 0);
            s->lo = b * interval_us;
            s->hi = s->lo + interval_us;
        }
        if (s->started && b != s->bucket) {
            out[1] = 1;
            out[2] = (s->bucket + 1) * interval_us;
            s->bucket = b;
            break;
        }
        s->started = 1;
        s->runmax = m;
        s->bucket = b;
        ew_walk_advance(w);
        k++;
        struct ew_row row;
        int st = ew_decode(rec.data, rec.cap, rec.linktype, &pol, &row);
        if (st != EW_OK) {
            s->drops[st]++;
            continue;
        }
        s->decoded++;
        if (add(s, &row, rec.ts, idle_us))
            return -2;
    }
    if (emit_rows(s))
        return -2;
    out[0] = k;
    out[4] = s->nsess;
    return 0;
}

const uint64_t *ew_scan_rows(const struct ew_scan *s) { return s->rows; }
const uint64_t *ew_scan_drops(const struct ew_scan *s) { return s->drops; }
