/* ewvxlan_decode.c: one Ethernet frame -> status and the columns of packets.Decoded.
 *
 * The policy is the one written in collector/vxlan/packets.py, check for check and in the same
 * order as the scapy reference (reference.py): outer Ethernet and any number of 802.1Q/802.1ad
 * tags; IPv4 (RFC 791) or IPv6 (RFC 8200, Hop-by-Hop / Routing / Destination Options skipped,
 * Fragment = `fragment`); UDP (RFC 768) to a VXLAN port; VXLAN (RFC 7348: the I flag must be
 * set, reserved bits ignored); inner Ethernet, tags, IPv4/IPv6; TCP (RFC 9293), UDP, ICMP,
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

/* Ethernet and its tags at p -> EtherType and offset of L3 */
static int l2(const uint8_t *f, uint64_t cap, uint64_t p, unsigned *et, uint64_t *l3) {
    if (p + 14 > cap)
        return EW_TRUNCATED;
    unsigned e = be16(f + p + 12); /* a length (802.3) is just not IP: same as scapy's Dot3 */
    p += 14;
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

int ew_decode(const uint8_t *f, uint64_t cap, const uint16_t *ports, int nports,
              struct ew_row *r) {
    unsigned et;
    uint64_t p;
    struct ip_hdr o, in;
    int st;

    if ((st = l2(f, cap, 0, &et, &p)) || (st = ip(f, cap, et, p, EW_NOT_VXLAN, &o)))
        return st;
    if (o.proto != 17)
        return EW_NOT_VXLAN;
    uint64_t u = o.l4;
    if (u + 8 > cap)
        return EW_TRUNCATED;
    unsigned odport = be16(f + u + 2);
    int vx = 0;
    for (int i = 0; i < nports; i++)
        vx |= ports[i] == odport;
    if (!vx)
        return odport == 6081 ? EW_GENEVE : odport == 4790 ? EW_GPE : EW_NOT_VXLAN;
    if (u + 16 > cap)
        return EW_TRUNCATED;
    if (!(f[u + 8] & 0x08))
        return EW_NO_VNI;
    uint32_t vni = (uint32_t)f[u + 12] << 16 | (uint32_t)f[u + 13] << 8 | f[u + 14];

    if ((st = l2(f, cap, u + 16, &et, &p)) || (st = ip(f, cap, et, p, EW_INNER_NON_IP, &in)))
        return st;
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
        }
    }
    r->vni = vni;
    r->ofam = (uint8_t)o.fam;
    r->osrc_hi = o.src_hi;
    r->osrc_lo = o.src_lo;
    r->odst_hi = o.dst_hi;
    r->odst_lo = o.dst_lo;
    r->odport = (uint16_t)odport;
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
                       const uint16_t *linktype, int64_t n, const uint16_t *ports, int nports,
                       void **cols) {
    uint8_t *status = cols[0], *ofam = cols[2], *fam = cols[8], *proto = cols[13],
            *flags = cols[16];
    uint32_t *vni = cols[1];
    uint64_t *osrc_hi = cols[3], *osrc_lo = cols[4], *odst_hi = cols[5], *odst_lo = cols[6],
             *src_hi = cols[9], *src_lo = cols[10], *dst_hi = cols[11], *dst_lo = cols[12];
    uint16_t *odport = cols[7], *sport = cols[14], *dport = cols[15];
    int16_t *icmp_type = cols[17];
    int64_t *payload = cols[18], *l3len = cols[19];
    for (int64_t i = 0; i < n; i++) {
        struct ew_row r;
        int st = linktype && linktype[i] != 1
                     ? EW_LINKTYPE
                     : ew_decode(buf + off[i], cap[i] < 0 ? 0 : (uint64_t)cap[i], ports, nports, &r);
        status[i] = (uint8_t)st;
        if (st != EW_OK)
            continue;
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
    }
}
