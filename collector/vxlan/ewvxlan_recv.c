/* ewvxlan_recv.c: drain a non-blocking AF_PACKET socket into one block buffer (live capture).
 *
 * The C side of collector/vxlan/capture.py's UnderlayCapture.drain: the same loop as its Python
 * fallback (one recv per packet into the next free bytes of the block, the packet's length and
 * its receive time in µs since the epoch beside it), without an interpreter round per packet.
 * Stops when the socket is empty (returns 0), when the block is full (max packets, or less
 * than `snap` bytes left: returns 1), or on an error other than EAGAIN/EINTR (returns -errno).
 * `*pos` and `*n` carry the block's fill from one call to the next.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "ewvxlan.h"

int ew_recv_drain(int fd, uint8_t *buf, int64_t size, int64_t *pos, int64_t *off, int64_t *cap,
                  int64_t *ts, int64_t *n, int64_t max, int64_t snap)
{
    int64_t p = *pos, i = *n;
    int rc = 1;
    while (i < max && size - p >= snap) {
        ssize_t got = recv(fd, buf + p, (size_t)snap, MSG_DONTWAIT);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            rc = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
            break;
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        off[i] = p;
        cap[i] = got;
        ts[i] = (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000;
        p += got;
        i++;
    }
    *pos = p;
    *n = i;
    return rc;
}
