/* fastcdc.h -- content-defined chunking (FastCDC: gear hash, normalized chunking,
 * cut-point skipping). The inner loop only; sizes, buffering and policy live in
 * pylayers/chunking.py.
 *
 * Contract
 *   plc_params_init() validates sizes and derives the two masks:
 *     64 <= min_size <= avg_size <= max_size <= 2^31.
 *     Returns 0, or -EINVAL.
 *   plc_scan() continues one chunking stream over the next buffer. The state
 *   (bytes since the current chunk began, gear hash) carries across calls, so
 *   cut points do not depend on how the stream is split into buffers.
 *     For each cut it writes the chunk's end offset, relative to buf, to cuts[],
 *     up to max_cuts of them, and stores in *consumed how many bytes of buf it
 *     scanned (n, unless cuts[] filled up first: then just past the last cut).
 *     Returns the number of cuts written. The stream's final chunk (the bytes
 *     after the last cut, if any) is the caller's to emit at end of input.
 *   A cut is placed after byte i (chunk end = i + 1) when, with p the number of
 *   bytes since the chunk began before byte i:
 *     p >= min_size, and the gear hash h, reset to 0 at p == min_size and
 *     updated h = (h << 1) + gear[byte], has h & mask == 0, where mask is
 *     mask_s while p < avg_size and mask_l after; or when p + 1 == max_size.
 *   No allocation, no I/O, no global state; safe to call without the GIL.
 */
#ifndef PYLAYERS_FASTCDC_H
#define PYLAYERS_FASTCDC_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t min_size, avg_size, max_size;
    uint64_t mask_s, mask_l;
} plc_params;

typedef struct {
    uint64_t pos;  /* bytes of the current chunk seen so far */
    uint64_t hash; /* gear hash; meaningful once pos >= min_size */
} plc_state;

int plc_params_init(plc_params *p, uint64_t min_size, uint64_t avg_size, uint64_t max_size);
size_t plc_scan(const plc_params *p, plc_state *s, const uint8_t *buf, size_t n,
                uint64_t *cuts, size_t max_cuts, size_t *consumed);
/* The gear table, for tests that check it against the reference implementation. */
uint64_t plc_gear(unsigned int byte);

#endif
