/* ewvxlan: the native helper of the bulk VXLAN path (collector/vxlan/native.py loads it).
 *
 * Four parts, one shared library, loaded with ctypes (no Python C API, so one build serves
 * every Python version):
 *   ewvxlan_walk.c    pcap / pcapng record walk (draft-ietf-opsawg-pcap, -pcapng): the linked
 *                     list of record headers followed in C; index arrays or one record at a time
 *   ewvxlan_decode.c  the decoding policy of collector/vxlan/packets.py for one frame (link
 *                     layers, RFC 791 / RFC 8200 / RFC 768; RFC 7348 VXLAN, RFC 8926 Geneve,
 *                     VXLAN-GPE, or no tunnel; RFC 9293 TCP, UDP, ICMP)
 *   ewvxlan_flows.c   a capture file -> batches of per-flow sessions, summed in a hash table
 *                     with the session rules of collector/vxlan/flows.py
 *   ewvxlan_recv.c    live capture: a non-blocking AF_PACKET socket drained into one block
 *
 * Layouts shared with Python are named in strings (EW_COLUMNS, EW_ROW_FIELDS) that the loader
 * compares with its own before it uses the library; the build embeds a digest of these sources
 * (EW_SOURCE_DIGEST) so a stale build is never loaded.
 */
#ifndef EWVXLAN_H
#define EWVXLAN_H

#include <stdint.h>

/* status codes: the order of packets.REASONS (0 = decoded) */
enum {
    EW_OK = 0, EW_TRUNCATED, EW_MALFORMED, EW_NON_IP, EW_NOT_TUNNEL, EW_TUNNEL_VERSION,
    EW_NO_VNI, EW_INNER_NON_IP, EW_FRAGMENT, EW_LINKTYPE, EW_TUNNEL_DEPTH, EW_LINK_CONTROL,
    EW_NREASONS
};

/* walker errors (formatted in Python by pcapfile.walk_error): code, byte offset, a, b */
enum {
    EW_E_NONE = 0, EW_E_PCAP_TOO_BIG, EW_E_PCAP_CUT, EW_E_PCAP_HDR_CUT, EW_E_NG_HDR_CUT,
    EW_E_NG_BOM, EW_E_NG_BLOCK, EW_E_NG_IFACE, EW_E_NG_OVERRUN, EW_E_NG_SPB_NO_IF, EW_E_TIME,
    EW_E_NOMEM, EW_E_IO
};

#define EW_MAX_RECORD (256u * 1024u) /* pcapfile.MAX_RECORD */

#define EW_MAX_TUNNELS 3 /* packets.MAX_TUNNELS: the flow's tunnel and two around it */

/* a tunnel around the flow's own (nested tunnels): x[0] the next outer, x[1] the one around it */
struct ew_around {
    uint64_t src_hi, src_lo, dst_hi, dst_lo;
    uint32_t vni;
    uint16_t dport;
    uint8_t type, fam;
};

/* one decoded frame: the columns of packets.Decoded (except ts_us) */
struct ew_row {
    uint64_t osrc_hi, osrc_lo, odst_hi, odst_lo, src_hi, src_lo, dst_hi, dst_lo;
    int64_t payload, l3len;
    uint32_t vni;
    uint16_t odport, sport, dport;
    int16_t icmp_type;
    uint8_t ttype, ofam, fam, proto, flags;
    struct ew_around x[EW_MAX_TUNNELS - 1];
};
#define EW_X_COLUMNS(k) "x" k "type:u1,x" k "vni:u4,x" k "fam:u1,x" k "src_hi:u8,x" k "src_lo:u8," \
    "x" k "dst_hi:u8,x" k "dst_lo:u8,x" k "dport:u2"
#define EW_COLUMNS "status:u1,ttype:u1,vni:u4,ofam:u1,osrc_hi:u8,osrc_lo:u8,odst_hi:u8,odst_lo:u8," \
    "odport:u2,fam:u1,src_hi:u8,src_lo:u8,dst_hi:u8,dst_lo:u8,proto:u1,sport:u2,dport:u2," \
    "flags:u1,icmp_type:i2,payload:i8,l3len:i8," EW_X_COLUMNS("1") "," EW_X_COLUMNS("2")

/* one capture record */
struct ew_rec {
    const uint8_t *data; /* the frame, valid until the next peek */
    uint64_t off;       /* offset of the frame's first byte */
    uint32_t cap, wire; /* captured and wire lengths */
    int64_t ts;         /* µs since the epoch */
    uint16_t linktype;
};

struct ew_walk;

/* the decoding policy (packets.Policy): kinds[port] = tunnel type of UDP port (0 none, 1 VXLAN,
 * 2 Geneve, 3 VXLAN-GPE); plain: a packet outside any tunnel is a flow (else EW_NOT_TUNNEL) */
struct ew_policy {
    const uint8_t *kinds; /* 65536 entries */
    int plain;
};

int ew_decode(const uint8_t *frame, uint64_t cap, unsigned linktype, const struct ew_policy *pol,
              struct ew_row *row);
int ew_walk_peek(struct ew_walk *w, struct ew_rec *rec); /* 1 record, 0 end, -1 error */
void ew_walk_advance(struct ew_walk *w);

/* one session row (ewvxlan_flows.c), uint64 each: the names of rows.ROW_FIELDS */
#define EW_OUTER_FIELDS(d, x) d "_" x "fam," d "_" x "src_hi," d "_" x "src_lo," d "_" x "dst_hi," \
    d "_" x "dst_lo," d "_" x "dport"
#define EW_ROW_FIELDS "vni,ttype,fam,proto,a_hi,a_lo,a_port,b_hi,b_lo,b_port,xkey,newkey,tmin," \
    "tmax,start_syn,pk0,cnt,by0,by1,l30,l31,flags,rst,fin0,fin1,first_dir,syn_dir,synack_dir," \
    "req_dir,rep_dir,has_syn,tail_fr," EW_OUTER_FIELDS("o0", "") "," EW_OUTER_FIELDS("o0", "x1") \
    "," EW_OUTER_FIELDS("o0", "x2") "," EW_OUTER_FIELDS("o1", "") "," EW_OUTER_FIELDS("o1", "x1") \
    "," EW_OUTER_FIELDS("o1", "x2")
#define EW_OUTER_WORDS (6 * EW_MAX_TUNNELS) /* per direction: each tunnel's VTEPs and port */
#define EW_NFIELDS (32 + 2 * EW_OUTER_WORDS)
#define EW_DIR_NONE 2

#endif
