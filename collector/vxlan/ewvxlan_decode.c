/* ewvxlan_decode.c: one frame -> status and the columns of packets.Decoded.
 *
 * The policy is the one written in collector/vxlan/packets.py, check for check and in the same
 * order as the scapy reference (reference.py): the link layer (Ethernet and any number of
 * 802.1Q/802.1ad tags, Linux cooked SLL / SLL2, raw IP); IPv4 (RFC 791) or IPv6 (RFC 8200,
 * Hop-by-Hop / Routing / Destination Options skipped, Fragment = `fragment`); UDP (RFC 768) to
 * a tunnel port: VXLAN (RFC 7348: the I flag must be set, reserved bits ignored), Geneve
 * (RFC 8926: version 0, options skipped, inner Ethernet or IP), VXLAN-GPE (I flag, version 0,
 * next protocol IPv4 / IPv6 / Ethernet), then the inner Ethernet, tags, IPv4/IPv6, and again
 * while that is UDP to a tunnel port (nested tunnels, up to EW_MAX_TUNNELS); or no tunnel
 * (the packet is its own flow when the policy takes plain traffic); TCP (RFC 9293), UDP, ICMP,
 * ICMPv6 (8-byte header). Every read is checked against the captured length first, so no input
 * can read outside the frame. tests/unit/test_vxlan_differential.py holds this, the numpy
 * decoder and scapy equal on every column of every packet.
 */
#include "ewvxlan.h"

#include <string.h>

/* network-order loads: one unaligned load and a byte swap each (little-endian hosts) */
static inline uint32_t be16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    return v;
}
static inline uint64_t be32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}
static inline uint64_t be64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

struct ip_hdr {
    uint64_t src_hi, src_lo, dst_hi, dst_lo, l4;
    int64_t room, l3len;
    unsigned proto, fam;
};

/* tags after EtherType e at p */
static int tags(const uint8_t *f, uint64_t cap, unsigned e, uint64_t p, unsigned *et,
                uint64_t *l3) {
    while (e == 0x8100 || e == 0x88A8) {
        if (p + 4 > cap)
            return EW_TRUNCATED;
        e = be16(f + p + 2);
        p += 4;
    }
    *et = e;
    *l3 = p;
    return EW_OK;
}

/* Ethernet and its tags at p -> EtherType and offset of L3 */
static int l2(const uint8_t *f, uint64_t cap, uint64_t p, unsigned *et, uint64_t *l3) {
    if (p + 14 > cap)
        return EW_TRUNCATED;
    /* a length (802.3) is just not IP: same as scapy's Dot3 */
    return tags(f, cap, be16(f + p + 12), p + 14, et, l3);
}

static int ip(const uint8_t *f, uint64_t cap, unsigned et, uint64_t p, int non_ip,
              struct ip_hdr *h) {
    if (et == 0x0800) {
        if (p + 20 > cap)
            return EW_TRUNCATED;
        unsigned vb = f[p], ihl = (vb & 15u) * 4u, tot = be16(f + p + 2);
        if ((vb >> 4) != 4 || ihl < 20 || tot < ihl)
            return EW_MALFORMED;
        if (p + ihl > cap)
            return EW_TRUNCATED;
        if (be16(f + p + 6) & 0x3FFF) /* MF or an offset */
            return EW_FRAGMENT;
        h->fam = 4;
        h->src_hi = h->dst_hi = 0;
        h->src_lo = be32(f + p + 12);
        h->dst_lo = be32(f + p + 16);
        h->proto = f[p + 9];
        h->l4 = p + ihl;
        h->room = (int64_t)tot - ihl;
        h->l3len = tot;
        return EW_OK;
    }
    if (et == 0x86DD) {
        if (p + 40 > cap)
            return EW_TRUNCATED;
        if ((f[p] >> 4) != 6)
            return EW_MALFORMED;
        unsigned nh = f[p + 6];
        uint64_t q = p + 40;
        int64_t plen = be16(f + p + 4), room = plen;
        while (nh == 0 || nh == 43 || nh == 60) { /* Hop-by-Hop, Routing, Destination Options */
            if (q + 8 > cap)
                return EW_TRUNCATED;
            int64_t size = ((int64_t)f[q + 1] + 1) * 8;
            room -= size;
            if (room < 0)
                return EW_MALFORMED;
            nh = f[q];
            q += (uint64_t)size;
        }
        if (nh == 44)
            return EW_FRAGMENT;
        h->fam = 6;
        h->src_hi = be64(f + p + 8);
        h->src_lo = be64(f + p + 16);
        h->dst_hi = be64(f + p + 24);
        h->dst_lo = be64(f + p + 32);
        h->proto = nh;
        h->l4 = q;
        h->room = room;
        h->l3len = plen + 40;
        return EW_OK;
    }
    return non_ip;
}

/* the capture's link layer -> EtherType and offset of L3 */
static int link(const uint8_t *f, uint64_t cap, unsigned linktype, unsigned *et, uint64_t *l3) {
    switch (linktype) {
    case 1: /* Ethernet */
        return l2(f, cap, 0, et, l3);
    case 113: /* Linux cooked SLL: protocol at byte 14 */
        if (16 > cap)
            return EW_TRUNCATED;
        return tags(f, cap, be16(f + 14), 16, et, l3);
    case 276: /* SLL2: protocol at byte 0 */
        if (20 > cap)
            return EW_TRUNCATED;
        return tags(f, cap, be16(f), 20, et, l3);
    case 101: case 12: case 14: case 228: case 229: /* raw IP */
        if (1 > cap)
            return EW_TRUNCATED;
        *et = (f[0] >> 4) == 4 ? 0x0800 : (f[0] >> 4) == 6 ? 0x86DD : 0;
        *l3 = 0;
        return EW_OK;
    default:
        return EW_LINKTYPE;
    }
}

/* the tunnel header at h -> VNI, inner EtherType and offset of the inner L2 or L3 */
static int tunnel(const uint8_t *f, uint64_t cap, unsigned kind, uint64_t h, uint32_t *vni,
                  unsigned *et, uint64_t *p) {
    if (h + 8 > cap)
        return EW_TRUNCATED;
    *vni = (uint32_t)f[h + 4] << 16 | (uint32_t)f[h + 5] << 8 | f[h + 6];
    if (kind == 2) { /* Geneve: ver(2) opt_len(6) | O C rsvd | protocol type | VNI | rsvd */
        if (f[h] >> 6)
            return EW_TUNNEL_VERSION;
        uint64_t start = h + 8 + (uint64_t)(f[h] & 0x3F) * 4;
        unsigned proto = be16(f + h + 2);
        if (proto == 0x6558)
            return l2(f, cap, start, et, p);
        if (proto == 0x0800 || proto == 0x86DD) {
            *et = proto;
            *p = start;
            return EW_OK;
        }
        return EW_INNER_NON_IP;
    }
    if (!(f[h] & 0x08))
        return EW_NO_VNI;
    if (kind == 3) { /* VXLAN-GPE: R R ver(2) I P B O | rsvd | next protocol | VNI | rsvd */
        if (f[h] & 0x30)
            return EW_TUNNEL_VERSION;
        unsigned next = f[h] & 0x04 ? f[h + 3] : 3;
        if (next == 3)
            return l2(f, cap, h + 8, et, p);
        if (next == 1 || next == 2) {
            *et = next == 1 ? 0x0800 : 0x86DD;
            *p = h + 8;
            return EW_OK;
        }
        return EW_INNER_NON_IP;
    }
    return l2(f, cap, h + 8, et, p); /* VXLAN */
}

int ew_decode(const uint8_t *f, uint64_t cap, unsigned linktype, const struct ew_policy *pol,
              struct ew_row *r) {
    struct level {
        struct ip_hdr ip; /* the header that carried the tunnel */
        uint32_t vni;
        unsigned kind, dport;
    } chain[EW_MAX_TUNNELS]; /* outermost first */
    unsigned et, depth = 0;
    uint64_t p;
    struct ip_hdr in;
    int st;

    if ((st = link(f, cap, linktype, &et, &p)) || (st = ip(f, cap, et, p, EW_NON_IP, &in)))
        return st;
    while (in.proto == 17) { /* UDP to a tunnel port: decapsulate, again for nested tunnels */
        if (in.l4 + 8 > cap)
            return EW_TRUNCATED;
        unsigned dport = be16(f + in.l4 + 2), kind = pol->kinds[dport];
        if (!kind)
            break;
        if (depth == EW_MAX_TUNNELS)
            return EW_TUNNEL_DEPTH;
        struct level *t = &chain[depth++];
        t->ip = in;
        t->kind = kind;
        t->dport = dport;
        if ((st = tunnel(f, cap, kind, in.l4 + 8, &t->vni, &et, &p)) ||
            (st = ip(f, cap, et, p, EW_INNER_NON_IP, &in)))
            return st;
    }
    if (!depth && !pol->plain)
        return EW_NOT_TUNNEL;
    uint64_t l4 = in.l4;
    unsigned sport = 0, dport = 0, flags = 0;
    int icmp_type = -1;
    int64_t hdr = 0;
    if (in.proto == 6) {
        if (l4 + 20 > cap)
            return EW_TRUNCATED;
        hdr = (int64_t)(f[l4 + 12] >> 4) * 4;
        if (hdr < 20 || in.room < hdr)
            return EW_MALFORMED;
        sport = be16(f + l4);
        dport = be16(f + l4 + 2);
        flags = f[l4 + 13];
    } else if (in.proto == 17 || (in.fam == 4 && in.proto == 1) || (in.fam == 6 && in.proto == 58)) {
        if (l4 + 8 > cap)
            return EW_TRUNCATED;
        if (in.room < 8)
            return EW_MALFORMED;
        hdr = 8;
        if (in.proto == 17) {
            sport = be16(f + l4);
            dport = be16(f + l4 + 2);
        } else {
            icmp_type = f[l4];
            /* packets.ICMP6_LINK_CONTROL: Neighbor Discovery and MLD, IPv6's ARP */
            if (in.fam == 6 && ((icmp_type >= 130 && icmp_type <= 137) || icmp_type == 143))
                return EW_LINK_CONTROL;
        }
    }
    memset(r, 0, sizeof *r);
    if (depth) {
        const struct level *own = &chain[depth - 1];
        r->ttype = (uint8_t)own->kind;
        r->vni = own->vni;
        r->ofam = (uint8_t)own->ip.fam;
        r->osrc_hi = own->ip.src_hi;
        r->osrc_lo = own->ip.src_lo;
        r->odst_hi = own->ip.dst_hi;
        r->odst_lo = own->ip.dst_lo;
        r->odport = (uint16_t)own->dport;
        for (unsigned k = 1; k < depth; k++) {
            const struct level *t = &chain[depth - 1 - k];
            r->x[k - 1] = (struct ew_around){t->ip.src_hi, t->ip.src_lo, t->ip.dst_hi,
                                             t->ip.dst_lo, t->vni, (uint16_t)t->dport,
                                             (uint8_t)t->kind, (uint8_t)t->ip.fam};
        }
    }
    r->fam = (uint8_t)in.fam;
    r->src_hi = in.src_hi;
    r->src_lo = in.src_lo;
    r->dst_hi = in.dst_hi;
    r->dst_lo = in.dst_lo;
    r->proto = (uint8_t)in.proto;
    r->sport = (uint16_t)sport;
    r->dport = (uint16_t)dport;
    r->flags = (uint8_t)flags;
    r->icmp_type = (int16_t)icmp_type;
    r->payload = in.room - hdr;
    r->l3len = in.l3len;
    return EW_OK;
}

#ifndef EW_SOURCE_DIGEST
#define EW_SOURCE_DIGEST "unknown" /* native_build.py passes the digest of these sources */
#endif
const char *ew_source_digest(void) { return EW_SOURCE_DIGEST; }
const char *ew_columns(void) { return EW_COLUMNS; }

/* Decode n frames buf[off[i]:off[i]+cap[i]] into the columns named by EW_COLUMNS (cols[k] is
 * the k-th column's array, of that column's width). Rows that do not decode keep what the
 * caller put there (packets.Decoded.empty: zeros, icmp_type -1) apart from their status. */
void ew_decode_columns(const uint8_t *buf, const int64_t *off, const int64_t *cap,
                       const uint16_t *linktype, int64_t n, const uint8_t *kinds, int plain,
                       void **cols) {
    struct ew_policy pol = {kinds, plain};
    uint8_t *status = cols[0], *ttype = cols[1], *ofam = cols[3], *fam = cols[9],
            *proto = cols[14], *flags = cols[17];
    uint32_t *vni = cols[2];
    uint64_t *osrc_hi = cols[4], *osrc_lo = cols[5], *odst_hi = cols[6], *odst_lo = cols[7],
             *src_hi = cols[10], *src_lo = cols[11], *dst_hi = cols[12], *dst_lo = cols[13];
    uint16_t *odport = cols[8], *sport = cols[15], *dport = cols[16];
    int16_t *icmp_type = cols[18];
    int64_t *payload = cols[19], *l3len = cols[20];
    for (int64_t i = 0; i < n; i++) {
        struct ew_row r;
        int st = ew_decode(buf + off[i], cap[i] < 0 ? 0 : (uint64_t)cap[i],
                           linktype ? linktype[i] : 1, &pol, &r);
        status[i] = (uint8_t)st;
        if (st != EW_OK)
            continue;
        ttype[i] = r.ttype;
        vni[i] = r.vni;
        ofam[i] = r.ofam;
        osrc_hi[i] = r.osrc_hi;
        osrc_lo[i] = r.osrc_lo;
        odst_hi[i] = r.odst_hi;
        odst_lo[i] = r.odst_lo;
        odport[i] = r.odport;
        fam[i] = r.fam;
        src_hi[i] = r.src_hi;
        src_lo[i] = r.src_lo;
        dst_hi[i] = r.dst_hi;
        dst_lo[i] = r.dst_lo;
        proto[i] = r.proto;
        sport[i] = r.sport;
        dport[i] = r.dport;
        flags[i] = r.flags;
        icmp_type[i] = r.icmp_type;
        payload[i] = r.payload;
        l3len[i] = r.l3len;
        for (int k = 0; k < EW_MAX_TUNNELS - 1; k++) {
            void **x = cols + 21 + 8 * k; /* EW_X_COLUMNS: the same eight per level */
            ((uint8_t *)x[0])[i] = r.x[k].type;
            ((uint32_t *)x[1])[i] = r.x[k].vni;
            ((uint8_t *)x[2])[i] = r.x[k].fam;
            ((uint64_t *)x[3])[i] = r.x[k].src_hi;
            ((uint64_t *)x[4])[i] = r.x[k].src_lo;
            ((uint64_t *)x[5])[i] = r.x[k].dst_hi;
            ((uint64_t *)x[6])[i] = r.x[k].dst_lo;
            ((uint16_t *)x[7])[i] = r.x[k].dport;
        }
    }
}
