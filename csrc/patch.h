/* patch.h -- the copy/insert delta of a patch frame (docs/format.md, "Patch frames"):
 * a file that is its base with a few bytes changed (a .pyc whose header moved, a library
 * relinked) rebuilt by copying runs of the base, without loading the base into zstd's
 * match finder (the cost of a zstd delta) to write it or into a dictionary to read it.
 *
 * Op stream
 *   A sequence of ops, each:
 *     varint (lit_len << 1 | in_place), then lit_len bytes: literals, or (in_place) the
 *       new bytes less the base's from `from` on, byte by byte mod 256 (bytes changed in
 *       place: the copy after them resumes there, so `from` moves past them too),
 *     varint copy_len, then (only when copy_len > 0) varint zigzag(shift):
 *       copy_len bytes of the base from `from` + shift, where `from` is the end of the
 *       previous copy (0 at first) or of the last in-place bytes, whichever came last.
 *   Varints are unsigned LEB128, at most 10 bytes; zigzag maps a signed shift s to
 *   (s << 1) ^ (s >> 63). The ops rebuild exactly out_len bytes and end there.
 *
 * Contract
 *   pl_patch_make(raw, raw_len, base, base_len, ops, ops_cap, max_literals, scratch,
 *   scratch_slots) writes into `ops` an op stream that rebuilds `raw` from `base`:
 *   copies of at least PL_PATCH_MIN
 *   bytes found through a table of the base's 8-byte windows at every PL_PATCH_STEP
 *   bytes, extended both ways, the alignment of the last copy tried first; the bytes
 *   between two copies are in place when the second resumes where the first would have
 *   gone on. Returns the stream's length; -1 when it is not worth it (more than
 *   max_literals literal bytes, not counting those in place,
 *   or more than ops_cap bytes of ops: the scan stops there), -ENOMEM, -EINVAL (a base
 *   of 4 GiB - 64 bytes or more). Deterministic. The table is `scratch` when it holds
 *   at least pl_patch_table_slots(base_len) slots (the caller's, reused from call to
 *   call: it is cleared here), else allocated and freed by the call; scratch may be NULL.
 *   pl_patch_apply(ops, ops_len, base, base_len, out, out_len) rebuilds out_len bytes
 *   into `out`. Returns 0, or -1 if the ops are malformed: a truncated or overlong
 *   varint, a copy outside the base, more or fewer bytes than out_len. It reads and
 *   writes nothing outside the buffers it is given, whatever the ops hold.
 */
#ifndef PYLAYERS_PATCH_H
#define PYLAYERS_PATCH_H

#include <stddef.h>
#include <stdint.h>

#define PL_PATCH_STEP 8
#define PL_PATCH_MIN 16

int64_t pl_patch_make(const uint8_t *raw, size_t raw_len, const uint8_t *base,
                      size_t base_len, uint8_t *ops, size_t ops_cap, size_t max_literals,
                      uint32_t *scratch, size_t scratch_slots);
size_t pl_patch_table_slots(size_t base_len);
int pl_patch_apply(const uint8_t *ops, size_t ops_len, const uint8_t *base, size_t base_len,
                   uint8_t *out, size_t out_len);

#endif
