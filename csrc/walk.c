/* walk.c -- see walk.h for the contract. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>
#include "walk.h"

#define PATH_CAP 4096
#define RECORD_FIXED (2 + 4 * 4 + 8 * 7)

typedef struct {
    uint8_t *buf;
    size_t cap, len;
    int64_t max_ctime;
    char path[PATH_CAP + 1];
    size_t pathlen;
} walker;

static void put_u16(uint8_t *p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }
static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xff; }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (v >> (8 * i)) & 0xff; }

static int emit(walker *w, const struct stat *st)
{
    int64_t ctime = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
    if (ctime > w->max_ctime)
        w->max_ctime = ctime;
    size_t need = RECORD_FIXED + w->pathlen;
    if (w->len + need > w->cap) {
        size_t cap = w->cap ? 2 * w->cap : (1 << 20);
        while (cap < w->len + need)
            cap *= 2;
        uint8_t *bigger = realloc(w->buf, cap);
        if (!bigger)
            return -ENOMEM;
        w->buf = bigger;
        w->cap = cap;
    }
    {
        uint8_t *p = w->buf + w->len;
        put_u16(p, (uint16_t)w->pathlen);
        p += 2;
        memcpy(p, w->path, w->pathlen);
        p += w->pathlen;
        put_u32(p, st->st_mode); put_u32(p + 4, st->st_uid); put_u32(p + 8, st->st_gid);
        put_u32(p + 12, 0);
        p += 16;
        put_u64(p, st->st_nlink);
        put_u64(p + 8, (uint64_t)st->st_size);
        put_u64(p + 16, (uint64_t)((int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec));
        put_u64(p + 24, (uint64_t)((int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec));
        put_u64(p + 32, st->st_ino);
        put_u64(p + 40, st->st_dev);
        put_u64(p + 48, st->st_rdev);
    }
    w->len += need;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Walk the directory open at dirfd whose path (relative) is w->path. Takes dirfd. */
static int walk_dir(walker *w, int fd0)
{
    DIR *d = fdopendir(fd0);
    if (!d) {
        int e = errno;
        close(fd0);
        return -e;
    }
    size_t n = 0, cap = 16;
    char **names = malloc(cap * sizeof *names);
    int rc = names ? 0 : -ENOMEM;
    struct dirent *de;
    while (rc == 0 && (errno = 0, de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (n == cap) {
            char **bigger = realloc(names, 2 * cap * sizeof *names);
            if (!bigger) { rc = -ENOMEM; break; }
            names = bigger;
            cap *= 2;
        }
        if (!(names[n] = strdup(de->d_name))) { rc = -ENOMEM; break; }
        n++;
    }
    if (rc == 0 && errno != 0)
        rc = -errno;
    if (rc == 0)
        qsort(names, n, sizeof *names, cmp_names);
    size_t base = w->pathlen;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        size_t nl = strlen(names[i]);
        size_t sep = base ? 1 : 0;
        if (base + sep + nl > PATH_CAP) { rc = -ENAMETOOLONG; break; }
        if (sep) w->path[base] = '/';
        memcpy(w->path + base + sep, names[i], nl);
        w->pathlen = base + sep + nl;
        w->path[w->pathlen] = 0;
        struct stat st;
        if (fstatat(dirfd(d), names[i], &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT) /* vanished meanwhile: the fingerprint will differ */
                continue;
            rc = -errno;
            break;
        }
        if ((rc = emit(w, &st)) != 0)
            break;
        if (S_ISDIR(st.st_mode)) {
            int fd = openat(dirfd(d), names[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd < 0) { rc = -errno; break; }
            rc = walk_dir(w, fd);
        }
    }
    w->pathlen = base;
    w->path[base] = 0;
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    closedir(d);
    return rc;
}

int pl_walk(const char *root, uint8_t **out, size_t *len, int64_t *max_ctime)
{
    walker w = { .buf = NULL, .cap = 0, .len = 0, .max_ctime = INT64_MIN, .pathlen = 0 };
    w.path[0] = 0;
    *out = NULL;
    *len = 0;
    int fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    int rc = fstat(fd, &st) != 0 ? -errno : emit(&w, &st);
    if (rc != 0)
        close(fd);
    else
        rc = walk_dir(&w, fd);
    if (rc < 0) {
        free(w.buf);
        return rc;
    }
    *out = w.buf;
    *len = w.len;
    *max_ctime = w.max_ctime;
    return 0;
}

int64_t pl_xattr_marks(const char *root, const uint8_t *buf, size_t len, uint8_t *marks,
                       size_t cap)
{
    size_t rootlen = strlen(root);
    if (rootlen > PATH_CAP)
        return -ENAMETOOLONG;
    char *path = malloc(PATH_CAP + 2);
    if (!path)
        return -ENOMEM;
    memcpy(path, root, rootlen);
    size_t pos = 0, n = 0;
    int64_t rc = 0;
    while (pos < len) {
        if (len - pos < 2) { rc = -EINVAL; break; }
        size_t plen = (size_t)buf[pos] | ((size_t)buf[pos + 1] << 8);
        if (len - pos - 2 < plen + RECORD_FIXED - 2 || n >= cap) { rc = -EINVAL; break; }
        size_t full = rootlen;
        if (plen) {
            if (rootlen + 1 + plen > PATH_CAP + 1) { rc = -ENAMETOOLONG; break; }
            path[full++] = '/';
            memcpy(path + full, buf + pos + 2, plen);
            full += plen;
        }
        path[full] = 0;
        ssize_t got = llistxattr(path, NULL, 0);
        if (got > 0)
            marks[n] = 1;
        else if (got == 0 || errno == ENOTSUP || errno == ENODATA || errno == EPERM)
            marks[n] = 0;
        else
            marks[n] = 1; /* vanished, or an error: the caller looks, and reports it */
        n++;
        pos += plen + RECORD_FIXED;
    }
    free(path);
    return rc < 0 ? rc : (int64_t)n;
}

void pl_free(void *p)
{
    free(p);
}
