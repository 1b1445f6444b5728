/* Runs pl_walk and pl_xattr_marks (csrc/walk.c) under AddressSanitizer/UBSan: walks the
 * directory given as argv[1] a few times and over error paths, probes its xattrs (and
 * every truncation of the records), prints the record bytes' length, a checksum and the
 * number of entries marked as having xattrs, so the test can compare with the Python
 * binding. Exit 0 on success. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include "walk.h"

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
    long long marked = 0;
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
        pl_free(out);
    }
    printf("%zu %llu %lld\n", len, sum, marked);
    return 0;
}
