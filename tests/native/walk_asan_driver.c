/* Runs pl_walk and pl_xattr_marks (csrc/walk.c) under AddressSanitizer/UBSan: walks the
 * directory given as argv[1] a few times and over error paths, probes its xattrs (and
 * every truncation of the records), prints the record bytes' length, a checksum and the
 * number of entries marked as having xattrs, so the test can compare with the Python
 * binding; then compares the records with themselves, with a copy whose every 7th
 * ctime differs, with every truncation near the end, and keeps every other record
 * (pl_walk_compare, pl_walk_keep), each output array exactly sized, and prints the
 * mutated comparison's event count. Exit 0 on success. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "walk.h"

/* The walk-cache functions over the records `out` of n entries; the event count of the
 * comparison with every 7th ctime changed, or a negative step number. */
static long long caches(const uint8_t *out, size_t len, size_t n)
{
    uint8_t *match = malloc(n), *flags = malloc(n), *copy = malloc(len), *kept = malloc(len);
    int64_t *events = malloc(4 * 2 * n * sizeof *events);
    uint64_t totals[5];
    long long rc = 0;
    if (!match || !flags || !copy || !kept || !events)
        return -1;
    /* the records against themselves: only hardlinked files (never matched) differ */
    int64_t self = pl_walk_compare(out, len, out, len, match, n, events, 2 * n, totals);
    if (self < 0 || totals[0] != n)
        { rc = -2; goto done; }
    for (int64_t e = 0; e < self; e++)
        if (events[4 * e] < 0 || match[events[4 * e]]) { rc = -3; goto done; }
    memcpy(copy, out, len);
    size_t pos = 0, changed = 0;
    for (size_t i = 0; i < n; i++) {
        size_t plen = (size_t)copy[pos] | ((size_t)copy[pos + 1] << 8);
        if (i % 7 == 3) {
            copy[pos + 2 + plen + 40] ^= 1; /* ctime's low byte */
            changed++;
        }
        flags[i] = (uint8_t)(i % 3);
        pos += 2 + plen + 72;
    }
    int64_t ev = pl_walk_compare(out, len, copy, len, match, n, events, 2 * n, totals);
    if (ev < (int64_t)changed) { rc = -4; goto done; }
    if (ev > 0 && pl_walk_compare(out, len, copy, len, match, n, events, (size_t)ev - 1,
                                  totals) != -ENOSPC)
        { rc = -5; goto done; }
    if (n > 1 && pl_walk_compare(out, len, copy, len, match, n - 1, events, 2 * n, totals)
            != -EINVAL)
        { rc = -6; goto done; }
    for (size_t cut = 1; cut < 200 && cut < len; cut++) {
        int64_t a = pl_walk_compare(out, len - cut, copy, len, match, n, events, 2 * n, totals);
        int64_t b = pl_walk_compare(out, len, copy, len - cut, match, n, events, 2 * n, totals);
        if ((a < 0 && a != -EINVAL) || (b < 0 && b != -EINVAL)) { rc = -7; goto done; }
    }
    int64_t w = pl_walk_keep(out, len, flags, n, kept, len);
    if (w < 0 || (size_t)w > len) { rc = -8; goto done; }
    if (pl_walk_keep(out, len, flags, n - 1, kept, len) != -EINVAL) { rc = -9; goto done; }
    if (w > 0 && pl_walk_keep(out, len, flags, n, kept, (size_t)w - 1) != -ENOSPC)
        { rc = -10; goto done; }
    rc = ev;
done:
    free(match);
    free(flags);
    free(copy);
    free(kept);
    free(events);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    uint8_t *out = NULL;
    size_t len = 0;
    int64_t newest = 0;
    if (pl_walk("/nonexistent/pylayers", &out, &len, &newest) != -ENOENT || out != NULL)
        return 3;
    unsigned long long sum = 0;
    long long marked = 0, events = 0;
    for (int round = 0; round < 3; round++) {
        int rc = pl_walk(argv[1], &out, &len, &newest);
        if (rc != 0)
            return 4;
        sum = 0;
        for (size_t i = 0; i < len; i++)
            sum = sum * 31 + out[i];
        /* the xattr probe over the same records: exactly sized, then every truncation */
        size_t cap = len / 74 + 1;
        uint8_t *marks = malloc(cap);
        if (!marks)
            return 5;
        int64_t n = pl_xattr_marks(argv[1], out, len, marks, cap);
        if (n <= 0)
            return 6;
        marked = 0;
        for (int64_t i = 0; i < n; i++)
            marked += marks[i];
        if (pl_xattr_marks(argv[1], out, len, marks, (size_t)n - 1) != -EINVAL)
            return 7;
        for (size_t cut = 1; cut < 200 && cut < len; cut++) {
            /* cut inside a record: refused; at a record's end: the records before it */
            int64_t r = pl_xattr_marks(argv[1], out, len - cut, marks, cap);
            if (r != -EINVAL && !(r >= 0 && r < n))
                return 8;
        }
        free(marks);
        events = caches(out, len, (size_t)n);
        pl_free(out);
        if (events < 0)
            return (int)(20 - events);
    }
    printf("%zu %llu %lld %lld\n", len, sum, marked, events);
    return 0;
}
