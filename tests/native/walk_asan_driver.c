/* Runs pl_walk (csrc/walk.c) under AddressSanitizer/UBSan: walks the directory given
 * as argv[1] a few times and over error paths, prints the record bytes' length and a
 * checksum so the test can compare with the Python binding. Exit 0 on success. */
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
    for (int round = 0; round < 3; round++) {
        int rc = pl_walk(argv[1], &out, &len, &newest);
        if (rc != 0)
            return 4;
        sum = 0;
        for (size_t i = 0; i < len; i++)
            sum = sum * 31 + out[i];
        pl_free(out);
    }
    printf("%zu %llu\n", len, sum);
    return 0;
}
