/* Runs pl_write_file (csrc/writefile.c) under AddressSanitizer/UBSan: writes files of
 * every shape into the directory argv[1] (dense, empty, one byte, all zeros, a hole in
 * the middle, a zero tail, an unaligned tail, a negative mtime) and checks the error
 * path (an existing name: -EEXIST at step 1). Prints "ok"; the test then compares the
 * files with what it expects. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "writefile.h"

static int put(int dir, const char *name, const uint8_t *data, size_t len, int64_t mtime)
{
    int step = 0;
    int rc = pl_write_file(dir, name, 0640, getuid(), getgid(), mtime, data, len, &step);
    if (rc != 0)
        fprintf(stderr, "%s: rc %d step %d\n", name, rc, step);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    int dir = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (dir < 0)
        return 3;
    size_t big = 5 * 65536 + 123;
    uint8_t *buf = malloc(big);
    if (!buf)
        return 4;
    for (size_t i = 0; i < big; i++)
        buf[i] = (uint8_t)(i * 7 + 1);
    if (put(dir, "dense", buf, big, 1600000000123456789LL)) return 5;
    if (put(dir, "empty", buf, 0, 0)) return 6;
    if (put(dir, "one", buf, 1, -1000000000123LL)) return 7;
    memset(buf + 65536, 0, 3 * 65536); /* a hole in the middle */
    if (put(dir, "holey", buf, big, 7)) return 8;
    memset(buf, 0, big);
    if (put(dir, "zeros", buf, big, 7)) return 9;
    for (size_t i = 0; i < 4096; i++)
        buf[i] = 0xAB;
    if (put(dir, "zero-tail", buf, big, 7)) return 10;
    int step = 0;
    if (pl_write_file(dir, "dense", 0600, getuid(), getgid(), 0, buf, 10, &step) != -EEXIST
        || step != 1)
        return 11;
    free(buf);
    close(dir);
    printf("ok\n");
    return 0;
}
