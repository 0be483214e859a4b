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
 * a flow key is (VNI, family, protocol, lower endpoint, higher endpoint); a key's packets are
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

struct key {
    uint64_t k[9], hash, probe; /* hash: the order hash (grouping.py's); probe: the table's */
    int64_t last_ts;
    int32_t sess;
    uint8_t fr; /* a FIN or RST since the key's last SYN-without-ACK, gap or start */
};

struct sess {
    uint64_t hash;
    uint32_t key;
    int64_t tmin, tmax;
    uint64_t pk0, cnt, by0, by1, l30, l31, flags, rst, fin0, fin1, has_syn;
    uint8_t newkey, start_syn, tail_fr, first_dir, syn_dir, synack_dir, req_dir, rep_dir;
    uint64_t outer[2][6]; /* fam (0: none yet), src hi/lo, dst hi/lo, dport */
};

struct ord;

struct ew_scan {
    struct key *keys;
    uint32_t nkeys, capkeys;
    uint32_t *slots, capslots; /* key index + 1; 0 = empty; capslots a power of two */
    struct sess *sess;
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
    free(s->slots);
    free(s->sess);
    free(s->order);
    free(s->rows);
    free(s);
}

static uint64_t key_hash(const uint64_t *k) {
    uint64_t h = 0;
    for (int i = 0; i < 9; i++) {
        h = (h ^ k[i]) * M1;
        h ^= h >> 31;
        h *= M2;
    }
    return h & EW_ORDER_HASH_MASK;
}

/* the table's hash: cheap (independent multiplies), computed per packet; the order hash
 * (key_hash, 9 dependent rounds) only once per key and batch */
static inline uint64_t probe_hash(const uint64_t *k) {
    uint64_t small = k[0] | k[1] << 24 | k[2] << 32 | ((k[5] << 40) ^ (k[8] << 48));
    uint64_t h = small * 0x9E3779B97F4A7C15ull ^ k[3] * 0xC2B2AE3D27D4EB4Full ^
                 k[4] * 0x165667B19E3779F9ull ^ k[6] * 0xD6E8FEB86659FD93ull ^
                 k[7] * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
    h *= 0xC4CEB9FE1A85EC53ull;
    return h ^ h >> 29;
}

static int grow_slots(struct ew_scan *s) {
    uint32_t cap = s->capslots ? s->capslots * 2 : 1024;
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return -1;
    for (uint32_t i = 0; i < s->nkeys; i++) {
        uint32_t j = (uint32_t)s->keys[i].probe & (cap - 1);
        while (slots[j])
            j = (j + 1) & (cap - 1);
        slots[j] = i + 1;
    }
    free(s->slots);
    s->slots = slots;
    s->capslots = cap;
    return 0;
}

static inline int same_key(const uint64_t *a, const uint64_t *b) {
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
           a[5] == b[5] && a[6] == b[6] && a[7] == b[7] && a[8] == b[8];
}

static struct key *find_key(struct ew_scan *s, const uint64_t *k) {
    if ((uint64_t)(s->nkeys + 1) * 2 > s->capslots && grow_slots(s))
        return NULL;
    uint64_t h = probe_hash(k);
    uint32_t mask = s->capslots - 1, j = (uint32_t)h & mask;
    for (; s->slots[j]; j = (j + 1) & mask) {
        struct key *e = &s->keys[s->slots[j] - 1];
        if (e->probe == h && same_key(e->k, k))
            return e;
    }
    if (s->nkeys == s->capkeys) {
        uint32_t cap = s->capkeys ? s->capkeys * 2 : 1024;
        struct key *n = realloc(s->keys, cap * sizeof *n);
        if (!n)
            return NULL;
        s->keys = n;
        s->capkeys = cap;
    }
    struct key *e = &s->keys[s->nkeys];
    memcpy(e->k, k, sizeof e->k);
    e->probe = h;
    e->hash = key_hash(k);
    e->sess = -1;
    e->fr = 0;
    s->slots[j] = ++s->nkeys;
    return e;
}

static struct sess *new_sess(struct ew_scan *s, struct key *e, int newkey) {
    if (s->nsess == s->capsess) {
        uint32_t cap = s->capsess ? s->capsess * 2 : 1024;
        struct sess *n = realloc(s->sess, cap * sizeof *n);
        if (!n)
            return NULL;
        s->sess = n;
        s->capsess = cap;
    }
    struct sess *x = &s->sess[s->nsess];
    memset(x, 0, sizeof *x);
    x->hash = e->hash;
    x->key = (uint32_t)(e - s->keys);
    x->newkey = (uint8_t)newkey;
    x->syn_dir = x->synack_dir = x->req_dir = x->rep_dir = EW_DIR_NONE;
    e->sess = (int32_t)s->nsess++;
    return x;
}

static int add(struct ew_scan *s, const struct ew_row *r, int64_t ts, int64_t idle_us) {
    int swap = r->src_hi > r->dst_hi ||
               (r->src_hi == r->dst_hi &&
                (r->src_lo > r->dst_lo || (r->src_lo == r->dst_lo && r->sport > r->dport)));
    uint64_t k[9] = {r->vni, r->fam, r->proto,
                     swap ? r->dst_hi : r->src_hi, swap ? r->dst_lo : r->src_lo,
                     swap ? r->dport : r->sport,
                     swap ? r->src_hi : r->dst_hi, swap ? r->src_lo : r->dst_lo,
                     swap ? r->sport : r->dport};
    struct key *e = find_key(s, k);
    if (!e)
        return -1;
    int tcp = r->proto == 6, fl = r->flags;
    int pure_syn = tcp && (fl & (SYN | ACK)) == SYN;
    int synack = tcp && (fl & (SYN | ACK)) == (SYN | ACK);
    int finrst = tcp && (fl & (FIN | RST));
    struct sess *x;
    if (e->sess < 0) {
        if (!(x = new_sess(s, e, 1)))
            return -1;
        e->fr = 0;
    } else if (ts - e->last_ts > idle_us) {
        if (!(x = new_sess(s, e, 0)))
            return -1;
        e->fr = 0;
    } else if (pure_syn) {
        if (e->fr) {
            if (!(x = new_sess(s, e, 0)))
                return -1;
        } else {
            x = &s->sess[e->sess];
        }
        e->fr = 0;
    } else {
        x = &s->sess[e->sess];
    }
    if (finrst)
        e->fr = 1;
    e->last_ts = ts;
    if (x->cnt == 0) {
        x->tmin = x->tmax = ts;
        x->start_syn = (uint8_t)pure_syn;
        x->first_dir = (uint8_t)swap;
    }
    x->cnt++;
    x->pk0 += !swap;
    if (swap) {
        x->by1 += (uint64_t)r->payload;
        x->l31 += (uint64_t)r->l3len;
        x->fin1 += tcp && (fl & FIN);
    } else {
        x->by0 += (uint64_t)r->payload;
        x->l30 += (uint64_t)r->l3len;
        x->fin0 += tcp && (fl & FIN);
    }
    x->flags |= (uint64_t)fl;
    x->rst += tcp && (fl & RST);
    x->has_syn += pure_syn;
    if (ts < x->tmin)
        x->tmin = ts;
    if (ts > x->tmax)
        x->tmax = ts;
    if (pure_syn && x->syn_dir == EW_DIR_NONE)
        x->syn_dir = (uint8_t)swap;
    if (synack && x->synack_dir == EW_DIR_NONE)
        x->synack_dir = (uint8_t)swap;
    int icmp = (r->fam == 4 && r->proto == 1) || (r->fam == 6 && r->proto == 58);
    if (icmp && x->req_dir == EW_DIR_NONE && r->icmp_type == (r->fam == 4 ? 8 : 128))
        x->req_dir = (uint8_t)swap;
    if (icmp && x->rep_dir == EW_DIR_NONE && r->icmp_type == (r->fam == 4 ? 0 : 129))
        x->rep_dir = (uint8_t)swap;
    uint64_t *o = x->outer[swap];
    if (!o[0]) {
        o[0] = r->ofam;
        o[1] = r->osrc_hi;
        o[2] = r->osrc_lo;
        o[3] = r->odst_hi;
        o[4] = r->odst_lo;
        o[5] = r->odport;
    }
    x->tail_fr = e->fr;
    return 0;
}

struct ord {
    uint64_t hash;
    const uint64_t *key;
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
    for (int i = 0; i < 9; i++)
        if (x->key[i] != y->key[i])
            return x->key[i] < y->key[i] ? -1 : 1;
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
    for (uint32_t i = 0; i < n; i++)
        order[i] = (struct ord){s->sess[i].hash, s->keys[s->sess[i].key].k, i};
    qsort(order, n, sizeof *order, by_hash); /* sessions are numbered in capture order */
    for (uint32_t i = 1; i < n; i++) {
        if (order[i - 1].hash == order[i].hash && order[i - 1].key != order[i].key) {
            qsort(order, n, sizeof *order, by_key); /* two keys, one hash: by key */
            break;
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        const struct sess *x = &s->sess[order[i].sess];
        uint64_t *w = s->rows + (uint64_t)i * EW_NFIELDS;
        memcpy(w, order[i].key, 9 * sizeof *w);
        uint64_t rest[EW_NFIELDS - 9 - 12] = {
            x->newkey, (uint64_t)x->tmin, (uint64_t)x->tmax, x->start_syn, x->pk0, x->cnt,
            x->by0, x->by1, x->l30, x->l31, x->flags, x->rst, x->fin0, x->fin1, x->first_dir,
            x->syn_dir, x->synack_dir, x->req_dir, x->rep_dir, x->has_syn, x->tail_fr};
        memcpy(w + 9, rest, sizeof rest);
        memcpy(w + EW_NFIELDS - 12, x->outer, 12 * sizeof *w);
    }
    return 0;
}

/* One batch from the walker's position. out[0] records consumed, out[1] 1 if the batch ends
 * at a tick, out[2] the tick's time (µs), out[3] 1 at the end of the file, out[4] sessions.
 * Returns 0, -1 on a walk error (ew_walk_error), -2 when out of memory. */
int ew_scan_batch(struct ew_scan *s, struct ew_walk *w, const uint16_t *ports, int nports,
                  int64_t idle_us, int64_t interval_us, int64_t chunk, int64_t *out) {
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
        int st = rec.linktype != 1 ? EW_LINKTYPE
                                   : ew_decode(rec.data, rec.cap, ports, nports, &row);
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
