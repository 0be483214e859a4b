// eastwest socket probes: every TCP connection of every process, aggregated in the kernel.
//
// Hooks (stable tracepoints only; no kprobes, no fentry):
//   sock:inet_sock_set_state  (tracepoint: its record carries the 5-tuple)  lifecycle, roles
//   sock:sock_send_length / sock:sock_recv_length  (raw: sk, ret, flags)     payload bytes
//   tcp:tcp_retransmit_skb, tcp:tcp_send_reset, tcp:tcp_receive_reset (raw: sk first)
//   tcp:tcp_probe  (raw: sk; srtt_us read at a BTF offset)                   smoothed RTT
//   tcp:tcp_destroy_sock  (raw: sk)  the socket is gone: its final record goes out
// Kernel sources: net/ipv4/tcp.c tcp_set_state(), net/socket.c sock_sendmsg_nosec() and
// sock_recvmsg_nosec(), net/ipv4/tcp_input.c tcp_reset() / tcp_rcv_established(),
// include/trace/events/{sock,tcp}.h.
//
// Per-socket counters live in `conns` (hash keyed by the sock pointer). Only the end of a
// connection crosses to userspace, through the `events` ring buffer, with the final counters
// copied in; the entry is then deleted here. When the ring buffer is full the final state is
// parked in `overflow`, keyed by (sock pointer, start time) so that a new socket at the same
// address cannot overwrite it, and userspace drains it at its next poll. Only when `overflow`
// is full too does the entry stay in `conns`, marked `deferred`, for the next interval drain
// (a new socket at the same address then overwrites it: counted as `deferred_lost`).
// Everything that is lost anyway is counted in `stats`.
//
// Close events are submitted without waking the reader (BPF_RB_NO_WAKEUP), except every
// WAKEUP_EVERY-th event of a CPU (BPF_RB_FORCE_WAKEUP): userspace drains the ring in batches
// (it also polls every 0.2 s), so it runs per batch, not per connection. Because a batch may
// come after a short-lived process has exited, the first time a (pid, comm) owns a socket a
// small `proc_event_t` goes out at once through the `procs` ring buffer (forced wake-up,
// `procs_seen` remembers it), so that userspace reads the command line while the process
// still exists.
//
// UDP (HAVE_UDP): udp.bpf.c, appended to this file by the loader.
//
// Compile-time constants (`#define`s prepended by collector/probes/kernel.py): OFF_* byte offsets from the
// running kernel's BTF, HAVE_UDP, CONN_ENTRIES, OVERFLOW_ENTRIES, LISTEN_ENTRIES, RINGBUF_PAGES, FILTER_NETNS, HAVE_BYTES,
// HAVE_RETRANSMIT, HAVE_RESETS, HAVE_RTT, HAVE_DESTROY, WAKEUP_EVERY, PROC_RINGBUF_PAGES,
// PROCS_SEEN_ENTRIES. Never a struct layout from headers.

#include <uapi/linux/ptrace.h>

#define EW_AF_INET 2
#define EW_AF_INET6 10
#define EW_IPPROTO_TCP 6
#define EW_TCP_ESTABLISHED 1
#define EW_TCP_SYN_SENT 2
#define EW_TCP_SYN_RECV 3
#define EW_TCP_CLOSE 7
#define EW_TCP_LISTEN 10
#define EW_MSG_PEEK 2
#define EW_RB_NO_WAKEUP 1      // include/uapi/linux/bpf.h BPF_RB_NO_WAKEUP
#define EW_RB_FORCE_WAKEUP 2   // BPF_RB_FORCE_WAKEUP

#define ROLE_CLIENT 1
#define ROLE_SERVER 2
#define PHASE_CONNECTING 1
#define PHASE_ESTABLISHED 2
#define OWNER_NONE 0
#define OWNER_LISTENER 1
#define OWNER_CONTEXT 2

// indexes of `stats` (mirrored in collector/probes/conn.py STAT_NAMES)
#define STAT_CLOSE_DEFERRED 0   // ring buffer full: final record taken from the map instead
#define STAT_CONN_MAP_FULL 1    // a connection could not be tracked at all
#define STAT_LISTEN_MAP_FULL 2  // a listener's owner could not be remembered
#define STAT_DEFERRED_LOST 3    // a deferred entry was overwritten before userspace drained it
#define STAT_OPENED 4           // connections tracked
#define STAT_CLOSED 5           // close events sent
#define STAT_CLOSE_OVERFLOWED 6 // ring buffer full: final state parked in `overflow`
#define STAT_UDP_NO_PEER 7      // a UDP datagram whose peer is not known (unconnected, no address)
#define STAT_UDP_BAD_ADDR 8     // a UDP datagram whose sockaddr could not be read from user memory
#define STAT_UDP_MAP_FULL 9     // a UDP flow could not be tracked at all
#define STAT_UDP_MMSG_OVER 10   // recvmmsg datagrams beyond UDP_MMSG_MAX in one call
#define STAT_UDP_OPENED 11      // UDP flows tracked
#define NSTATS 12

struct conn_t {
    u64 start_ns;
    u64 end_ns;
    u64 bytes_sent;
    u64 bytes_recv;
    u64 rtt_sum_us;
    u64 cgroup_id;
    u32 rtt_count;
    u32 rtt_min_us;
    u32 rtt_max_us;
    u32 retransmits;
    u32 resets_sent;
    u32 resets_recv;
    u32 pid;
    u32 netns;
    s32 sk_err;
    u16 sport;
    u16 dport;
    u16 family;
    u8 role;
    u8 phase;
    u8 owner;
    u8 close_oldstate;   // the state the socket left for CLOSE (SYN_SENT: the connect failed)
    u8 tcp_closed;
    u8 deferred;
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};

struct close_event_t {
    u64 sk;
    struct conn_t conn;
};

// a process seen owning a socket for the first time
struct proc_event_t {
    u32 pid;
    u32 pad;
    char comm[16];
};

struct proc_key_t {
    u32 pid;
    char comm[16];
};

struct overflow_key_t {
    u64 sk;
    u64 start_ns;
};

struct listen_key_t {
    u32 netns;
    u32 port;
};

struct owner_t {
    u64 cgroup_id;
    u32 pid;
    u32 pad;
    char comm[16];
};

BPF_HASH(conns, u64, struct conn_t, CONN_ENTRIES);
BPF_HASH(overflow, struct overflow_key_t, struct conn_t, OVERFLOW_ENTRIES);
BPF_HASH(listeners, struct listen_key_t, struct owner_t, LISTEN_ENTRIES);
BPF_PERCPU_ARRAY(stats, u64, NSTATS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);  // close events only: every record one size
BPF_RINGBUF_OUTPUT(procs, PROC_RINGBUF_PAGES);  // proc_event_t
BPF_TABLE("lru_hash", struct proc_key_t, u8, procs_seen, PROCS_SEEN_ENTRIES);
#if FILTER_NETNS
BPF_HASH(netns_allow, u32, u8, 256);
#endif

static __always_inline void stat_inc(int idx) {
    u64 *p = stats.lookup(&idx);
    if (p)
        (*p)++;
}

static __always_inline u32 sk_netns(const void *sk) {
    void *net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_NS_INUM);
    return inum;
}

static __always_inline int netns_wanted(u32 netns) {
#if FILTER_NETNS
    return netns_allow.lookup(&netns) != 0;
#else
    return 1;
#endif
}

// Tell userspace, once per (pid, comm), that this process owns sockets. Best effort: when the
// ring is full nothing is remembered, and the next socket of the process tries again.
static __always_inline void announce(u32 pid, const char *comm) {
    struct proc_key_t k = {.pid = pid};
    __builtin_memcpy(k.comm, comm, sizeof(k.comm));
    if (procs_seen.lookup(&k))
        return;
    struct proc_event_t *e = procs.ringbuf_reserve(sizeof(struct proc_event_t));
    if (!e)
        return;
    e->pid = pid;
    e->pad = 0;
    __builtin_memcpy(e->comm, comm, sizeof(e->comm));
    procs.ringbuf_submit(e, EW_RB_FORCE_WAKEUP);
    u8 one = 1;
    procs_seen.update(&k, &one);
}

static __always_inline void claim_owner(struct conn_t *c) {
    c->pid = bpf_get_current_pid_tgid() >> 32;
    c->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
    c->owner = OWNER_CONTEXT;
    announce(c->pid, c->comm);
}

// a macro: bcc defines the tracepoint's args struct only inside TRACEPOINT_PROBE
#define COPY_TUPLE(c, args)                                     \
    do {                                                        \
        (c)->family = (args)->family;                           \
        (c)->sport = (args)->sport;                             \
        (c)->dport = (args)->dport;                             \
        if ((args)->family == EW_AF_INET) {                     \
            __builtin_memcpy((c)->saddr, (args)->saddr, 4);     \
            __builtin_memcpy((c)->daddr, (args)->daddr, 4);     \
        } else {                                                \
            __builtin_memcpy((c)->saddr, (args)->saddr_v6, 16); \
            __builtin_memcpy((c)->daddr, (args)->daddr_v6, 16); \
        }                                                       \
    } while (0)

static __always_inline void track(u64 key, struct conn_t *c) {
    struct conn_t *old = conns.lookup(&key);
    if (old && old->deferred)
        stat_inc(STAT_DEFERRED_LOST);
    if (conns.update(&key, c) != 0)
        stat_inc(STAT_CONN_MAP_FULL);
    else
        stat_inc(STAT_OPENED);
}

// The final counters go out through the ring buffer and the entry is deleted; when the ring is
// full the entry stays, marked, and userspace's next drain emits it (counted, not lost).
static __always_inline void finish(u64 key, struct conn_t *c) {
    if (!c->end_ns)
        c->end_ns = bpf_ktime_get_ns();
    struct close_event_t *e = events.ringbuf_reserve(sizeof(struct close_event_t));
    if (!e) {
        struct overflow_key_t ok = {.sk = key, .start_ns = c->start_ns};
        if (overflow.update(&ok, c) == 0) {
            conns.delete(&key);
            stat_inc(STAT_CLOSE_OVERFLOWED);
        } else {
            c->deferred = 1;
            stat_inc(STAT_CLOSE_DEFERRED);
        }
        return;
    }
    e->sk = key;
    __builtin_memcpy(&e->conn, c, sizeof(struct conn_t));
    u64 flags = EW_RB_NO_WAKEUP;
    int idx = STAT_CLOSED;
    u64 *closed = stats.lookup(&idx);  // this CPU's count of close events sent
    if (closed) {
        *closed += 1;
        if (*closed % WAKEUP_EVERY == 0)
            flags = EW_RB_FORCE_WAKEUP;
    }
    events.ringbuf_submit(e, flags);
    conns.delete(&key);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != EW_IPPROTO_TCP)
        return 0;
    u64 key = (u64)args->skaddr;
    int oldstate = args->oldstate;
    int newstate = args->newstate;

    if (newstate == EW_TCP_LISTEN) {  // listen(): process context, the server's owner
        struct listen_key_t lk = {.netns = sk_netns(args->skaddr), .port = args->sport};
        struct owner_t o = {};
        o.pid = bpf_get_current_pid_tgid() >> 32;
        o.cgroup_id = bpf_get_current_cgroup_id();
        bpf_get_current_comm(&o.comm, sizeof(o.comm));
        if (listeners.update(&lk, &o) != 0)
            stat_inc(STAT_LISTEN_MAP_FULL);
        announce(o.pid, o.comm);
        return 0;
    }
    if (newstate == EW_TCP_SYN_SENT) {  // connect(): process context, the client's owner
        u32 netns = sk_netns(args->skaddr);
        if (!netns_wanted(netns))
            return 0;
        struct conn_t c = {};
        c.start_ns = bpf_ktime_get_ns();
        c.role = ROLE_CLIENT;
        c.phase = PHASE_CONNECTING;
        c.netns = netns;
        COPY_TUPLE(&c, args);  // the source port may still be 0: refreshed below
        claim_owner(&c);
        track(key, &c);
        return 0;
    }
    if (newstate == EW_TCP_ESTABLISHED && oldstate == EW_TCP_SYN_RECV) {
        // the accepted socket, in softirq: `current` is whoever was interrupted, so the owner
        // is the listener's process until the first send/recv in process context claims it
        u32 netns = sk_netns(args->skaddr);
        if (!netns_wanted(netns))
            return 0;
        struct conn_t c = {};
        c.start_ns = bpf_ktime_get_ns();
        c.role = ROLE_SERVER;
        c.phase = PHASE_ESTABLISHED;
        c.netns = netns;
        COPY_TUPLE(&c, args);
        struct listen_key_t lk = {.netns = netns, .port = args->sport};
        struct owner_t *o = listeners.lookup(&lk);
        if (o) {
            c.pid = o->pid;
            c.cgroup_id = o->cgroup_id;
            __builtin_memcpy(c.comm, o->comm, sizeof(c.comm));
            c.owner = OWNER_LISTENER;
        }
        track(key, &c);
        return 0;
    }

    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (newstate == EW_TCP_ESTABLISHED && oldstate == EW_TCP_SYN_SENT) {
        c->phase = PHASE_ESTABLISHED;
        COPY_TUPLE(c, args);
    } else if (newstate == EW_TCP_CLOSE) {
        if (args->sport)
            COPY_TUPLE(c, args);
        c->close_oldstate = oldstate;
        c->tcp_closed = 1;
        c->end_ns = bpf_ktime_get_ns();
        bpf_probe_read_kernel(&c->sk_err, sizeof(c->sk_err), (const char *)args->skaddr + OFF_SK_ERR);
        // A failed connect can count nothing more. An established connection waits for
        // tcp_destroy_sock: the application may still read data that arrived before a RST,
        // and an abortive close sends its RST after the CLOSE transition.
        if (oldstate == EW_TCP_SYN_SENT || !HAVE_DESTROY)
            finish(key, c);
    }
    return 0;
}

#if HAVE_DESTROY
RAW_TRACEPOINT_PROBE(tcp_destroy_sock) {
    u64 key = ctx->args[0];
    struct conn_t *c = conns.lookup(&key);
    if (c && !c->deferred)
        finish(key, c);
    return 0;
}
#endif

#if HAVE_UDP  // udp.bpf.c, compiled after this file
static __always_inline void udp_sent(u64 sk, int ret);
static __always_inline void udp_received(u64 sk, int ret, int flags);
#endif

#if HAVE_BYTES
// Python never runs per send: these only add to the socket's entry (TCP) or flow (UDP).
RAW_TRACEPOINT_PROBE(sock_send_length) {
    int ret = (int)ctx->args[1];
    u64 key = ctx->args[0];
    struct conn_t *c = conns.lookup(&key);
    if (!c) {
#if HAVE_UDP
        udp_sent(key, ret);
#endif
        return 0;
    }
    if (ret <= 0)
        return 0;
    __sync_fetch_and_add(&c->bytes_sent, (u64)ret);
    if (c->owner != OWNER_CONTEXT)
        claim_owner(c);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_recv_length) {
    int ret = (int)ctx->args[1];
    int flags = (int)ctx->args[2];
    u64 key = ctx->args[0];
    struct conn_t *c = conns.lookup(&key);
    if (!c) {
#if HAVE_UDP
        udp_received(key, ret, flags);
#endif
        return 0;
    }
    if (ret <= 0 || (flags & EW_MSG_PEEK))
        return 0;
    __sync_fetch_and_add(&c->bytes_recv, (u64)ret);
    if (c->owner != OWNER_CONTEXT)
        claim_owner(c);
    return 0;
}
#endif

#if HAVE_RETRANSMIT
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb) {
    u64 key = ctx->args[0];
    struct conn_t *c = conns.lookup(&key);
    if (c)
        __sync_fetch_and_add(&c->retransmits, 1);
    return 0;
}
#endif

#if HAVE_RESETS
RAW_TRACEPOINT_PROBE(tcp_send_reset) {
    u64 key = ctx->args[0];  // NULL when no socket exists (e.g. a closed port)
    if (!key)
        return 0;
    struct conn_t *c = conns.lookup(&key);
    if (c)
        __sync_fetch_and_add(&c->resets_sent, 1);
    return 0;
}

RAW_TRACEPOINT_PROBE(tcp_receive_reset) {
    u64 key = ctx->args[0];
    struct conn_t *c = conns.lookup(&key);
    if (c)
        __sync_fetch_and_add(&c->resets_recv, 1);
    return 0;
}
#endif

#if HAVE_RTT
RAW_TRACEPOINT_PROBE(tcp_probe) {
    u64 key = ctx->args[0];
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return 0;
    u32 srtt = 0;
    bpf_probe_read_kernel(&srtt, sizeof(srtt), (const char *)key + OFF_TCP_SRTT_US);
    srtt >>= 3;  // tcp_sock.srtt_us holds the smoothed RTT << 3 (net/ipv4/tcp_input.c)
    if (!srtt)
        return 0;
    // runs under the socket lock (tcp_rcv_established): plain updates are consistent
    c->rtt_sum_us += srtt;
    c->rtt_count += 1;
    if (!c->rtt_min_us || srtt < c->rtt_min_us)
        c->rtt_min_us = srtt;
    if (srtt > c->rtt_max_us)
        c->rtt_max_us = srtt;
    return 0;
}
#endif
