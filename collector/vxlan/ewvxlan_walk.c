/* ewvxlan_walk.c: capture file records, walked in C (a pcap file is a linked list of record
 * headers: each one's length gives the next one's offset, so no vector trick walks it).
 *
 * In: a capture, either as an open file (read here with pread through a small window) or as
 * the caller's buffer (pcapfile.read_index's map), and what pcapfile.py read from its first
 * header (format, byte order, time unit, link type). Out: one record at a time, with a pointer
 * to its frame (ew_walk_peek / ew_walk_advance, for ewvxlan_flows.c), or index arrays
 * (ew_walk_index), or a count that validates the whole file (ew_walk_count). Errors stop the
 * walk with a code, a byte offset and two values that pcapfile.walk_error turns into the same
 * messages as its Python walker.
 *
 * Formats: libpcap (draft-ietf-opsawg-pcap: 16-byte record headers, µs or ns fractions) and
 * pcapng (draft-ietf-opsawg-pcapng: Section Header blocks set the byte order and reset the
 * interfaces; Interface Description blocks give the link type and if_tsresol; Enhanced, Simple
 * and obsolete Packet blocks carry frames; other blocks are skipped).
 *
 * Why a window and not a mapping: mapping the page cache costs about 1.5 µs per 4 KiB page
 * here (0.2 s for a 445 MiB capture, with or without MAP_POPULATE), copying it through a
 * 256 KiB buffer that stays in cache about a third of that; and the resident set stays at the
 * window's size (it grows only to hold one record or block bigger than it).
 */
#define _DEFAULT_SOURCE
#include "ewvxlan.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WINDOW (256u << 10)
#define FMT_PCAP 1
#define FMT_PCAPNG 2

struct ew_iface {
    uint16_t linktype;
    uint8_t pow2, exp; /* ticks per second: 2^exp or 10^exp */
};

struct ew_walk {
    const uint8_t *base; /* the whole file (memory mode), or NULL: read fd through buf */
    int fd;
    uint8_t *buf;
    uint64_t bufcap, win_off, win_len; /* buf holds the file's bytes [win_off, +win_len) */
    uint64_t size, start, pos, next;
    int fmt, big, nano;
    uint16_t linktype;
    struct ew_iface *ifs;
    uint32_t nif, capif;
    uint64_t err[4];
};

static inline int host_big(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 0;
}
static inline uint16_t rd16(const uint8_t *p, int big) {
    uint16_t v;
    memcpy(&v, p, 2);
    return big != host_big() ? __builtin_bswap16(v) : v;
}
static inline uint32_t rd32(const uint8_t *p, int big) {
    uint32_t v;
    memcpy(&v, p, 4);
    return big != host_big() ? __builtin_bswap32(v) : v;
}

static int fail(struct ew_walk *w, int code, uint64_t off, uint64_t a, uint64_t b) {
    w->err[0] = (uint64_t)code;
    w->err[1] = off;
    w->err[2] = a;
    w->err[3] = b;
    return -1;
}

/* A walker over `base` (size bytes in memory) or, with base NULL, over the open file fd. */
struct ew_walk *ew_walk_new(const uint8_t *base, int fd, uint64_t size, int fmt, int big,
                            int nano, uint32_t linktype, uint64_t start) {
    struct ew_walk *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->base = base;
    w->fd = fd;
    w->size = size;
    w->start = w->pos = start;
    w->fmt = fmt;
    w->big = big;
    w->nano = nano;
    w->linktype = (uint16_t)linktype;
    return w;
}

void ew_walk_free(struct ew_walk *w) {
    if (w) {
        free(w->ifs);
        free(w->buf);
    }
    free(w);
}

/* A second walker at w's position, with its state (byte order, interfaces) and its own window. */
struct ew_walk *ew_walk_clone(const struct ew_walk *w) {
    struct ew_walk *c = malloc(sizeof *c);
    if (!c)
        return NULL;
    *c = *w;
    c->buf = NULL;
    c->bufcap = c->win_len = 0;
    c->ifs = NULL;
    if (w->capif) {
        if (!(c->ifs = malloc(w->capif * sizeof *c->ifs))) {
            free(c);
            return NULL;
        }
        memcpy(c->ifs, w->ifs, w->nif * sizeof *c->ifs);
    }
    return c;
}

void ew_walk_rewind(struct ew_walk *w) {
    w->pos = w->start;
    w->win_len = 0;
    w->nif = 0;
    w->big = w->fmt == FMT_PCAPNG ? 0 : w->big;
    memset(w->err, 0, sizeof w->err);
}

const uint64_t *ew_walk_error(const struct ew_walk *w) { return w->err; }

static const uint8_t *refill(struct ew_walk *w, uint64_t off, uint64_t len);

/* The file's bytes [off, off + len) (the caller checked off + len <= size), valid until the
 * next call; NULL when they cannot be read (w->err says why). */
static inline const uint8_t *at(struct ew_walk *w, uint64_t off, uint64_t len) {
    if (w->base)
        return w->base + off;
    if (off >= w->win_off && off + len <= w->win_off + w->win_len)
        return w->buf + (off - w->win_off);
    return refill(w, off, len);
}

/* Read the window again, from off: at least len bytes (the buffer grows for a big record). */
static __attribute__((noinline)) const uint8_t *refill(struct ew_walk *w, uint64_t off,
                                                       uint64_t len) {
    uint64_t want = len > WINDOW ? len : WINDOW;
    if (want > w->size - off)
        want = w->size - off;
    if (want > w->bufcap) {
        uint8_t *b = realloc(w->buf, want);
        if (!b) {
            fail(w, EW_E_NOMEM, off, len, 0);
            return NULL;
        }
        w->buf = b;
        w->bufcap = want;
    }
    uint64_t got = 0;
    while (got < want) {
        ssize_t k = pread(w->fd, w->buf + got, want - got, (off_t)(off + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) { /* a read error, or the file shrank since it was measured */
            w->win_len = 0;
            fail(w, EW_E_IO, off + got, k < 0 ? (uint64_t)errno : 0, 0);
            return NULL;
        }
        got += (uint64_t)k;
    }
    w->win_off = off;
    w->win_len = want;
    return w->buf;
}

/* µs from pcapng ticks at 2^exp or 10^exp per second, floored like Python's //; -1 if the
 * result does not fit an int64 */
static int64_t ticks_us(uint64_t ticks, const struct ew_iface *i) {
    static const uint64_t p10[20] = {1ull, 10ull, 100ull, 1000ull, 10000ull, 100000ull,
        1000000ull, 10000000ull, 100000000ull, 1000000000ull, 10000000000ull, 100000000000ull,
        1000000000000ull, 10000000000000ull, 100000000000000ull, 1000000000000000ull,
        10000000000000000ull, 100000000000000000ull, 1000000000000000000ull,
        10000000000000000000ull};
    unsigned __int128 q;
    if (i->pow2)
        q = i->exp >= 128 ? 0 : ((unsigned __int128)ticks * 1000000u) >> i->exp;
    else if (i->exp >= 6)
        q = i->exp - 6 >= 20 ? 0 : ticks / p10[i->exp - 6]; /* 10^6 divides both sides */
    else
        q = (unsigned __int128)ticks * p10[6 - i->exp];
    return q > (unsigned __int128)INT64_MAX ? -1 : (int64_t)q;
}

/* if_tsresol (option 9) among an Interface Description block's options, opt[0, len) */
static void tsresol(const uint8_t *opt, uint64_t len, int big, struct ew_iface *i) {
    uint64_t pos = 0;
    i->pow2 = 0;
    i->exp = 6;
    while (pos + 4 <= len) {
        unsigned code = rd16(opt + pos, big), olen = rd16(opt + pos + 2, big);
        if (code == 0)
            break;
        if (code == 9 && olen >= 1) {
            unsigned v = opt[pos + 4]; /* at worst the block's trailing length: in the block */
            i->pow2 = (v & 0x80) != 0;
            i->exp = (uint8_t)(v & 0x7F);
            return;
        }
        pos += 4 + (olen + 3u) / 4u * 4u;
    }
}

static int pcap_peek(struct ew_walk *w, struct ew_rec *r) {
    uint64_t pos = w->pos, size = w->size;
    if (pos + 16 > size)
        return pos == size ? 0 : fail(w, EW_E_PCAP_HDR_CUT, pos, size - pos, 0);
    const uint8_t *h = at(w, pos, 16);
    if (!h)
        return -1;
    uint32_t incl = rd32(h + 8, w->big);
    if (incl > EW_MAX_RECORD)
        return fail(w, EW_E_PCAP_TOO_BIG, pos, incl, 0);
    uint64_t data = pos + 16;
    if (data + incl > size)
        return fail(w, EW_E_PCAP_CUT, pos, incl, size - data);
    if (!(h = at(w, pos, 16 + (uint64_t)incl)))
        return -1;
    uint32_t sec = rd32(h, w->big), frac = rd32(h + 4, w->big);
    r->data = h + 16;
    r->off = data;
    r->cap = incl;
    r->wire = rd32(h + 12, w->big);
    r->ts = (int64_t)sec * 1000000 + (w->nano ? frac / 1000 : frac);
    r->linktype = w->linktype;
    w->next = data + incl;
    return 1;
}

static int add_iface(struct ew_walk *w, const uint8_t *blk, uint64_t pos, uint64_t blen) {
    if (w->nif == w->capif) {
        uint32_t cap = w->capif ? w->capif * 2 : 8;
        struct ew_iface *n = realloc(w->ifs, cap * sizeof *n);
        if (!n)
            return fail(w, EW_E_NOMEM, pos, 0, 0);
        w->ifs = n;
        w->capif = cap;
    }
    struct ew_iface *i = &w->ifs[w->nif++];
    i->linktype = rd16(blk + 8, w->big);
    tsresol(blk + 16, blen >= 20 ? blen - 20 : 0, w->big, i);
    return 0;
}

static int pcapng_peek(struct ew_walk *w, struct ew_rec *r) {
    for (;;) {
        uint64_t pos = w->pos, size = w->size;
        if (pos >= size)
            return 0;
        if (pos + 12 > size)
            return fail(w, EW_E_NG_HDR_CUT, pos, size - pos, 0);
        const uint8_t *h = at(w, pos, 12);
        if (!h)
            return -1;
        if (!memcmp(h, "\x0a\x0d\x0d\x0a", 4)) { /* Section Header: byte order, no interfaces */
            if (!memcmp(h + 8, "\x4d\x3c\x2b\x1a", 4))
                w->big = 0;
            else if (!memcmp(h + 8, "\x1a\x2b\x3c\x4d", 4))
                w->big = 1;
            else
                return fail(w, EW_E_NG_BOM, pos + 8, rd32(h + 8, 1), 0);
            w->nif = 0;
        }
        uint32_t btype = rd32(h, w->big), blen = rd32(h + 4, w->big);
        if (blen < 12 || blen % 4 || pos + blen > size)
            return fail(w, EW_E_NG_BLOCK, pos, btype, blen);
        uint64_t end = pos + blen;
        if (btype == 1) { /* Interface Description */
            if (!(h = at(w, pos, blen)) || add_iface(w, h, pos, blen))
                return -1;
        } else if (btype == 6 || btype == 2) { /* Enhanced / obsolete Packet block */
            if (blen < 32)
                return fail(w, EW_E_NG_BLOCK, pos, btype, blen);
            if (!(h = at(w, pos, blen)))
                return -1;
            const uint8_t *b = h + 8;
            uint32_t ifid = btype == 2 ? rd16(b, w->big) : rd32(b, w->big);
            uint64_t ticks = (uint64_t)rd32(b + 4, w->big) << 32 | rd32(b + 8, w->big);
            uint32_t incl = rd32(b + 12, w->big);
            if (ifid >= w->nif)
                return fail(w, EW_E_NG_IFACE, pos, ifid, w->nif);
            if (28 + (uint64_t)incl > (uint64_t)blen - 4)
                return fail(w, EW_E_NG_OVERRUN, pos, incl, 0);
            int64_t ts = ticks_us(ticks, &w->ifs[ifid]);
            if (ts < 0)
                return fail(w, EW_E_TIME, pos, 0, 0);
            r->data = b + 20;
            r->off = pos + 28;
            r->cap = incl;
            r->wire = rd32(b + 16, w->big);
            r->ts = ts;
            r->linktype = w->ifs[ifid].linktype;
            w->next = end;
            return 1;
        } else if (btype == 3) { /* Simple Packet block: no time, the first interface */
            if (!w->nif)
                return fail(w, EW_E_NG_SPB_NO_IF, pos, 0, 0);
            if (blen < 16)
                return fail(w, EW_E_NG_BLOCK, pos, btype, blen);
            if (!(h = at(w, pos, blen)))
                return -1;
            uint32_t orig = rd32(h + 8, w->big);
            r->data = h + 12;
            r->off = pos + 12;
            r->cap = orig < blen - 16 ? orig : blen - 16;
            r->wire = orig;
            r->ts = 0;
            r->linktype = w->ifs[0].linktype;
            w->next = end;
            return 1;
        }
        w->pos = end; /* other blocks: skipped unread */
    }
}

int ew_walk_peek(struct ew_walk *w, struct ew_rec *r) {
    return w->fmt == FMT_PCAP ? pcap_peek(w, r) : pcapng_peek(w, r);
}

void ew_walk_advance(struct ew_walk *w) { w->pos = w->next; }

/* Walk from the current position to the end: the number of records, or -1 (ew_walk_error). */
int64_t ew_walk_count(struct ew_walk *w) {
    struct ew_rec r;
    int64_t n = 0;
    int rc;
    while ((rc = ew_walk_peek(w, &r)) > 0) {
        ew_walk_advance(w);
        n++;
    }
    return rc < 0 ? -1 : n;
}

/* Up to n records from the current position into index arrays; the count, or -1. */
int64_t ew_walk_index(struct ew_walk *w, int64_t n, int64_t *off, int64_t *cap, int64_t *wire,
                      int64_t *ts, uint16_t *link) {
    struct ew_rec r;
    int64_t i = 0;
    while (i < n) {
        int rc = ew_walk_peek(w, &r);
        if (rc < 0)
            return -1;
        if (rc == 0)
            break;
        off[i] = (int64_t)r.off;
        cap[i] = r.cap;
        wire[i] = r.wire;
        ts[i] = r.ts;
        link[i] = r.linktype;
        ew_walk_advance(w);
        i++;
    }
    return i;
}
