/* ewvxlan_recv.c: drain a non-blocking AF_PACKET socket into one block buffer (live capture).
 *
 * The C side of collector/vxlan/capture.py's UnderlayCapture.drain: the same loop as its Python
 * fallback (one recv per packet into the next free bytes of the block, the packet's length and
 * its receive time in µs since the epoch beside it), without an interpreter round per packet.
 * Stops when the socket is empty (returns 0), when the block is full (max packets, or less
 * than `snap` bytes left: returns 1), or on an error other than EAGAIN/EINTR (returns -errno).
 * `*pos` and `*n` carry the block's fill from one call to the next. With a receive ring
 * (ew_ring_*, below) the same block is filled without a system call per packet.
 */
#include <errno.h>
#include <linux/if_packet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "ewvxlan.h"

/* With `hdr`, each frame is preceded by a pcap record header (16 bytes, host order, µs): the
 * block is then a capture the record walker reads from memory (ewvxlan_walk.c, start 0). */
static void pcap_header(uint8_t *at, int64_t ts_us, uint32_t cap, uint32_t wire)
{
    uint32_t h[4] = {(uint32_t)(ts_us / 1000000), (uint32_t)(ts_us % 1000000), cap, wire};
    memcpy(at, h, sizeof h);
}

int ew_recv_drain(int fd, uint8_t *buf, int64_t size, int64_t *pos, int64_t *off, int64_t *cap,
                  int64_t *ts, int64_t *n, int64_t max, int64_t snap, int hdr)
{
    int64_t p = *pos, i = *n, h = hdr ? 16 : 0;
    int rc = 1;
    while (i < max && size - p >= snap + h) {
        ssize_t got = recv(fd, buf + p + h, (size_t)snap, MSG_DONTWAIT);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            rc = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
            break;
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        ts[i] = (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000;
        if (hdr)
            pcap_header(buf + p, ts[i], (uint32_t)got, (uint32_t)got);
        off[i] = p + h;
        cap[i] = got;
        p += h + got;
        i++;
    }
    *pos = p;
    *n = i;
    return rc;
}

/* The same block filled from a TPACKET_V3 receive ring (packet(7) PACKET_RX_RING, as libpcap
 * does): the kernel writes packets into shared memory blocks and hands over a block at a time,
 * full or after `timeout_ms`; reading a packet is one memcpy, no system call. The packet's
 * time is the kernel's receive time. `ew_ring_new` must run before the socket is bound (no
 * packet reaches it before the ring exists); NULL with *err = errno when the kernel refuses. */
struct ew_ring {
    uint8_t *map;
    size_t len;
    uint32_t block_size, nblocks, blk; /* blk: the block being read */
    uint32_t left, next;                /* packets left in it, offset of the next one */
    int started;                        /* blk's header has been read */
};

struct ew_ring *ew_ring_new(int fd, uint32_t block_size, uint32_t nblocks, uint32_t timeout_ms,
                            int *err)
{
    int version = TPACKET_V3;
    struct tpacket_req3 req;
    struct ew_ring *r = calloc(1, sizeof *r);
    *err = 0;
    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    memset(&req, 0, sizeof req);
    req.tp_block_size = block_size;
    req.tp_block_nr = nblocks;
    req.tp_frame_size = 2048; /* unused by V3 beyond this check: block_size % frame_size == 0 */
    req.tp_frame_nr = block_size / 2048 * nblocks;
    req.tp_retire_blk_tov = timeout_ms;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &version, sizeof version) != 0 ||
        setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) != 0) {
        *err = errno;
        free(r);
        return NULL;
    }
    r->len = (size_t)block_size * nblocks;
    r->map = mmap(NULL, r->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (r->map == MAP_FAILED) {
        *err = errno;
        free(r);
        return NULL;
    }
    r->block_size = block_size;
    r->nblocks = nblocks;
    return r;
}

void ew_ring_free(struct ew_ring *r)
{
    if (r) {
        munmap(r->map, r->len);
        free(r);
    }
}

/* As ew_recv_drain: 0 when no block is ready, 1 when the block buffer is full. */
int ew_ring_drain(struct ew_ring *r, uint8_t *buf, int64_t size, int64_t *pos, int64_t *off,
                  int64_t *cap, int64_t *ts, int64_t *n, int64_t max, int hdr)
{
    int64_t p = *pos, i = *n, hl = hdr ? 16 : 0;
    int rc = 0;
    for (;;) {
        struct tpacket_block_desc *bd = (void *)(r->map + (size_t)r->blk * r->block_size);
        if (!(__atomic_load_n(&bd->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
            break;
        if (!r->started) {
            r->left = bd->hdr.bh1.num_pkts;
            r->next = bd->hdr.bh1.offset_to_first_pkt;
            r->started = 1;
        }
        while (r->left > 0) {
            struct tpacket3_hdr *h = (void *)((uint8_t *)bd + r->next);
            uint32_t len = h->tp_snaplen;
            if (i >= max || size - p < hl + (int64_t)len) {
                rc = 1;
                goto out;
            }
            ts[i] = (int64_t)h->tp_sec * 1000000 + h->tp_nsec / 1000;
            if (hdr)
                pcap_header(buf + p, ts[i], len, h->tp_len);
            memcpy(buf + p + hl, (uint8_t *)h + h->tp_mac, len);
            off[i] = p + hl;
            cap[i] = len;
            p += hl + len;
            i++;
            r->left--;
            r->next += h->tp_next_offset;
        }
        __atomic_store_n(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        r->started = 0;
        r->blk = (r->blk + 1) % r->nblocks;
    }
out:
    *pos = p;
    *n = i;
    return rc;
}
