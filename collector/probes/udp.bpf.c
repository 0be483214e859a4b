// eastwest socket probes, UDP half: every UDP flow of every process, aggregated in the kernel.
// Compiled after socket.bpf.c, in the same program (its helpers, `stats` and the netns scope are
// shared; its sock_send_length / sock_recv_length probes hand UDP sockets to udp_sent() and
// udp_received() below).
//
// A flow is (socket, peer address, peer port). Its peer comes from:
//   - the datagram's own address in user memory, for the six calls that carry one:
//     sendto/sendmsg/sendmmsg (read when the kernel reports the send, sock_send_length, during
//     the syscall: the application's sockaddr is still there) and recvfrom/recvmsg/recvmmsg
//     (the kernel writes it after sock_recv_length: the user pointer is remembered at
//     sys_enter_*, the address read at sys_exit_*; recvmmsg: each mmsghdr's msg_name and
//     msg_len, up to UDP_MMSG_MAX messages per call, the rest counted in udp_mmsg_over);
//   - else the socket's connected peer (skc_daddr/skc_dport, or skc_v6_daddr), which also
//     covers write()/read()/io_uring on connected sockets;
//   - else nothing: counted (udp_no_peer), never guessed.
// Kernel sources: net/socket.c __sys_sendto(), __sys_recvfrom() (move_addr_to_user after
// sock_recvmsg), ___sys_recvmsg(), __sys_sendmmsg(), do_recvmmsg(); net/ipv4/udp.c
// __udp4_lib_err() (a connected socket learns ECONNREFUSED from ICMP port unreachable, an
// unconnected one does not unless IP_RECVERR); include/uapi/linux/socket.h (mmsghdr).
//
// Map `udp_flows` (key: socket pointer + socket inode number + peer) holds the counters; user
// space reads it every interval, and ends a flow (BPF_MAP_LOOKUP_AND_DELETE_ELEM) when it has
// been idle for the idle timeout or its socket is gone. No event per datagram leaves the kernel.
// `udp_calls` (key: thread) remembers the syscall in progress.
//
// Compile-time constants: OFF_SK_FAMILY, OFF_SK_PROTOCOL, OFF_SK_STATE, OFF_SK_NUM,
// OFF_SK_DPORT, OFF_SK_DADDR, OFF_SK_RCV_SADDR, OFF_SK_V6_DADDR, OFF_SK_V6_RCV_SADDR,
// OFF_SK_SOCKET, OFF_SOCKET_INODE, OFF_MSG_NAME, OFF_MSG_NAMELEN, OFF_MMSG_HDR, OFF_MMSG_LEN,
// OFF_MMSG_SIZE (BTF), UDP_ENTRIES, UDP_CALL_ENTRIES, UDP_MMSG_MAX.

#define EW_IPPROTO_UDP 17
#define EW_ECONNREFUSED 111
#define CALL_SENDTO 1
#define CALL_SENDMSG 2
#define CALL_SENDMMSG 3
#define CALL_RECVFROM 4
#define CALL_RECVMSG 5
#define CALL_RECVMMSG 6
#define FIRST_SENT 1   // this socket sent the flow's first datagram
#define FIRST_RECV 2   // it received it

struct udp_key_t {
    u64 sk;
    u64 ino;        // the socket's inode: a freed and reused `struct sock` is another key
    u8 raddr[16];   // network order; AF_INET: the first 4 bytes
    u16 rport;      // host order
    u16 family;     // of the peer address
    u32 pad;
};

struct udp_flow_t {
    u64 start_ns;   // first datagram seen
    u64 last_ns;    // latest datagram (or error) seen
    u64 bytes_sent;
    u64 bytes_recv;
    u64 dgrams_sent;
    u64 dgrams_recv;
    u64 cgroup_id;
    u32 pid;
    u32 netns;
    u16 lport;      // host order
    u16 lfamily;    // the socket's family
    u8 first;
    u8 refused;     // ECONNREFUSED reported on this flow (ICMP port unreachable)
    u8 connected;   // the socket was connected when the flow began
    u8 pad;
    u8 laddr[16];   // the socket's bound address (zero: wildcard)
    char comm[16];
};

struct udp_call_t {
    u64 arg;        // sockaddr * (sendto/recvfrom), user_msghdr * or mmsghdr * (the rest)
    u64 sk;         // recv*: the UDP socket that delivered
    u64 len;        // recvfrom/recvmsg: the datagram's length
    u32 kind;
    u32 idx;        // sendmmsg: the next message; recvfrom/recvmsg: 1 once a datagram came
};

BPF_HASH(udp_flows, struct udp_key_t, struct udp_flow_t, UDP_ENTRIES);
// Not an LRU: a thread blocked in recvfrom() for minutes is the least recently used entry and
// would be evicted by everyone else's send/recv calls (its datagram then lost its address).
// Every call reaches sys_exit (a killed thread too: the syscall returns before the signal is
// handled), so entries do not pile up; when the map is full, the datagrams of the calls that
// found no room are counted (udp_no_peer).
BPF_HASH(udp_calls, u64, struct udp_call_t, UDP_CALL_ENTRIES);

static __always_inline u16 ew_ntohs(u16 v) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap16(v);
#else
    return v;
#endif
}

static __always_inline int udp_sock(u64 sk) {
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, sizeof(proto), (const char *)sk + OFF_SK_PROTOCOL);
    return proto == EW_IPPROTO_UDP;
}

static __always_inline u16 udp_family(u64 sk) {
    u16 fam = 0;
    bpf_probe_read_kernel(&fam, sizeof(fam), (const char *)sk + OFF_SK_FAMILY);
    return fam;
}

static __always_inline u64 sk_inode(u64 sk) {
    u64 sock = 0, ino = 0;
    bpf_probe_read_kernel(&sock, sizeof(sock), (const char *)sk + OFF_SK_SOCKET);
    if (sock)
        bpf_probe_read_kernel(&ino, sizeof(ino), (const char *)sock + OFF_SOCKET_INODE);
    return ino;
}

// The connected peer of the socket; 0 when it is not connected.
static __always_inline int sk_peer(u64 sk, struct udp_key_t *k) {
    u8 state = 0;
    u16 dport = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (const char *)sk + OFF_SK_STATE);
    if (state != EW_TCP_ESTABLISHED)
        return 0;
    bpf_probe_read_kernel(&dport, sizeof(dport), (const char *)sk + OFF_SK_DPORT);
    if (!dport)
        return 0;
    k->rport = ew_ntohs(dport);
    k->family = udp_family(sk);
    if (k->family == EW_AF_INET)
        bpf_probe_read_kernel(k->raddr, 4, (const char *)sk + OFF_SK_DADDR);
    else
        bpf_probe_read_kernel(k->raddr, 16, (const char *)sk + OFF_SK_V6_DADDR);
    return 1;
}

// A sockaddr in user memory: 1 read, 0 none there (NULL, or not an IP address), -1 unreadable.
static __always_inline int user_peer(u64 uaddr, struct udp_key_t *k) {
    u16 fam = 0, port = 0;
    if (!uaddr)
        return 0;
    if (bpf_probe_read_user(&fam, sizeof(fam), (const void *)uaddr))
        return -1;
    if (fam != EW_AF_INET && fam != EW_AF_INET6)
        return 0;  // AF_UNSPEC (a connected socket's sendto may pass one): the socket's peer
    if (bpf_probe_read_user(&port, sizeof(port), (const void *)(uaddr + 2)))
        return -1;
    if (fam == EW_AF_INET) {
        if (bpf_probe_read_user(k->raddr, 4, (const void *)(uaddr + 4)))
            return -1;
    } else if (bpf_probe_read_user(k->raddr, 16, (const void *)(uaddr + 8))) {
        return -1;
    }
    k->rport = ew_ntohs(port);
    k->family = fam;
    return 1;
}

// A datagram that could not be accounted: counted when its socket is in scope.
static __always_inline void udp_miss(u64 sk, int idx) {
    if (netns_wanted(sk_netns((const void *)sk)))
        stat_inc(idx);
}

// msg_name of a user_msghdr, or 0 when it has none (NULL or msg_namelen 0).
static __always_inline u64 msg_name(u64 hdr) {
    u64 name = 0;
    int namelen = 0;
    bpf_probe_read_user(&name, sizeof(name), (const void *)(hdr + OFF_MSG_NAME));
    bpf_probe_read_user(&namelen, sizeof(namelen), (const void *)(hdr + OFF_MSG_NAMELEN));
    return namelen > 0 ? name : 0;
}

static __always_inline void udp_account(u64 sk, struct udp_key_t *k, int sent, u64 len,
                                        u64 dgrams, int refused) {
    k->sk = sk;
    k->ino = sk_inode(sk);
    k->pad = 0;
    u64 now = bpf_ktime_get_ns();
    struct udp_flow_t *f = udp_flows.lookup(k);
    if (!f) {
        u32 netns = sk_netns((const void *)sk);
        if (!netns_wanted(netns))
            return;
        struct udp_flow_t nf = {};
        nf.start_ns = now;
        nf.netns = netns;
        nf.first = sent ? FIRST_SENT : FIRST_RECV;
        nf.lfamily = udp_family(sk);
        u8 state = 0;
        bpf_probe_read_kernel(&state, sizeof(state), (const char *)sk + OFF_SK_STATE);
        nf.connected = state == EW_TCP_ESTABLISHED;
        bpf_probe_read_kernel(&nf.lport, sizeof(nf.lport), (const char *)sk + OFF_SK_NUM);
        if (nf.lfamily == EW_AF_INET)
            bpf_probe_read_kernel(nf.laddr, 4, (const char *)sk + OFF_SK_RCV_SADDR);
        else
            bpf_probe_read_kernel(nf.laddr, 16, (const char *)sk + OFF_SK_V6_RCV_SADDR);
        if (udp_flows.insert(k, &nf) == 0)
            stat_inc(STAT_UDP_OPENED);
        f = udp_flows.lookup(k);  // ours, or another CPU's that won the race
        if (!f) {
            stat_inc(STAT_UDP_MAP_FULL);
            return;
        }
    }
    f->last_ns = now;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (f->pid != pid) {  // the process that uses the socket now (every call is in its context)
        f->pid = pid;
        f->cgroup_id = bpf_get_current_cgroup_id();
        bpf_get_current_comm(&f->comm, sizeof(f->comm));
        announce(pid, f->comm);
    }
    if (sent) {
        __sync_fetch_and_add(&f->bytes_sent, len);
        __sync_fetch_and_add(&f->dgrams_sent, dgrams);
    } else {
        __sync_fetch_and_add(&f->bytes_recv, len);
        __sync_fetch_and_add(&f->dgrams_recv, dgrams);
    }
    if (refused)
        f->refused = 1;
}

// ECONNREFUSED from a send or receive: the connected peer's port is closed.
static __always_inline void udp_refused(u64 sk) {
    struct udp_key_t k = {};
    if (sk_peer(sk, &k))
        udp_account(sk, &k, 1, 0, 0, 1);
}

// The peer of one datagram: the address its call gave at `uaddr` (0: none), else the socket's
// connected peer. 0, counted as a miss, when the address cannot be read or there is neither.
static __always_inline int udp_peer(u64 sk, u64 uaddr, struct udp_key_t *k) {
    int have = user_peer(uaddr, k);
    if (have < 0) {
        udp_miss(sk, STAT_UDP_BAD_ADDR);
        return 0;
    }
    if (!have && !sk_peer(sk, k)) {
        udp_miss(sk, STAT_UDP_NO_PEER);
        return 0;
    }
    return 1;
}

// sock_send_length on a socket that is no TCP connection we track.
static __always_inline void udp_sent(u64 sk, int ret) {
    if (!udp_sock(sk))
        return;
    if (ret == -EW_ECONNREFUSED) {
        udp_refused(sk);
        return;
    }
    if (ret < 0)
        return;  // nothing was sent (a zero-length datagram is a datagram: ret 0 counts)
    u64 id = bpf_get_current_pid_tgid();
    struct udp_call_t *call = udp_calls.lookup(&id);
    struct udp_key_t k = {};
    u64 uaddr = 0;
    if (call && call->kind <= CALL_SENDMMSG) {
        uaddr = call->arg;
        if (call->kind == CALL_SENDMMSG) {
            uaddr = msg_name(call->arg + (u64)call->idx * OFF_MMSG_SIZE + OFF_MMSG_HDR);
            call->idx += 1;
        } else if (call->kind == CALL_SENDMSG) {
            uaddr = msg_name(call->arg);
        }
    }
    if (udp_peer(sk, uaddr, &k))
        udp_account(sk, &k, 1, (u64)ret, 1, 0);
}

// sock_recv_length on a socket that is no TCP connection we track.
static __always_inline void udp_received(u64 sk, int ret, int flags) {
    if ((flags & EW_MSG_PEEK) || !udp_sock(sk))
        return;
    if (ret == -EW_ECONNREFUSED) {
        udp_refused(sk);
        return;
    }
    if (ret < 0)
        return;
    u64 id = bpf_get_current_pid_tgid();
    struct udp_call_t *call = udp_calls.lookup(&id);
    if (call && call->kind >= CALL_RECVFROM) {
        call->sk = sk;  // the address is written after this: accounted at sys_exit
        if (call->kind != CALL_RECVMMSG) {
            call->len = (u64)ret;
            call->idx = 1;
        }
        return;
    }
    // read(), readv(), io_uring...: only a connected socket names its peer
    struct udp_key_t k = {};
    if (!sk_peer(sk, &k)) {
        udp_miss(sk, STAT_UDP_NO_PEER);
        return;
    }
    udp_account(sk, &k, 0, (u64)ret, 1, 0);
}

// A call without an address (send()/recv(): sendto/recvfrom with NULL, every TCP send and
// receive made that way) is not remembered: only a connected socket can use it, and its peer is
// the socket's. That keeps the hash operations off the hot path of most traffic.
static __always_inline void udp_enter(u32 kind, u64 arg) {
    if (!arg)
        return;
    u64 id = bpf_get_current_pid_tgid();
    struct udp_call_t c = {.arg = arg, .kind = kind};
    udp_calls.update(&id, &c);
}

static __always_inline void udp_exit(void) {
    u64 id = bpf_get_current_pid_tgid();
    udp_calls.delete(&id);
}

// One received datagram whose address the kernel wrote at `uaddr` (0: none).
static __always_inline void udp_recv_one(u64 sk, u64 uaddr, u64 len) {
    struct udp_key_t k = {};
    if (udp_peer(sk, uaddr, &k))
        udp_account(sk, &k, 0, len, 1, 0);
}

static __always_inline void udp_recv_exit(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    struct udp_call_t *call = udp_calls.lookup(&id);
    if (!call)
        return;
    u64 sk = call->sk;
    if (sk && ret >= 0) {
        if (call->kind == CALL_RECVFROM && call->idx) {
            udp_recv_one(sk, call->arg, call->len);
        } else if (call->kind == CALL_RECVMSG && call->idx) {
            udp_recv_one(sk, msg_name(call->arg), call->len);
        } else if (call->kind == CALL_RECVMMSG) {
            u64 base = call->arg;
            for (int i = 0; i < UDP_MMSG_MAX; i++) {
                if (i >= ret)
                    break;
                u64 hdr = base + (u64)i * OFF_MMSG_SIZE;
                u32 len = 0;
                bpf_probe_read_user(&len, sizeof(len), (const void *)(hdr + OFF_MMSG_LEN));
                udp_recv_one(sk, msg_name(hdr + OFF_MMSG_HDR), len);
            }
            if (ret > UDP_MMSG_MAX && netns_wanted(sk_netns((const void *)sk))) {
                int idx = STAT_UDP_MMSG_OVER;
                u64 *p = stats.lookup(&idx);
                if (p)
                    *p += ret - UDP_MMSG_MAX;
            }
        }
    }
    udp_calls.delete(&id);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { udp_enter(CALL_SENDTO, (u64)args->addr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { udp_enter(CALL_SENDMSG, (u64)args->msg); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) { udp_enter(CALL_SENDMMSG, (u64)args->mmsg); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { udp_enter(CALL_RECVFROM, (u64)args->addr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { udp_enter(CALL_RECVMSG, (u64)args->msg); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg) { udp_enter(CALL_RECVMMSG, (u64)args->mmsg); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { udp_exit(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { udp_exit(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmmsg) { udp_exit(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { udp_recv_exit(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { udp_recv_exit(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { udp_recv_exit(args->ret); return 0; }
