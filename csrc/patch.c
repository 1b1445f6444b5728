/* patch.c -- see patch.h for the op stream and the contract. */
#include "patch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Bytes of a gap scanned with the last copy's alignment alone before the base is
 * indexed (or before the scan would give up): a file changed in place (a .pyc's
 * header) needs no table at all, and a match found later takes back the bytes skipped
 * by extending backwards. */
#define PL_PATCH_LAZY 64
#define PREFETCH 16 /* how far ahead table slots are fetched, in windows or bytes */

static inline uint64_t mix64(uint64_t v) { return v * 0x9E3779B97F4A7C15ULL; }

/* A table slot holds a window's offset / PL_PATCH_STEP + 1 above 3 more bits of its
 * hash (0: empty): a lookup whose bits differ is no candidate, without the cache miss
 * of reading the base to see (half of all lookups had a candidate to check). */
static inline size_t slot_of(uint64_t h, unsigned bits) { return (size_t)(h >> (64 - bits)); }
static inline uint32_t check_of(uint64_t h) { return (uint32_t)(h >> 20) & 7; }

/* how many bytes a[0..n) and b[0..n) have in common from the start */
static size_t common(const uint8_t *a, const uint8_t *b, size_t n)
{
    size_t i = 0;
    while (i + 8 <= n) {
        uint64_t x = load64(a + i) ^ load64(b + i);
        if (x)
            return i + (size_t)(__builtin_ctzll(x) >> 3); /* little-endian */
        i += 8;
    }
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

typedef struct {
    uint8_t *p, *end;
} sink;

static int put_varint(sink *s, uint64_t v)
{
    do {
        if (s->p == s->end)
            return -1;
        uint8_t byte = v & 0x7f;
        v >>= 7;
        *s->p++ = byte | (v ? 0x80 : 0);
    } while (v);
    return 0;
}

/* one op: lit_len bytes of `lit`, as they are, or (`under` not NULL) less the base bytes
 * `under` they replace in place; then a copy */
static int put_op(sink *s, const uint8_t *lit, size_t lit_len, const uint8_t *under,
                  size_t copy_len, int64_t shift)
{
    if (put_varint(s, (uint64_t)lit_len << 1 | (under != NULL)))
        return -1;
    if ((size_t)(s->end - s->p) < lit_len)
        return -1;
    if (under) {
        for (size_t i = 0; i < lit_len; i++)
            s->p[i] = (uint8_t)(lit[i] - under[i]);
    } else {
        memcpy(s->p, lit, lit_len);
    }
    s->p += lit_len;
    if (put_varint(s, copy_len))
        return -1;
    if (copy_len && put_varint(s, ((uint64_t)shift << 1) ^ (uint64_t)(shift >> 63)))
        return -1;
    return 0;
}

/* log2 of the table's slots for a base of base_len bytes: two slots a window at least */
static unsigned table_bits(size_t base_len)
{
    size_t windows = (base_len - 8) / PL_PATCH_STEP + 1;
    unsigned bits = 8;
    while (((size_t)1 << bits) < 2 * windows)
        bits++;
    return bits;
}

size_t pl_patch_table_slots(size_t base_len)
{
    return base_len < 8 ? 0 : (size_t)1 << table_bits(base_len);
}

int64_t pl_patch_make(const uint8_t *raw, size_t raw_len, const uint8_t *base,
                      size_t base_len, uint8_t *ops, size_t ops_cap, size_t max_literals,
                      uint32_t *scratch, size_t scratch_slots)
{
    if (base_len >= (uint64_t)UINT32_MAX - 64) /* a slot's offset / 8 + 1 in 29 bits */
        return -EINVAL;
    sink s = {ops, ops + ops_cap};
    uint32_t *table = NULL; /* the base's windows by hash: see slot_of, check_of */
    unsigned bits = 0;
    size_t p = 0, lit_start = 0, literals = 0;
    size_t prev_end = 0;      /* where the last copy ended in the base */
    int64_t align = 0;        /* base offset - raw offset of the last copy */
    int64_t rc = -1;

    while (p + PL_PATCH_MIN <= raw_len) {
        size_t q = SIZE_MAX;
        int64_t c = (int64_t)p + align;
        if (c >= 0 && (size_t)c + 8 <= base_len && load64(raw + p) == load64(base + c)) {
            q = (size_t)c;
        } else if (base_len >= 8 &&
                   (table || p - lit_start >= PL_PATCH_LAZY ||
                    literals + (p - lit_start) >= max_literals)) {
            if (!table) { /* a gap the last copy's alignment did not close: index the base */
                bits = table_bits(base_len);
                if (scratch && scratch_slots >= (size_t)1 << bits) {
                    /* the caller's: zeroed by writing, so its pages are not first
                     * mapped to the zero page by a read and copied on the write (a TLB
                     * flush on every core the process runs on), nor new ones a call */
                    table = scratch;
                    memset(table, 0, sizeof *table << bits);
                } else {
                    table = calloc((size_t)1 << bits, sizeof *table);
                    if (!table)
                        return -ENOMEM;
                }
                for (size_t b = 0; b + 8 <= base_len; b += PL_PATCH_STEP) {
                    if (b + PREFETCH * PL_PATCH_STEP + 8 <= base_len)
                        __builtin_prefetch(&table[slot_of(
                            mix64(load64(base + b + PREFETCH * PL_PATCH_STEP)), bits)], 1);
                    uint64_t h = mix64(load64(base + b));
                    uint32_t *slot = &table[slot_of(h, bits)];
                    if (!*slot) /* the first window of a hash: deterministic */
                        *slot = (uint32_t)(b / PL_PATCH_STEP + 1) << 3 | check_of(h);
                }
            }
            /* the slots of the windows a few bytes on: a scan through changed bytes
             * looks one up at each byte, and each is a cache miss */
            if (p + PREFETCH + 8 <= raw_len)
                __builtin_prefetch(&table[slot_of(mix64(load64(raw + p + PREFETCH)), bits)]);
            uint64_t h = mix64(load64(raw + p));
            uint32_t hit = table[slot_of(h, bits)];
            if (hit && (hit & 7) == check_of(h)) {
                size_t at = (size_t)((hit >> 3) - 1) * PL_PATCH_STEP;
                if (load64(raw + p) == load64(base + at))
                    q = at;
            }
        }
        if (q != SIZE_MAX) {
            size_t back = 0;
            while (p - back > lit_start && q - back > 0 && raw[p - back - 1] == base[q - back - 1])
                back++;
            size_t fwd = 8 + common(raw + p + 8, base + q + 8,
                                    raw_len - p - 8 < base_len - q - 8 ? raw_len - p - 8
                                                                       : base_len - q - 8);
            size_t len = back + fwd;
            if (len >= PL_PATCH_MIN) {
                size_t start = p - back, from = q - back, gap = start - lit_start;
                /* bytes changed in place (the copy resumes where the last one would
                 * have gone on): their difference from the base, which compresses
                 * (a relinked library's moved addresses differ alike) */
                const uint8_t *under = gap && from >= prev_end && from - prev_end == gap
                                           ? base + prev_end : NULL;
                if (!under) {
                    literals += gap;
                    if (literals > max_literals)
                        goto out;
                }
                size_t resume = under ? from : prev_end;
                int64_t shift = (int64_t)from - (int64_t)resume;
                if (put_op(&s, raw + lit_start, gap, under, len, shift))
                    goto out;
                prev_end = from + len;
                align = (int64_t)from - (int64_t)start;
                p = lit_start = start + len;
                continue;
            }
        }
        p++;
        if (literals + (p - lit_start) > max_literals)
            goto out;
    }
    literals += raw_len - lit_start;
    if (literals > max_literals ||
        put_op(&s, raw + lit_start, raw_len - lit_start, NULL, 0, 0))
        goto out;
    rc = (int64_t)(s.p - ops);
out:
    if (table != scratch)
        free(table);
    return rc;
}

static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t out = 0;
    for (unsigned shift = 0; shift < 70; shift += 7) {
        if (*p == end)
            return -1;
        uint8_t byte = *(*p)++;
        if (shift == 63 && byte > 1)
            return -1; /* more than 64 bits */
        out |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *v = out;
            return 0;
        }
    }
    return -1;
}

int pl_patch_apply(const uint8_t *ops, size_t ops_len, const uint8_t *base, size_t base_len,
                   uint8_t *out, size_t out_len)
{
    const uint8_t *p = ops, *end = ops + ops_len;
    size_t o = 0, prev_end = 0;
    while (p < end) {
        uint64_t tag, copy, zz;
        if (get_varint(&p, end, &tag))
            return -1;
        uint64_t lit = tag >> 1;
        if (lit > out_len - o || lit > (uint64_t)(end - p))
            return -1;
        if (tag & 1) { /* in place: added to the base's bytes from prev_end on */
            if (lit > base_len - prev_end)
                return -1;
            for (size_t i = 0; i < lit; i++)
                out[o + i] = (uint8_t)(p[i] + base[prev_end + i]);
            prev_end += lit;
        } else {
            memcpy(out + o, p, lit);
        }
        o += lit;
        p += lit;
        if (get_varint(&p, end, &copy) || copy > out_len - o)
            return -1;
        if (!copy)
            continue;
        if (get_varint(&p, end, &zz))
            return -1;
        int64_t shift = (int64_t)(zz >> 1) ^ -(int64_t)(zz & 1);
        /* from = prev_end + shift, then within [0, base_len - copy]; prev_end <= base_len */
        size_t from;
        if (shift < 0) {
            uint64_t mag = (uint64_t)(-(shift + 1)) + 1; /* INT64_MIN too */
            if (mag > prev_end)
                return -1;
            from = prev_end - (size_t)mag;
        } else {
            if ((uint64_t)shift > base_len - prev_end)
                return -1;
            from = prev_end + (size_t)shift;
        }
        if (copy > base_len || from > base_len - copy)
            return -1;
        memcpy(out + o, base + from, copy);
        o += copy;
        prev_end = from + copy;
    }
    return o == out_len ? 0 : -1;
}
