/* The wire batch decoder: the msgpack payload of an eastwest.codec.Batch -> Arrow column buffers.
 *
 * In:  the zstd-decompressed payload (a map: collector, batch_seq, sent_at, records), and column
 *      buffers allocated by aggregator/store/wire_columns.py in the layout of `FLAT_COLUMNS` +
 *      `extra` (aggregator/store/columns.py).
 * Out: every record either written as one row of the columns, or DEFERRED: its index and byte
 *      range, for Python to decode with msgspec (which gives the exact record or error).
 *
 * Conservative by design: a record is written only if msgspec + FlowRecord.__post_init__ would
 * accept it and give the same values (see ew_record below for every check); anything else is
 * deferred. An envelope this file does not expect (other key order, a malformed record it cannot
 * skip, trailing bytes) returns -1: the caller takes the reference path for the whole batch.
 * No global mutable state: safe to run from several threads without the GIL.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef EW_SOURCE_DIGEST
#define EW_SOURCE_DIGEST "unknown"
#endif

const char *ew_source_digest(void) { return EW_SOURCE_DIGEST; }

#define NCOL 33
const char *ew_wire_columns(void)
{
    return "record_id,source,start_ts,end_ts,final,protocol,family,client_ip,client_port,"
           "server_ip,server_port,observer,bytes_c2s,bytes_s2c,packets_c2s,packets_s2c,connect,"
           "retransmits,resets,rtt_min_us,rtt_avg_us,rtt_max_us,pid,comm,netns,container,vni,"
           "outer_src,outer_dst,loopback,incomplete,tunnel_type,extra";
}

enum {
    C_RECORD_ID, C_SOURCE, C_START, C_END, C_FINAL, C_PROTOCOL, C_FAMILY, C_CLIENT_IP,
    C_CLIENT_PORT, C_SERVER_IP, C_SERVER_PORT, C_OBSERVER, C_BYTES_C2S, C_BYTES_S2C,
    C_PACKETS_C2S, C_PACKETS_S2C, C_CONNECT, C_RETRANSMITS, C_RESETS, C_RTT_MIN, C_RTT_AVG,
    C_RTT_MAX, C_PID, C_COMM, C_NETNS, C_CONTAINER, C_VNI, C_OUTER_SRC, C_OUTER_DST,
    C_LOOPBACK, C_INCOMPLETE, C_TUNNEL_TYPE, C_EXTRA
};

#define COUNT_MAX 0x7fffffffffffffffULL
#define TS_MAX_SEC 253402300800LL /* 10000-01-01: beyond Python's datetime */
#define MAX_DEPTH 32

typedef struct { const uint8_t *p, *end; } rd_t;
typedef struct { const uint8_t *p; uint32_t n; } str_t;
typedef struct { char s[16]; uint32_t n; } lit_t; /* zero-padded: compared 8 bytes at a time */
#define L(x) {x, sizeof(x) - 1}

/* -- msgpack reading ------------------------------------------------------------------------ */
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

/* an int in 0..max (any msgpack int encoding); 0 for anything else */
static inline int rd_uint(rd_t *r, uint64_t max, uint64_t *out)
{
    if (r->p >= r->end) return 0;
    uint8_t b = *r->p;
    uint64_t v;
    size_t need;
    if (b <= 0x7f) { *out = b; r->p++; return 1; }
    switch (b) {
    case 0xcc: need = 2; break;
    case 0xcd: need = 3; break;
    case 0xce: need = 5; break;
    case 0xcf: need = 9; break;
    case 0xd0: need = 2; break;
    case 0xd1: need = 3; break;
    case 0xd2: need = 5; break;
    case 0xd3: need = 9; break;
    default: return 0; /* negative fixint, floats, anything else */
    }
    if ((size_t)(r->end - r->p) < need) return 0;
    const uint8_t *q = r->p + 1;
    switch (b) {
    case 0xcc: v = q[0]; break;
    case 0xcd: v = be16(q); break;
    case 0xce: v = be32(q); break;
    case 0xcf: v = be64(q); break;
    case 0xd0: if ((int8_t)q[0] < 0) return 0; v = q[0]; break;
    case 0xd1: if ((int16_t)be16(q) < 0) return 0; v = be16(q); break;
    case 0xd2: if ((int32_t)be32(q) < 0) return 0; v = be32(q); break;
    default: if ((int64_t)be64(q) < 0) return 0; v = be64(q); break;
    }
    if (v > max) return 0;
    r->p += need;
    *out = v;
    return 1;
}

static int rd_int64(rd_t *r, int64_t *out) /* any int that fits int64 */
{
    if (r->p >= r->end) return 0;
    uint8_t b = *r->p;
    if (b >= 0xe0) { *out = (int8_t)b; r->p++; return 1; }
    if (b == 0xd0 || b == 0xd1 || b == 0xd2 || b == 0xd3) {
        size_t need = b == 0xd0 ? 2 : b == 0xd1 ? 3 : b == 0xd2 ? 5 : 9;
        if ((size_t)(r->end - r->p) < need) return 0;
        const uint8_t *q = r->p + 1;
        *out = b == 0xd0 ? (int8_t)q[0] : b == 0xd1 ? (int16_t)be16(q)
             : b == 0xd2 ? (int32_t)be32(q) : (int64_t)be64(q);
        r->p += need;
        return 1;
    }
    uint64_t v;
    if (!rd_uint(r, COUNT_MAX, &v)) return 0;
    *out = (int64_t)v;
    return 1;
}

static int utf8_ok(const uint8_t *s, uint32_t n)
{
    uint32_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) { i += 8; continue; }
        }
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) {
            if (i + 1 >= n || (s[i + 1] & 0xc0) != 0x80) return 0;
            i += 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            if (i + 2 >= n) return 0;
            uint8_t c1 = s[i + 1];
            if ((c1 & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80) return 0;
            if (c == 0xe0 && c1 < 0xa0) return 0;  /* overlong */
            if (c == 0xed && c1 >= 0xa0) return 0; /* surrogates */
            i += 3;
        } else if (c >= 0xf0 && c <= 0xf4) {
            if (i + 3 >= n) return 0;
            uint8_t c1 = s[i + 1];
            if ((c1 & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80 || (s[i + 3] & 0xc0) != 0x80)
                return 0;
            if (c == 0xf0 && c1 < 0x90) return 0;  /* overlong */
            if (c == 0xf4 && c1 >= 0x90) return 0; /* > U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* a str (header + bytes, not yet checked for UTF-8) */
static inline int rd_str_raw(rd_t *r, str_t *s)
{
    if (r->p >= r->end) return 0;
    uint8_t b = *r->p;
    size_t h;
    uint32_t n;
    size_t avail = (size_t)(r->end - r->p);
    if ((b & 0xe0) == 0xa0) { h = 1; n = b & 0x1f; }
    else if (b == 0xd9) { if (avail < 2) return 0; h = 2; n = r->p[1]; }
    else if (b == 0xda) { if (avail < 3) return 0; h = 3; n = be16(r->p + 1); }
    else if (b == 0xdb) { if (avail < 5) return 0; h = 5; n = be32(r->p + 1); }
    else return 0;
    if (avail - h < n) return 0;
    s->p = r->p + h;
    s->n = n;
    r->p += h + n;
    return 1;
}

static int rd_str(rd_t *r, str_t *s) { return rd_str_raw(r, s) && utf8_ok(s->p, s->n); }

static inline int is_nil(rd_t *r)
{
    if (r->p < r->end && *r->p == 0xc0) { r->p++; return 1; }
    return 0;
}

static int rd_bool(rd_t *r, int *v)
{
    if (r->p >= r->end) return 0;
    if (*r->p == 0xc2) { *v = 0; r->p++; return 1; }
    if (*r->p == 0xc3) { *v = 1; r->p++; return 1; }
    return 0;
}

/* a map or array header: fix form (tag in the high nibble), 16-bit or 32-bit count */
static int rd_count(rd_t *r, uint8_t fix, uint8_t tag16, uint8_t tag32, uint32_t *n)
{
    if (r->p >= r->end) return 0;
    uint8_t b = *r->p;
    size_t avail = (size_t)(r->end - r->p);
    if ((b & 0xf0) == fix) { *n = b & 0x0f; r->p++; return 1; }
    if (b == tag16 && avail >= 3) { *n = be16(r->p + 1); r->p += 3; return 1; }
    if (b == tag32 && avail >= 5) { *n = be32(r->p + 1); r->p += 5; return 1; }
    return 0;
}

static int rd_map(rd_t *r, uint32_t *n) { return rd_count(r, 0x80, 0xde, 0xdf, n); }

static int rd_arr(rd_t *r, uint32_t *n) { return rd_count(r, 0x90, 0xdc, 0xdd, n); }

/* a timestamp (extension -1) with a whole number of µs in 1970..9999, as µs since the epoch */
static int rd_ts_parts(rd_t *r, int64_t *sec_out, int64_t *usec_out)
{
    size_t avail = (size_t)(r->end - r->p);
    if (avail < 6) return 0;
    const uint8_t *p = r->p;
    uint64_t sec, nsec;
    if (p[0] == 0xd6 && p[1] == 0xff) {
        sec = be32(p + 2);
        nsec = 0;
        r->p += 6;
    } else if (p[0] == 0xd7 && p[1] == 0xff && avail >= 10) {
        uint64_t v = be64(p + 2);
        nsec = v >> 34;
        sec = v & 0x3ffffffffULL;
        r->p += 10;
    } else if (p[0] == 0xc7 && p[1] == 12 && p[2] == 0xff && avail >= 15) {
        nsec = be32(p + 3);
        int64_t s = (int64_t)be64(p + 7);
        if (s < 0) return 0;
        sec = (uint64_t)s;
        r->p += 15;
    } else {
        return 0;
    }
    if (nsec >= 1000000000ULL || nsec % 1000 || sec >= (uint64_t)TS_MAX_SEC) return 0;
    *sec_out = (int64_t)sec;
    *usec_out = (int64_t)(nsec / 1000);
    return 1;
}

static int rd_ts(rd_t *r, int64_t *us)
{
    int64_t sec, usec;
    if (!rd_ts_parts(r, &sec, &usec)) return 0;
    *us = sec * 1000000 + usec;
    return 1;
}

/* well-formedness only: the end of one value */
static int skip(rd_t *r, int depth)
{
    if (depth > MAX_DEPTH || r->p >= r->end) return 0;
    uint8_t b = *r->p;
    size_t avail = (size_t)(r->end - r->p);
    uint64_t n = 0, items = 0;
    size_t h = 1;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) { r->p++; return 1; }
    if ((b & 0xe0) == 0xa0) { n = b & 0x1f; }
    else if ((b & 0xf0) == 0x90) { items = b & 0x0f; }
    else if ((b & 0xf0) == 0x80) { items = 2 * (uint64_t)(b & 0x0f); }
    else {
        switch (b) {
        case 0xc4: case 0xd9: h = 2; if (avail < h) return 0; n = r->p[1]; break;
        case 0xc5: case 0xda: h = 3; if (avail < h) return 0; n = be16(r->p + 1); break;
        case 0xc6: case 0xdb: h = 5; if (avail < h) return 0; n = be32(r->p + 1); break;
        case 0xc7: h = 3; if (avail < h) return 0; n = r->p[1]; break;
        case 0xc8: h = 4; if (avail < h) return 0; n = be16(r->p + 1); break;
        case 0xc9: h = 6; if (avail < h) return 0; n = be32(r->p + 1); break;
        case 0xca: n = 4; break;
        case 0xcb: n = 8; break;
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: n = 4; break;
        case 0xcf: case 0xd3: n = 8; break;
        case 0xd4: n = 2; break;
        case 0xd5: n = 3; break;
        case 0xd6: n = 5; break;
        case 0xd7: n = 9; break;
        case 0xd8: n = 17; break;
        case 0xdc: h = 3; if (avail < h) return 0; items = be16(r->p + 1); break;
        case 0xdd: h = 5; if (avail < h) return 0; items = be32(r->p + 1); break;
        case 0xde: h = 3; if (avail < h) return 0; items = 2 * (uint64_t)be16(r->p + 1); break;
        case 0xdf: h = 5; if (avail < h) return 0; items = 2 * (uint64_t)be32(r->p + 1); break;
        default: return 0; /* 0xc1: never used */
        }
    }
    if (avail < h || avail - h < n) return 0;
    r->p += h + n;
    for (uint64_t i = 0; i < items; i++)
        if (!skip(r, depth + 1)) return 0;
    return 1;
}

/* -- IP addresses: canonical as Python 3.11's ipaddress prints them ----------------------- */
static int ipv4_ok(const uint8_t *s, uint32_t n)
{
    if (n < 7 || n > 15) return 0;
    uint32_t i = 0;
    for (int part = 0; part < 4; part++) {
        if (part) {
            if (i >= n || s[i] != '.') return 0;
            i++;
        }
        uint32_t start = i, v = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9' && i - start < 3) v = v * 10 + (s[i++] - '0');
        uint32_t len = i - start;
        if (len == 0 || v > 255 || (len > 1 && s[start] == '0')) return 0;
    }
    return i == n;
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int ipv6_ok(const uint8_t *s, uint32_t n)
{
    if (n < 2 || n > 39) return 0;
    uint16_t g[8];
    int ng = 0, gap = -1;
    uint32_t i = 0;
    if (s[0] == ':') {
        if (s[1] != ':') return 0;
        gap = 0;
        i = 2;
    }
    while (i < n) {
        uint32_t v = 0, len = 0;
        int h;
        while (i < n && (h = hexval(s[i])) >= 0) {
            if (++len > 4) return 0;
            v = v << 4 | (uint32_t)h;
            i++;
        }
        if (len == 0) return 0;
        if (ng == 8) return 0;
        g[ng++] = (uint16_t)v;
        if (i == n) break;
        if (s[i] != ':') return 0; /* a dot, '%', anything else */
        i++;
        if (i < n && s[i] == ':') {
            if (gap >= 0) return 0;
            gap = ng;
            i++;
        } else if (i == n) {
            return 0;
        }
    }
    uint16_t a[8];
    if (gap >= 0) {
        int fill = 8 - ng;
        if (fill < 1) return 0;
        for (int k = 0; k < gap; k++) a[k] = g[k];
        for (int k = 0; k < fill; k++) a[gap + k] = 0;
        for (int k = gap; k < ng; k++) a[k + fill] = g[k];
    } else {
        if (ng != 8) return 0;
        memcpy(a, g, sizeof a);
    }
    /* IPv4-mapped or -compatible: printed differently across Python versions, left to Python */
    if (!a[0] && !a[1] && !a[2] && !a[3] && !a[4] && (a[5] == 0xffff || (!a[5] && (a[6] || a[7] > 1))))
        return 0;
    /* the canonical text: the longest run of >= 2 zero groups as "::", the first on a tie */
    int best = -1, bestlen = 0, run = -1, runlen = 0;
    for (int k = 0; k < 8; k++) {
        if (a[k] == 0) {
            if (run < 0) run = k;
            runlen++;
            if (runlen > bestlen) { bestlen = runlen; best = run; }
        } else {
            run = -1;
            runlen = 0;
        }
    }
    if (bestlen < 2) best = -1;
    char out[48];
    int o = 0;
    static const char hx[] = "0123456789abcdef";
    for (int k = 0; k < 8; k++) {
        if (k == best) {
            out[o++] = ':';
            if (k == 0) out[o++] = ':';
            k += bestlen - 1;
            continue;
        }
        uint16_t v = a[k];
        int started = 0;
        for (int sh = 12; sh >= 0; sh -= 4) {
            int d = (v >> sh) & 0xf;
            if (d || started || sh == 0) { out[o++] = hx[d]; started = 1; }
        }
        if (k < 7) out[o++] = ':';
    }
    return (uint32_t)o == n && !memcmp(out, s, n);
}

/* 4 or 6 for a canonical address, 0 when Python must judge it */
static int ip_family(str_t s)
{
    for (uint32_t i = 0; i < s.n; i++)
        if (s.p[i] == '.') return ipv4_ok(s.p, s.n) ? 4 : 0;
    return ipv6_ok(s.p, s.n) ? 6 : 0;
}

/* -- the record ------------------------------------------------------------------------------ */
typedef struct {
    str_t name, ns, kind, host; /* ns/kind/host: p == NULL when None */
    const uint8_t *labels;      /* the first label key; NULL when the map was absent */
    uint32_t nlabels;
} workload_t;

typedef struct {
    str_t record_id, collector, source, protocol, client_ip, server_ip, observer, connect, comm,
        cmdline, container, outer_src, outer_dst, cgroup_path;
    int64_t start, end;
    int final, loopback, family, tunnel_type; /* tunnel_type: index in TUNNEL_TYPES */
    uint64_t cport, sport, outer_dport, vni;
    uint64_t bytes_c2s, bytes_s2c, packets_c2s, packets_s2c, l3_c2s, l3_s2c, retrans, resets,
        rtt[3], pid, netns, cgroup_id;
    int has_packets_c2s, has_packets_s2c, has_l3_c2s, has_l3_s2c, has_rtt, has_process,
        has_netns, has_cgroup, has_tunnel, has_cw, has_sw, has_tcp_flags;
    workload_t cw, sw;
    const uint8_t *tcp_flags;
    uint32_t ntcp_flags;
    const uint8_t *incomplete;
    uint32_t nincomplete;
    const uint8_t *nat; /* the first translation of `nat`; has_nat: the list was given */
    uint32_t nnat;
    int has_nat;
} row_t;

enum {
    F_SCHEMA, F_RECORD_ID, F_COLLECTOR, F_SOURCE, F_START, F_END, F_FINAL, F_PROTOCOL, F_FAMILY,
    F_CLIENT, F_SERVER, F_OBSERVER, F_BYTES_C2S, F_BYTES_S2C, F_PACKETS_C2S, F_PACKETS_S2C,
    F_L3_C2S, F_L3_S2C, F_CONNECT, F_RETRANSMITS, F_RESETS, F_RTT, F_PROCESS, F_NETNS, F_CGROUP,
    F_CONTAINER, F_TUNNEL, F_CW, F_SW, F_TCP_FLAGS, F_LOOPBACK, F_INCOMPLETE, F_TUNNEL_OUTER, F_DNS,
    F_DROPS, F_NAT, F_MESH, F_N
};
static const lit_t FIELDS[] = {L("schema"), L("record_id"), L("collector"), L("source"), L("start"), L("end"), L("final"), L("protocol"), L("family"), L("client"), L("server"), L("observer"), L("bytes_c2s"), L("bytes_s2c"), L("packets_c2s"), L("packets_s2c"), L("l3_bytes_c2s"), L("l3_bytes_s2c"), L("connect"), L("retransmits"), L("resets"), L("rtt_us"), L("process"), L("netns"), L("cgroup"), L("container"), L("tunnel"), L("client_workload"), L("server_workload"), L("tcp_flags"), L("loopback"), L("incomplete"), L("tunnel_outer"), L("dns"), L("drops"), L("nat"), L("mesh")};
#define REQUIRED ((1ULL << F_RECORD_ID) | (1ULL << F_COLLECTOR) | (1ULL << F_SOURCE) | \
                  (1ULL << F_START) | (1ULL << F_END) | (1ULL << F_FINAL) | \
                  (1ULL << F_PROTOCOL) | (1ULL << F_FAMILY) | (1ULL << F_CLIENT) | \
                  (1ULL << F_SERVER) | (1ULL << F_OBSERVER))

static inline int same(const uint8_t *a, const char *b, uint32_t n) /* short strings */
{
    for (uint32_t i = 0; i < n; i++)
        if (a[i] != (uint8_t)b[i]) return 0;
    return 1;
}

static inline uint64_t low_bytes(uint32_t k) { return k >= 8 ? ~0ULL : (1ULL << (8 * k)) - 1; }

/* s == l; `end` is the end of the buffer s is in (whole words are read when they fit in it) */
static inline int eq_lit_in(str_t s, const lit_t *l, const uint8_t *end)
{
    if (s.n != l->n) return 0;
    if (end - s.p < 16) return same(s.p, l->s, l->n);
    uint64_t a0, a1, b0, b1;
    memcpy(&a0, s.p, 8);
    memcpy(&b0, l->s, 8);
    if (s.n <= 8) return !((a0 ^ b0) & low_bytes(s.n));
    memcpy(&a1, s.p + 8, 8);
    memcpy(&b1, l->s + 8, 8);
    return a0 == b0 && !((a1 ^ b1) & low_bytes(s.n - 8));
}

static inline int eq_lit(str_t s, lit_t l) { return s.n == l.n && same(s.p, l.s, l.n); }

static inline int eq(str_t s, const char *lit)
{
    uint32_t n = (uint32_t)strlen(lit);
    return s.n == n && same(s.p, lit, n);
}

/* the index of `key` in `names` (n of them), trying `hint` first (msgspec writes the fields
 * in their declared order); -1 if none */
static inline int lookup(str_t key, const lit_t *names, int n, int hint, const uint8_t *end)
{
    if (hint < n && eq_lit_in(key, &names[hint], end)) return hint;
    for (int i = 0; i < n; i++)
        if (i != hint && eq_lit(key, names[i])) return i;
    return -1;
}

static inline int one_of(str_t s, const lit_t *lits, int n, const uint8_t *end)
{
    for (int i = 0; i < n; i++)
        if (eq_lit_in(s, &lits[i], end)) return 1;
    return 0;
}

static const lit_t SOURCES[] = {L("socket"), L("vxlan"), L("wire"), L("pcap")};
static const lit_t OBSERVERS[] = {L("client"), L("server"), L("path")};
static const lit_t CONNECTS[] = {L("ok"), L("refused"), L("timeout"), L("reset")};
static const lit_t PROTOCOLS[] = {L("tcp"), L("udp"), L("icmp"), L("icmpv6"), L("sctp"), L("gre"), L("esp"), L("other")};
static const lit_t FLAGS[] = {L("FIN"), L("SYN"), L("RST"), L("PSH"), L("ACK"), L("URG"), L("ECE"), L("CWR")};

/* a struct map of `n` known keys: each key once, the required ones present */
#define STRUCT_KEYS(r, names, n, seen, k, body)                                 \
    do {                                                                        \
        uint32_t cnt_;                                                          \
        if (!rd_map(r, &cnt_)) return 0;                                        \
        for (uint32_t i_ = 0; i_ < cnt_; i_++) {                                \
            str_t key_;                                                         \
            if (!rd_str_raw(r, &key_)) return 0;                                \
            int k = lookup(key_, names, n, (int)i_, r->end);                            \
            if (k < 0 || (seen & (1u << k))) return 0;                          \
            seen |= 1u << k;                                                    \
            body                                                                \
        }                                                                       \
    } while (0)

static const lit_t EP_KEYS[] = {L("ip"), L("port")};
static int rd_endpoint(rd_t *r, str_t *ip, uint64_t *port)
{
    uint32_t seen = 0;
    STRUCT_KEYS(r, EP_KEYS, 2, seen, k, {
        if (k == 0) { if (!rd_str(r, ip)) return 0; }
        else if (!rd_uint(r, 65535, port)) return 0;
    });
    return seen == 3;
}

static const lit_t RTT_KEYS[] = {L("min"), L("avg"), L("max")};
static int rd_rtt(rd_t *r, uint64_t *v)
{
    uint32_t seen = 0;
    STRUCT_KEYS(r, RTT_KEYS, 3, seen, k, { if (!rd_uint(r, COUNT_MAX, &v[k])) return 0; });
    return seen == 7 && v[0] <= v[1] && v[1] <= v[2];
}

static int rd_opt_str(rd_t *r, str_t *s) /* str | None (p == NULL) */
{
    if (is_nil(r)) { s->p = NULL; s->n = 0; return 1; }
    return rd_str(r, s);
}

static const lit_t PROC_KEYS[] = {L("pid"), L("comm"), L("cmdline")};
static int rd_process(rd_t *r, row_t *w)
{
    uint32_t seen = 0;
    w->cmdline.p = NULL;
    STRUCT_KEYS(r, PROC_KEYS, 3, seen, k, {
        if (k == 0) { if (!rd_uint(r, COUNT_MAX, &w->pid)) return 0; }
        else if (k == 1) { if (!rd_str(r, &w->comm)) return 0; }
        else if (!rd_opt_str(r, &w->cmdline)) return 0;
    });
    return (seen & 3) == 3;
}

static const lit_t CG_KEYS[] = {L("id"), L("path")};
static int rd_cgroup(rd_t *r, row_t *w)
{
    uint32_t seen = 0;
    w->cgroup_path.p = NULL;
    STRUCT_KEYS(r, CG_KEYS, 2, seen, k, {
        if (k == 0) { if (!rd_uint(r, COUNT_MAX, &w->cgroup_id)) return 0; }
        else if (!rd_opt_str(r, &w->cgroup_path)) return 0;
    });
    return seen & 1;
}

static const lit_t TUN_KEYS[] = {L("type"), L("vni"), L("outer_src"), L("outer_dst"), L("outer_dport")};
static const lit_t TUNNEL_TYPES[] = {L("vxlan"), L("geneve"), L("vxlan-gpe")};
static int rd_tunnel(rd_t *r, row_t *w)
{
    uint32_t seen = 0;
    STRUCT_KEYS(r, TUN_KEYS, 5, seen, k, {
        str_t t;
        switch (k) {
        case 0:
            if (!rd_str_raw(r, &t)) return 0;
            w->tunnel_type = -1;
            for (int i = 0; i < 3; i++)
                if (eq_lit_in(t, &TUNNEL_TYPES[i], r->end)) w->tunnel_type = i;
            if (w->tunnel_type < 0) return 0;
            break;
        case 1: if (!rd_uint(r, 0xffffff, &w->vni)) return 0; break;
        case 2: if (!rd_str(r, &w->outer_src) || !ip_family(w->outer_src)) return 0; break;
        case 3: if (!rd_str(r, &w->outer_dst) || !ip_family(w->outer_dst)) return 0; break;
        default: if (!rd_uint(r, 65535, &w->outer_dport)) return 0;
        }
    });
    return seen == 31;
}

static const lit_t WL_KEYS[] = {L("name"), L("namespace"), L("kind"), L("host"), L("labels")};
static int rd_workload(rd_t *r, workload_t *w)
{
    uint32_t seen = 0;
    w->ns.p = w->kind.p = w->host.p = NULL;
    w->labels = NULL;
    w->nlabels = 0;
    STRUCT_KEYS(r, WL_KEYS, 5, seen, k, {
        switch (k) {
        case 0: if (!rd_str(r, &w->name)) return 0; break;
        case 1: if (!rd_opt_str(r, &w->ns)) return 0; break;
        case 2: if (!rd_opt_str(r, &w->kind)) return 0; break;
        case 3: if (!rd_opt_str(r, &w->host)) return 0; break;
        default: {
            uint32_t n;
            if (!rd_map(r, &n) || n > 64) return 0;
            w->labels = r->p;
            w->nlabels = n;
            str_t keys[64];
            for (uint32_t i = 0; i < n; i++) {
                str_t v;
                if (!rd_str(r, &keys[i]) || !rd_str(r, &v)) return 0;
                for (uint32_t j = 0; j < i; j++) /* a repeated key: Python keeps the last */
                    if (keys[j].n == keys[i].n && !memcmp(keys[j].p, keys[i].p, keys[i].n))
                        return 0;
            }
        }
        }
    });
    return seen & 1;
}

/* list[str]: the position of the first element and the count */
static int rd_str_list(rd_t *r, const uint8_t **first, uint32_t *n, int flags)
{
    if (!rd_arr(r, n)) return 0;
    *first = r->p;
    for (uint32_t i = 0; i < *n; i++) {
        str_t s;
        if (flags) {
            if (!rd_str_raw(r, &s) || !one_of(s, FLAGS, 8, r->end)) return 0;
        } else if (!rd_str(r, &s)) {
            return 0;
        }
    }
    return 1;
}

static int rd_opt_count(rd_t *r, uint64_t *v, int *has)
{
    if (is_nil(r)) { *has = 0; return 1; }
    *has = 1;
    return rd_uint(r, COUNT_MAX, v);
}

/* one translation of `nat` (eastwest.record.Nat): its type (index in NAT_TYPES), both
 * endpoints (canonical addresses of one family) and the optional netns */
typedef struct {
    int type;
    str_t oip, tip;
    uint64_t oport, tport, netns;
    int has_netns;
} nat_t;

static const lit_t NAT_KEYS[] = {L("type"), L("original"), L("translated"), L("netns")};
static const lit_t NAT_TYPES[] = {L("dnat"), L("snat"), L("redirect")};
static int rd_nat_one(rd_t *r, nat_t *x)
{
    uint32_t seen = 0;
    x->has_netns = 0;
    STRUCT_KEYS(r, NAT_KEYS, 4, seen, k, {
        str_t t;
        switch (k) {
        case 0:
            if (!rd_str_raw(r, &t)) return 0;
            x->type = -1;
            for (int i = 0; i < 3; i++)
                if (eq_lit_in(t, &NAT_TYPES[i], r->end)) x->type = i;
            if (x->type < 0) return 0;
            break;
        case 1: if (!rd_endpoint(r, &x->oip, &x->oport)) return 0; break;
        case 2: if (!rd_endpoint(r, &x->tip, &x->tport)) return 0; break;
        default: if (!rd_opt_count(r, &x->netns, &x->has_netns)) return 0;
        }
    });
    if ((seen & 7) != 7) return 0;
    int fam = ip_family(x->oip);
    return fam && ip_family(x->tip) == fam;
}

/* `nat`: None, or a list of translations (at most 16: more goes to Python). Decoded here, not
 * left to Python as the rare fields are: in a cluster most client records carry one */
static int rd_nat(rd_t *r, row_t *w)
{
    w->has_nat = 0;
    w->nnat = 0;
    if (is_nil(r)) return 1;
    if (!rd_arr(r, &w->nnat) || w->nnat > 16) return 0;
    w->has_nat = 1;
    w->nat = r->p;
    for (uint32_t i = 0; i < w->nnat; i++) {
        nat_t x;
        if (!rd_nat_one(r, &x)) return 0;
    }
    return 1;
}

/* one record into `w`: 1 when it is valid and ordinary, 0 when Python must decode it */
static int rd_record(rd_t *r, row_t *w, str_t batch_collector)
{
    uint32_t cnt;
    uint64_t seen = 0, u;
    memset(w, 0, sizeof *w);
    if (!rd_map(r, &cnt)) return 0;
    for (uint32_t i = 0; i < cnt; i++) {
        str_t key;
        if (!rd_str_raw(r, &key)) return 0;
        int k = lookup(key, FIELDS, F_N, (int)i, r->end);
        if (k < 0 || (seen & (1ULL << k))) return 0;
        seen |= 1ULL << k;
        str_t s;
        switch (k) {
        case F_SCHEMA: if (!rd_uint(r, 1, &u) || u != 1) return 0; break;
        case F_RECORD_ID: if (!rd_str(r, &w->record_id)) return 0; break;
        case F_COLLECTOR: if (!rd_str(r, &w->collector)) return 0; break;
        case F_SOURCE:
            if (!rd_str_raw(r, &w->source) || !one_of(w->source, SOURCES, 4, r->end)) return 0;
            break;
        case F_START: if (!rd_ts(r, &w->start)) return 0; break;
        case F_END: if (!rd_ts(r, &w->end)) return 0; break;
        case F_FINAL: if (!rd_bool(r, &w->final)) return 0; break;
        case F_PROTOCOL:
            if (!rd_str_raw(r, &w->protocol) || !one_of(w->protocol, PROTOCOLS, 8, r->end)) return 0;
            break;
        case F_FAMILY:
            if (!rd_uint(r, 6, &u) || (u != 4 && u != 6)) return 0;
            w->family = (int)u;
            break;
        case F_CLIENT: if (!rd_endpoint(r, &w->client_ip, &w->cport)) return 0; break;
        case F_SERVER: if (!rd_endpoint(r, &w->server_ip, &w->sport)) return 0; break;
        case F_OBSERVER:
            if (!rd_str_raw(r, &w->observer) || !one_of(w->observer, OBSERVERS, 3, r->end)) return 0;
            break;
        case F_BYTES_C2S: if (!rd_uint(r, COUNT_MAX, &w->bytes_c2s)) return 0; break;
        case F_BYTES_S2C: if (!rd_uint(r, COUNT_MAX, &w->bytes_s2c)) return 0; break;
        case F_PACKETS_C2S:
            if (!rd_opt_count(r, &w->packets_c2s, &w->has_packets_c2s)) return 0;
            break;
        case F_PACKETS_S2C:
            if (!rd_opt_count(r, &w->packets_s2c, &w->has_packets_s2c)) return 0;
            break;
        case F_L3_C2S: if (!rd_opt_count(r, &w->l3_c2s, &w->has_l3_c2s)) return 0; break;
        case F_L3_S2C: if (!rd_opt_count(r, &w->l3_s2c, &w->has_l3_s2c)) return 0; break;
        case F_CONNECT:
            if (is_nil(r)) { w->connect.p = NULL; break; }
            if (!rd_str_raw(r, &w->connect) || !one_of(w->connect, CONNECTS, 4, r->end)) return 0;
            break;
        case F_RETRANSMITS: if (!rd_uint(r, COUNT_MAX, &w->retrans)) return 0; break;
        case F_RESETS: if (!rd_uint(r, COUNT_MAX, &w->resets)) return 0; break;
        case F_RTT:
            if (is_nil(r)) { w->has_rtt = 0; break; }
            if (!rd_rtt(r, w->rtt)) return 0;
            w->has_rtt = 1;
            break;
        case F_PROCESS:
            if (is_nil(r)) { w->has_process = 0; break; }
            if (!rd_process(r, w)) return 0;
            w->has_process = 1;
            break;
        case F_NETNS: if (!rd_opt_count(r, &w->netns, &w->has_netns)) return 0; break;
        case F_CGROUP:
            if (is_nil(r)) { w->has_cgroup = 0; break; }
            if (!rd_cgroup(r, w)) return 0;
            w->has_cgroup = 1;
            break;
        case F_CONTAINER: if (!rd_opt_str(r, &w->container)) return 0; break;
        case F_TUNNEL:
            if (is_nil(r)) { w->has_tunnel = 0; break; }
            if (!rd_tunnel(r, w)) return 0;
            w->has_tunnel = 1;
            break;
        case F_CW:
            if (is_nil(r)) { w->has_cw = 0; break; }
            if (!rd_workload(r, &w->cw)) return 0;
            w->has_cw = 1;
            break;
        case F_SW:
            if (is_nil(r)) { w->has_sw = 0; break; }
            if (!rd_workload(r, &w->sw)) return 0;
            w->has_sw = 1;
            break;
        case F_TCP_FLAGS:
            if (is_nil(r)) { w->has_tcp_flags = 0; break; }
            if (!rd_str_list(r, &w->tcp_flags, &w->ntcp_flags, 1)) return 0;
            w->has_tcp_flags = 1;
            break;
        case F_LOOPBACK: if (!rd_bool(r, &w->loopback)) return 0; break;
        case F_INCOMPLETE:
            if (!rd_str_list(r, &w->incomplete, &w->nincomplete, 0)) return 0;
            break;
        case F_TUNNEL_OUTER: /* nested tunnels are rare: Python decodes a record that has them */
            if (!is_nil(r)) return 0;
            break;
        case F_DNS: /* only flows to resolvers carry a dns summary: Python decodes those */
            if (!is_nil(r)) return 0;
            break;
        case F_DROPS: /* drop counts (source "drops") are rare too: Python decodes them */
            if (!is_nil(r)) return 0;
            break;
        case F_NAT: if (!rd_nat(r, w)) return 0; break;
        case F_MESH: /* a folded mesh call (collector/mesh.py): Python decodes those */
            if (!is_nil(r)) return 0;
            break;
        }
        (void)s;
    }
    if ((seen & REQUIRED) != REQUIRED) return 0;
    /* __post_init__, and ingest's rule that a record's collector is the batch's */
    if (w->collector.n == 0 || w->collector.n != batch_collector.n ||
        memcmp(w->collector.p, batch_collector.p, batch_collector.n))
        return 0;
    if (w->record_id.n <= w->collector.n ||
        memcmp(w->record_id.p, w->collector.p, w->collector.n) ||
        w->record_id.p[w->collector.n] != ':')
        return 0;
    if (w->end < w->start) return 0;
    if (ip_family(w->client_ip) != w->family || ip_family(w->server_ip) != w->family) return 0;
    return 1;
}

/* -- writing ------------------------------------------------------------------------------- */
typedef struct { uint8_t *p, *end; } wr_t;

static inline int w_bytes(wr_t *o, const void *s, size_t n)
{
    if ((size_t)(o->end - o->p) < n) return 0;
    memcpy(o->p, s, n);
    o->p += n;
    return 1;
}

static inline int w_byte(wr_t *o, uint8_t b) { return w_bytes(o, &b, 1); }

static int w_uint(wr_t *o, uint64_t v) /* msgspec's minimal encoding of a non-negative int */
{
    uint8_t b[9];
    if (v < 128) return w_byte(o, (uint8_t)v);
    if (v < 256) { b[0] = 0xcc; b[1] = (uint8_t)v; return w_bytes(o, b, 2); }
    if (v < 65536) { b[0] = 0xcd; b[1] = (uint8_t)(v >> 8); b[2] = (uint8_t)v; return w_bytes(o, b, 3); }
    if (v < 4294967296ULL) {
        b[0] = 0xce;
        for (int i = 0; i < 4; i++) b[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        return w_bytes(o, b, 5);
    }
    b[0] = 0xcf;
    for (int i = 0; i < 8; i++) b[1 + i] = (uint8_t)(v >> (56 - 8 * i));
    return w_bytes(o, b, 9);
}

static int w_str(wr_t *o, const uint8_t *s, uint32_t n)
{
    uint8_t b[5];
    int h;
    if (n < 32) { b[0] = (uint8_t)(0xa0 | n); h = 1; }
    else if (n < 256) { b[0] = 0xd9; b[1] = (uint8_t)n; h = 2; }
    else if (n < 65536) { b[0] = 0xda; b[1] = (uint8_t)(n >> 8); b[2] = (uint8_t)n; h = 3; }
    else { b[0] = 0xdb; b[1] = (uint8_t)(n >> 24); b[2] = (uint8_t)(n >> 16); b[3] = (uint8_t)(n >> 8); b[4] = (uint8_t)n; h = 5; }
    return w_bytes(o, b, (size_t)h) && w_bytes(o, s, n);
}

static int w_opt_str(wr_t *o, str_t s) { return s.p ? w_str(o, s.p, s.n) : w_byte(o, 0xc0); }

static int w_header(wr_t *o, uint32_t n, uint8_t fix, uint8_t h16, uint8_t h32)
{
    uint8_t b[5];
    if (n < 16) return w_byte(o, (uint8_t)(fix | n));
    if (n < 65536) { b[0] = h16; b[1] = (uint8_t)(n >> 8); b[2] = (uint8_t)n; return w_bytes(o, b, 3); }
    b[0] = h32; b[1] = (uint8_t)(n >> 24); b[2] = (uint8_t)(n >> 16); b[3] = (uint8_t)(n >> 8); b[4] = (uint8_t)n;
    return w_bytes(o, b, 5);
}

/* a list[str] read before (already validated) */
static int w_str_list(wr_t *o, const uint8_t *first, uint32_t n, const uint8_t *end)
{
    rd_t r = {first, end};
    if (!w_header(o, n, 0x90, 0xdc, 0xdd)) return 0;
    for (uint32_t i = 0; i < n; i++) {
        str_t s;
        if (!rd_str_raw(&r, &s) || !w_str(o, s.p, s.n)) return 0;
    }
    return 1;
}

static int w_workload(wr_t *o, const workload_t *w, const uint8_t *end)
{
    if (!w_byte(o, 0x85) || !w_str(o, (const uint8_t *)"name", 4) || !w_str(o, w->name.p, w->name.n) ||
        !w_str(o, (const uint8_t *)"namespace", 9) || !w_opt_str(o, w->ns) ||
        !w_str(o, (const uint8_t *)"kind", 4) || !w_opt_str(o, w->kind) ||
        !w_str(o, (const uint8_t *)"host", 4) || !w_opt_str(o, w->host) ||
        !w_str(o, (const uint8_t *)"labels", 6) || !w_header(o, w->nlabels, 0x80, 0xde, 0xdf))
        return 0;
    rd_t r = {w->labels, end};
    for (uint32_t i = 0; i < 2 * w->nlabels; i++) {
        str_t s;
        if (!rd_str_raw(&r, &s) || !w_str(o, s.p, s.n)) return 0;
    }
    return 1;
}

static inline int w_opt_uint(wr_t *o, int has, uint64_t v) { return has ? w_uint(o, v) : w_byte(o, 0xc0); }

static int w_endpoint(wr_t *o, str_t ip, uint64_t port)
{
    return w_byte(o, 0x82) && w_str(o, (const uint8_t *)"ip", 2) && w_str(o, ip.p, ip.n) &&
           w_str(o, (const uint8_t *)"port", 4) && w_uint(o, port);
}

/* `nat` read before (already validated), as msgspec encodes list[Nat]: each a map of its four
 * fields in their order, whatever order the input had */
static int w_nat(wr_t *o, const row_t *w, const uint8_t *end)
{
    rd_t r = {w->nat, end};
    if (!w_header(o, w->nnat, 0x90, 0xdc, 0xdd)) return 0;
    for (uint32_t i = 0; i < w->nnat; i++) {
        nat_t x;
        if (!rd_nat_one(&r, &x)) return 0;
        const lit_t *t = &NAT_TYPES[x.type];
        if (!w_byte(o, 0x84) || !w_str(o, (const uint8_t *)"type", 4) ||
            !w_str(o, (const uint8_t *)t->s, t->n) ||
            !w_str(o, (const uint8_t *)"original", 8) || !w_endpoint(o, x.oip, x.oport) ||
            !w_str(o, (const uint8_t *)"translated", 10) || !w_endpoint(o, x.tip, x.tport) ||
            !w_str(o, (const uint8_t *)"netns", 5) || !w_opt_uint(o, x.has_netns, x.netns))
            return 0;
    }
    return 1;
}

/* the `extra` blob as columns.extra_blobs encodes it; *null when all of it is empty */
static int w_extra(wr_t *o, const row_t *w, const uint8_t *end, int *null)
{
    int cmd = w->has_process && w->cmdline.p, cgp = w->has_cgroup && w->cgroup_path.p;
    if (!w->has_l3_c2s && !w->has_l3_s2c && !cmd && !w->has_cgroup && !w->has_tunnel &&
        !w->has_tcp_flags && !w->has_cw && !w->has_sw && !w->nincomplete && !w->has_nat) {
        *null = 1;
        return 1;
    }
    *null = 0;
    str_t none = {NULL, 0};
    /* 12 elements; with `nat` 15 (Extra's dns and drops nil before it: a record with either
     * went to Python) */
    return w_byte(o, w->has_nat ? 0x9f : 0x9c) && w_opt_uint(o, w->has_l3_c2s, w->l3_c2s) &&
           w_opt_uint(o, w->has_l3_s2c, w->l3_s2c) && w_opt_str(o, cmd ? w->cmdline : none) &&
           w_opt_uint(o, w->has_cgroup, w->cgroup_id) &&
           w_opt_str(o, cgp ? w->cgroup_path : none) &&
           w_opt_uint(o, w->has_tunnel, w->outer_dport) &&
           (w->has_tcp_flags ? w_str_list(o, w->tcp_flags, w->ntcp_flags, end) : w_byte(o, 0xc0)) &&
           (w->has_cw ? w_workload(o, &w->cw, end) : w_byte(o, 0xc0)) &&
           (w->has_sw ? w_workload(o, &w->sw, end) : w_byte(o, 0xc0)) &&
           (w->nincomplete ? w_str_list(o, w->incomplete, w->nincomplete, end) : w_byte(o, 0xc0)) &&
           w_byte(o, 0xc0) && /* Extra's tunnel_type: the `tunnel_type` column holds it */
           w_byte(o, 0xc0) && /* tunnel_outer: a record with one went to Python */
           (!w->has_nat || (w_byte(o, 0xc0) && w_byte(o, 0xc0) && w_nat(o, w, end)));
}

/* the column buffers: per column validity bitmap (NULL: not nullable), offsets (strings),
 * data; the capacity of a string column's data; per column the bytes used and the nulls */
typedef struct {
    uint8_t *valid[NCOL];
    int32_t *off[NCOL];
    uint8_t *data[NCOL];
    int64_t cap[NCOL];
    int64_t nulls[NCOL];
} cols_t;

static inline void set_bit(uint8_t *bits, int64_t j, int v)
{
    if (v) bits[j >> 3] |= (uint8_t)(1u << (j & 7));
    else bits[j >> 3] &= (uint8_t)~(1u << (j & 7));
}

static inline void put_valid(cols_t *c, int col, int64_t j, int v)
{
    if (c->valid[col]) {
        set_bit(c->valid[col], j, v);
        if (!v) c->nulls[col]++;
    }
}

static inline void put_str(cols_t *c, int col, int64_t j, str_t s) /* s.p NULL: null */
{
    int32_t at = c->off[col][j];
    if (s.p) {
        memcpy(c->data[col] + at, s.p, s.n);
        at += (int32_t)s.n;
    }
    c->off[col][j + 1] = at;
    put_valid(c, col, j, s.p != NULL);
}

static inline void put_i64(cols_t *c, int col, int64_t j, int has, uint64_t v)
{
    ((int64_t *)c->data[col])[j] = has ? (int64_t)v : 0;
    put_valid(c, col, j, has);
}

static inline void put_i32(cols_t *c, int col, int64_t j, int has, uint64_t v)
{
    ((int32_t *)c->data[col])[j] = has ? (int32_t)v : 0;
    put_valid(c, col, j, has);
}

static inline int fits(const cols_t *c, int col, int64_t j, str_t s)
{
    return !s.p || c->cap[col] - c->off[col][j] >= (int64_t)s.n;
}

/* write row j; 0 (nothing committed) when a string column is full */
static int put_row(cols_t *c, int64_t j, const row_t *w, const uint8_t *end)
{
    str_t none = {NULL, 0};
    str_t comm = w->has_process ? w->comm : none;
    str_t osrc = w->has_tunnel ? w->outer_src : none, odst = w->has_tunnel ? w->outer_dst : none;
    str_t ttype = none;
    if (w->has_tunnel) {
        ttype.p = (const uint8_t *)TUNNEL_TYPES[w->tunnel_type].s;
        ttype.n = TUNNEL_TYPES[w->tunnel_type].n;
    }
    if (!fits(c, C_RECORD_ID, j, w->record_id) || !fits(c, C_SOURCE, j, w->source) ||
        !fits(c, C_PROTOCOL, j, w->protocol) || !fits(c, C_CLIENT_IP, j, w->client_ip) ||
        !fits(c, C_SERVER_IP, j, w->server_ip) || !fits(c, C_OBSERVER, j, w->observer) ||
        !fits(c, C_CONNECT, j, w->connect) || !fits(c, C_COMM, j, comm) ||
        !fits(c, C_CONTAINER, j, w->container) || !fits(c, C_OUTER_SRC, j, osrc) ||
        !fits(c, C_OUTER_DST, j, odst) || !fits(c, C_TUNNEL_TYPE, j, ttype))
        return 0;
    int32_t at = c->off[C_EXTRA][j];
    wr_t o = {c->data[C_EXTRA] + at, c->data[C_EXTRA] + c->cap[C_EXTRA]};
    int null;
    if (!w_extra(&o, w, end, &null)) return 0;
    c->off[C_EXTRA][j + 1] = at + (int32_t)(o.p - (c->data[C_EXTRA] + at));
    put_valid(c, C_EXTRA, j, !null);

    put_str(c, C_RECORD_ID, j, w->record_id);
    put_str(c, C_SOURCE, j, w->source);
    put_i64(c, C_START, j, 1, (uint64_t)w->start);
    put_i64(c, C_END, j, 1, (uint64_t)w->end);
    set_bit(c->data[C_FINAL], j, w->final);
    put_str(c, C_PROTOCOL, j, w->protocol);
    ((int8_t *)c->data[C_FAMILY])[j] = (int8_t)w->family;
    put_str(c, C_CLIENT_IP, j, w->client_ip);
    put_i32(c, C_CLIENT_PORT, j, 1, w->cport);
    put_str(c, C_SERVER_IP, j, w->server_ip);
    put_i32(c, C_SERVER_PORT, j, 1, w->sport);
    put_str(c, C_OBSERVER, j, w->observer);
    put_i64(c, C_BYTES_C2S, j, 1, w->bytes_c2s);
    put_i64(c, C_BYTES_S2C, j, 1, w->bytes_s2c);
    put_i64(c, C_PACKETS_C2S, j, w->has_packets_c2s, w->packets_c2s);
    put_i64(c, C_PACKETS_S2C, j, w->has_packets_s2c, w->packets_s2c);
    put_str(c, C_CONNECT, j, w->connect);
    put_i64(c, C_RETRANSMITS, j, 1, w->retrans);
    put_i64(c, C_RESETS, j, 1, w->resets);
    put_i64(c, C_RTT_MIN, j, w->has_rtt, w->rtt[0]);
    put_i64(c, C_RTT_AVG, j, w->has_rtt, w->rtt[1]);
    put_i64(c, C_RTT_MAX, j, w->has_rtt, w->rtt[2]);
    put_i64(c, C_PID, j, w->has_process, w->pid);
    put_str(c, C_COMM, j, comm);
    put_i64(c, C_NETNS, j, w->has_netns, w->netns);
    put_str(c, C_CONTAINER, j, w->container);
    put_i32(c, C_VNI, j, w->has_tunnel, w->vni);
    put_str(c, C_OUTER_SRC, j, osrc);
    put_str(c, C_OUTER_DST, j, odst);
    set_bit(c->data[C_LOOPBACK], j, w->loopback);
    set_bit(c->data[C_INCOMPLETE], j, w->nincomplete > 0);
    put_str(c, C_TUNNEL_TYPE, j, ttype);
    return 1;
}

/* -- the batch ---------------------------------------------------------------------------------- */
static const lit_t ENV_KEYS[] = {L("collector"), L("batch_seq"), L("sent_at"), L("records")};

/* The envelope, keys in msgspec's order (collector, batch_seq, sent_at, records). env out:
 * [0] collector offset, [1] its length, [2] batch_seq, [3] sent_at seconds, [4] its µs,
 * [5] offset of the first record, [6] the number of records. Returns that number, or -1: the
 * reference path must decode this batch. */
int64_t ew_wire_envelope(const uint8_t *buf, int64_t len, int64_t *env)
{
    rd_t r = {buf, buf + len};
    uint32_t n;
    str_t key, coll;
    if (len <= 0 || !rd_map(&r, &n) || n != 4) return -1;
    for (int k = 0; k < 4; k++) {
        if (!rd_str_raw(&r, &key) || !eq_lit(key, ENV_KEYS[k])) return -1;
        switch (k) {
        case 0:
            if (!rd_str(&r, &coll)) return -1;
            env[0] = coll.p - buf;
            env[1] = coll.n;
            break;
        case 1:
            if (!rd_int64(&r, &env[2])) return -1;
            break;
        case 2:
            if (!rd_ts_parts(&r, &env[3], &env[4])) return -1;
            break;
        default:
            if (!rd_arr(&r, &n)) return -1;
            if ((uint64_t)n > (uint64_t)(r.end - r.p)) return -1; /* a record is >= 1 byte */
            env[5] = r.p - buf;
            env[6] = n;
        }
    }
    return env[6];
}

/* Decode the records. bufs: per column (valid, offsets, data) as addresses; caps: data capacity
 * of string columns; used out: per column the nulls, then [NCOL] the rows written; deferred out:
 * (index, offset, length) of each record left to Python. Returns the number deferred, or -1:
 * the payload is malformed or not as expected, the reference path must decode the batch. */
int64_t ew_wire_decode(const uint8_t *buf, int64_t len, const int64_t *env, const uint64_t *bufs,
                       int64_t *used, int64_t *deferred)
{
    cols_t c;
    for (int k = 0; k < NCOL; k++) {
        c.valid[k] = (uint8_t *)(uintptr_t)bufs[3 * k];
        c.off[k] = (int32_t *)(uintptr_t)bufs[3 * k + 1];
        c.data[k] = (uint8_t *)(uintptr_t)bufs[3 * k + 2];
        c.cap[k] = (int64_t)used[k]; /* in: the capacities */
        c.nulls[k] = 0;
        if (c.off[k]) c.off[k][0] = 0;
    }
    str_t coll = {buf + env[0], (uint32_t)env[1]};
    const uint8_t *end = buf + len;
    rd_t r = {buf + env[5], end};
    int64_t n = env[6], rows = 0, nd = 0;
    row_t w;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *at = r.p;
        if (rd_record(&r, &w, coll) && put_row(&c, rows, &w, end)) {
            rows++;
            continue;
        }
        r.p = at;
        if (!skip(&r, 0)) return -1;
        deferred[3 * nd] = i;
        deferred[3 * nd + 1] = at - buf;
        deferred[3 * nd + 2] = r.p - at;
        nd++;
    }
    if (r.p != end) return -1; /* trailing bytes: msgspec refuses the envelope */
    for (int k = 0; k < NCOL; k++) used[k] = c.nulls[k];
    used[NCOL] = rows;
    return nd;
}
