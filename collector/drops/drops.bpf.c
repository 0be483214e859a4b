// Packets the kernel drops, with its reason: skb:kfree_skb, counted in the kernel per
// (network namespace, 5-tuple, reason) and drained by collector/drops/kernel.py in batches.
//
// The tracepoint (include/trace/events/skb.h) carries skbaddr, location, protocol (the
// ethertype, host order) and, since Linux 5.17, `reason` (enum skb_drop_reason). Normal frees go
// through consume_skb, so every kfree_skb is a drop. The packet is read from skb->head at
// skb->network_header (set on every path where a netfilter hook, IP or the bridge's
// br_netfilter ran); the ports follow the IPv4 header (its IHL) or the fixed IPv6 header (a
// packet with IPv6 extension headers is counted with ports 0). The namespace is the one of
// skb->dev (or of the socket when there is no device yet).
//
// Constants prepended by the loader (collector/drops/kernel.py): DROP_ENTRIES, FILTER_NETNS,
// HAVE_REASON (the format file lists `reason`), and offsets from BTF: OFF_SKB_HEAD,
// OFF_SKB_NETWORK_HEADER, OFF_SKB_DEV, OFF_SKB_SK, OFF_DEV_NET, OFF_SK_NET, OFF_NET_NS_INUM.

// bcc declares the tracepoint's `enum skb_drop_reason reason` field; with no kernel header
// defining the enum here it would be an incomplete type. Its values come from the format file.
enum skb_drop_reason { EW_SKB_DROP_REASON_ANY = 0, EW_SKB_DROP_REASON_MAX = 0x7fffffff };

#define EW_ETH_P_IP 0x0800
#define EW_ETH_P_IPV6 0x86DD
#define EW_IPPROTO_TCP 6
#define EW_IPPROTO_UDP 17
#define EW_IPPROTO_SCTP 132

#define DSTAT_MAP_FULL 0
#define DSTAT_NO_HEADER 1
#define DSTAT_OTHER_L3 2
#define DSTAT_SEEN 3
#define DSTAT_N 4

struct drop_key_t {
    u32 netns;
    u32 reason;
    u8 family;
    u8 proto;
    u8 tcp_flags;   // the flags of the first dropped packet of this key (decides orientation)
    u8 pad;
    u16 sport;      // host order
    u16 dport;
    u8 saddr[16];   // IPv4: the first 4 bytes
    u8 daddr[16];
};

struct drop_val_t {
    u64 packets;
    u64 bytes;      // IP bytes (tot_len / payload_len + 40)
    u64 first_ns;
    u64 last_ns;
};

BPF_HASH(drops, struct drop_key_t, struct drop_val_t, DROP_ENTRIES);
BPF_PERCPU_ARRAY(dstats, u64, DSTAT_N);
#if FILTER_NETNS
BPF_HASH(netns_allow, u32, u8, 256);
#endif

static __always_inline void dstat_inc(int idx) {
    u64 *p = dstats.lookup(&idx);
    if (p)
        (*p)++;
}

static __always_inline u32 ns_of_net(const void *net) {
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_NS_INUM);
    return inum;
}

TRACEPOINT_PROBE(skb, kfree_skb) {
#if HAVE_REASON
    u32 reason = args->reason;
#else
    u32 reason = 0;  // before Linux 5.17 the tracepoint has no reason: counted as UNKNOWN
#endif
    u16 l3 = args->protocol;
    if (l3 != EW_ETH_P_IP && l3 != EW_ETH_P_IPV6) {
        return 0;  // ARP, LLDP, ...: not a flow
    }
    const char *skb = (const char *)args->skbaddr;
    void *dev = 0, *net = 0, *sk = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), skb + OFF_SKB_DEV);
    if (dev) {
        bpf_probe_read_kernel(&net, sizeof(net), (const char *)dev + OFF_DEV_NET);
    } else {
        bpf_probe_read_kernel(&sk, sizeof(sk), skb + OFF_SKB_SK);
        if (sk)
            bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET);
    }
    u32 netns = ns_of_net(net);
#if FILTER_NETNS
    if (!netns_allow.lookup(&netns))
        return 0;
#endif
    dstat_inc(DSTAT_SEEN);
    unsigned char *head = 0;
    u16 nh = 0;
    bpf_probe_read_kernel(&head, sizeof(head), skb + OFF_SKB_HEAD);
    bpf_probe_read_kernel(&nh, sizeof(nh), skb + OFF_SKB_NETWORK_HEADER);
    if (!head || nh == 0xFFFF) {
        dstat_inc(DSTAT_NO_HEADER);
        return 0;
    }
    const unsigned char *ip = head + nh;
    struct drop_key_t key = {};
    key.netns = netns;
    key.reason = reason;
    u8 first = 0;
    bpf_probe_read_kernel(&first, 1, ip);
    u32 l4_off = 0;
    u64 len = 0;
    if (l3 == EW_ETH_P_IP && (first >> 4) == 4) {
        u8 hdr[20];
        bpf_probe_read_kernel(hdr, sizeof(hdr), ip);
        key.family = 4;
        key.proto = hdr[9];
        __builtin_memcpy(key.saddr, &hdr[12], 4);
        __builtin_memcpy(key.daddr, &hdr[16], 4);
        l4_off = (hdr[0] & 0x0F) * 4;
        len = ((u64)hdr[2] << 8) | hdr[3];
        if ((((u16)hdr[6] << 8 | hdr[7]) & 0x1FFF) != 0)
            l4_off = 0;  // a later fragment: no ports in it
    } else if (l3 == EW_ETH_P_IPV6 && (first >> 4) == 6) {
        u8 hdr[40];
        bpf_probe_read_kernel(hdr, sizeof(hdr), ip);
        key.family = 6;
        key.proto = hdr[6];
        __builtin_memcpy(key.saddr, &hdr[8], 16);
        __builtin_memcpy(key.daddr, &hdr[24], 16);
        l4_off = 40;
        len = (((u64)hdr[4] << 8) | hdr[5]) + 40;
    } else {
        dstat_inc(DSTAT_OTHER_L3);
        return 0;
    }
    if (l4_off && (key.proto == EW_IPPROTO_TCP || key.proto == EW_IPPROTO_UDP ||
                   key.proto == EW_IPPROTO_SCTP)) {
        u8 l4[14] = {};
        bpf_probe_read_kernel(l4, sizeof(l4), ip + l4_off);
        key.sport = (u16)l4[0] << 8 | l4[1];
        key.dport = (u16)l4[2] << 8 | l4[3];
        if (key.proto == EW_IPPROTO_TCP)
            key.tcp_flags = l4[13] & 0x12;  // SYN and ACK: enough to orient, one key per role
    }
    u64 now = bpf_ktime_get_ns();
    struct drop_val_t *v = drops.lookup(&key);
    if (v) {
        __sync_fetch_and_add(&v->packets, 1);
        __sync_fetch_and_add(&v->bytes, len);
        v->last_ns = now;
        return 0;
    }
    struct drop_val_t nv = {.packets = 1, .bytes = len, .first_ns = now, .last_ns = now};
    if (drops.update(&key, &nv) != 0)
        dstat_inc(DSTAT_MAP_FULL);
    return 0;
}
