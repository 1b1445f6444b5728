/* writefile.c -- see writefile.h for the contract. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "writefile.h"

static int all_zero(const uint8_t *p, size_t n)
{
    /* a zero first byte, then the buffer equals itself shifted by one */
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Write data, skipping all-zero blocks (block-aligned in the file); *hole set if any. */
static int write_sparse(int fd, const uint8_t *data, size_t len, size_t block, int *hole)
{
    size_t run = 0; /* start of the pending data to write */
    for (size_t i = 0; i < len; i += block) {
        size_t end = i + block < len ? i + block : len;
        if (!all_zero(data + i, end - i))
            continue;
        int rc = write_all(fd, data + run, i - run);
        if (rc)
            return rc;
        if (lseek(fd, (off_t)(end - i), SEEK_CUR) < 0)
            return -errno;
        *hole = 1;
        run = end;
    }
    return write_all(fd, data + run, len - run);
}

int pl_write_file(int dir_fd, const char *name, uint32_t mode, uint32_t uid, uint32_t gid,
                  int64_t mtime_ns, const uint8_t *data, size_t len, int *step)
{
    *step = 1;
    int fd = openat(dir_fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    (mode_t)(mode & 0777));
    if (fd < 0)
        return -errno;
    int rc = 0;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = -errno;
        goto out;
    }
    *step = 2;
    size_t block = st.st_blksize >= 512 ? (size_t)st.st_blksize : 512;
    int hole = 0;
    if ((rc = write_sparse(fd, data, len, block, &hole)) != 0)
        goto out;
    if (hole && ftruncate(fd, (off_t)len) != 0) {
        rc = -errno;
        goto out;
    }
    *step = 3;
    if ((st.st_uid != uid || st.st_gid != gid) && fchown(fd, uid, gid) != 0) {
        rc = -errno;
        goto out;
    }
    *step = 4;
    if ((st.st_mode & 07777) != (mode & 07777) && fchmod(fd, (mode_t)(mode & 07777)) != 0) {
        rc = -errno;
        goto out;
    }
    *step = 5;
    {
        struct timespec ts[2];
        int64_t sec = mtime_ns / 1000000000, nsec = mtime_ns % 1000000000;
        if (nsec < 0) {
            nsec += 1000000000;
            sec -= 1;
        }
        ts[0].tv_sec = ts[1].tv_sec = (time_t)sec;
        ts[0].tv_nsec = ts[1].tv_nsec = (long)nsec;
        if (futimens(fd, ts) != 0) {
            rc = -errno;
            goto out;
        }
    }
out:
    if (close(fd) != 0 && rc == 0) {
        *step = 6;
        rc = -errno;
    }
    return rc;
}
