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

/* -- walk caches: a new walk against the records kept from the last one ------------ */

#define OFF_MODE 0
#define OFF_RESERVED 12
#define OFF_NLINK 16
#define OFF_SIZE 24
#define FIXED (RECORD_FIXED - 2)

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The offsets of a buffer's records, and the count; -EINVAL when malformed. */
static int64_t index_records(const uint8_t *buf, size_t len, size_t **offs)
{
    size_t n = 0, cap = 1024, pos = 0;
    size_t *o = malloc(cap * sizeof *o);
    if (!o)
        return -ENOMEM;
    while (pos < len) {
        if (len - pos < 2) { free(o); return -EINVAL; }
        size_t plen = (size_t)buf[pos] | ((size_t)buf[pos + 1] << 8);
        if (len - pos - 2 < plen + FIXED) { free(o); return -EINVAL; }
        if (n == cap) {
            size_t *bigger = realloc(o, 2 * cap * sizeof *o);
            if (!bigger) { free(o); return -ENOMEM; }
            o = bigger;
            cap *= 2;
        }
        o[n++] = pos;
        pos += 2 + plen + FIXED;
    }
    *offs = o;
    return (int64_t)n;
}

/* Component order: bytewise, '/' before every other byte. */
static int cmp_paths(const uint8_t *a, size_t la, const uint8_t *b, size_t lb)
{
    size_t n = la < lb ? la : lb;
    for (size_t i = 0; i < n; i++) {
        unsigned ca = a[i] == '/' ? 0 : a[i], cb = b[i] == '/' ? 0 : b[i];
        if (ca != cb)
            return ca < cb ? -1 : 1;
    }
    return la < lb ? -1 : la > lb;
}

/* Whether `p` (length lp) lies under the directory path `d` (length ld). */
static int under(const uint8_t *p, size_t lp, const uint8_t *d, size_t ld)
{
    if (ld == 0)
        return lp > 0;
    return lp > ld && p[ld] == '/' && memcmp(p, d, ld) == 0;
}

#define PLEN(buf, off) ((size_t)(buf)[off] | ((size_t)(buf)[(off) + 1] << 8))
#define OFF_INO 48
#define OFF_DEV 56

/* Every field equal but `reserved`, and the old record trusted. */
static int same_record(const uint8_t *nf, const uint8_t *of)
{
    return get_u32(of + OFF_RESERVED) == 0
           && memcmp(nf, of, OFF_RESERVED) == 0
           && memcmp(nf + OFF_NLINK, of + OFF_NLINK, FIXED - OFF_NLINK) == 0;
}

typedef struct { uint64_t dev, ino; size_t i; } inode_ref;

static int cmp_inode_refs(const void *a, const void *b)
{
    const inode_ref *x = a, *y = b;
    if (x->dev != y->dev)
        return x->dev < y->dev ? -1 : 1;
    if (x->ino != y->ino)
        return x->ino < y->ino ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

static int multi_link(const uint8_t *buf, size_t off)
{
    const uint8_t *f = buf + off + 2 + PLEN(buf, off);
    return S_ISREG(get_u32(f + OFF_MODE)) && get_u64(f + OFF_NLINK) > 1;
}

/* The regular records of more than one link in `buf` (offsets `offs`), as inode refs
 * sorted by (dev, ino); their count, or -ENOMEM. Counted first, so a tree of a million
 * files with a few links takes a few refs, not a million. */
static int64_t multi_link_files(const uint8_t *buf, const size_t *offs, size_t n,
                                inode_ref **out)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += (size_t)multi_link(buf, offs[i]);
    inode_ref *refs = malloc((k ? k : 1) * sizeof *refs);
    if (!refs)
        return -ENOMEM;
    k = 0;
    for (size_t i = 0; i < n; i++) {
        if (multi_link(buf, offs[i])) {
            const uint8_t *f = buf + offs[i] + 2 + PLEN(buf, offs[i]);
            refs[k].dev = get_u64(f + OFF_DEV);
            refs[k].ino = get_u64(f + OFF_INO);
            refs[k].i = i;
            k++;
        }
    }
    qsort(refs, k, sizeof *refs, cmp_inode_refs);
    *out = refs;
    return (int64_t)k;
}

/* Which new records of more than one link may match (links[i] = 1): a file's links
 * in the tree are a group (the manifest holds the first as the file, the others as
 * hardlinks to it), so one matches only when the whole group is unchanged: every new
 * record of its inode has an equal trusted old record of the same path (`cand`), and
 * the old walk held as many records of that inode (none renamed away, none added). */
static int group_links(const uint8_t *old, const size_t *oo, size_t on,
                       const uint8_t *new_, const size_t *no, size_t nn,
                       const uint8_t *cand, uint8_t *links)
{
    inode_ref *nr = NULL, *orf = NULL;
    int64_t nk = multi_link_files(new_, no, nn, &nr);
    if (nk < 0)
        return (int)nk;
    if (nk == 0) {  /* no file of several links: nothing to group */
        free(nr);
        return 0;
    }
    int64_t ok = multi_link_files(old, oo, on, &orf);
    if (ok < 0) {
        free(nr);
        return (int)ok;
    }
    size_t a = 0, b = 0;
    while (a < (size_t)nk) {
        size_t end = a + 1;
        while (end < (size_t)nk && nr[end].dev == nr[a].dev && nr[end].ino == nr[a].ino)
            end++;
        int all = 1;
        for (size_t x = a; x < end; x++)
            all &= cand[nr[x].i];
        while (b < (size_t)ok && (orf[b].dev < nr[a].dev
                                  || (orf[b].dev == nr[a].dev && orf[b].ino < nr[a].ino)))
            b++;
        size_t olds = 0;
        while (b + olds < (size_t)ok && orf[b + olds].dev == nr[a].dev
               && orf[b + olds].ino == nr[a].ino)
            olds++;
        if (all && olds == end - a)
            for (size_t x = a; x < end; x++)
                links[nr[x].i] = 1;
        a = end;
    }
    free(nr);
    free(orf);
    return 0;
}

int64_t pl_walk_compare(const uint8_t *old, size_t old_len, const uint8_t *new_, size_t new_len,
                        uint8_t *match, size_t match_cap, int64_t *events, size_t events_cap,
                        uint64_t *totals)
{
    size_t *oo = NULL, *no = NULL;
    int64_t on = index_records(old, old_len, &oo);
    if (on < 0)
        return on;
    int64_t nn = index_records(new_, new_len, &no);
    if (nn < 0) { free(oo); return nn; }
    if ((size_t)nn > match_cap) { free(oo); free(no); return -EINVAL; }
    size_t i = 0, j = 0, ne = 0;
    uint64_t files = 0, bytes = 0, hits = 0, hit_bytes = 0;
    int64_t rc = 0;
    /* files of several links: first which records are unchanged (`match`, for now),
     * then which of their groups are whole (`links`) */
    uint8_t *links = calloc(nn ? (size_t)nn : 1, 1);
    if (!links) { free(oo); free(no); return -ENOMEM; }
    while (i < (size_t)nn) {
        int c = j >= (size_t)on ? -1 : cmp_paths(new_ + no[i] + 2, PLEN(new_, no[i]),
                                                  old + oo[j] + 2, PLEN(old, oo[j]));
        if (c > 0) {
            j++;
            continue;
        }
        match[i] = c == 0 && same_record(new_ + no[i] + 2 + PLEN(new_, no[i]),
                                         old + oo[j] + 2 + PLEN(old, oo[j]));
        i++;
        j += c == 0;
    }
    if ((rc = group_links(old, oo, (size_t)on, new_, no, (size_t)nn, match, links)) < 0)
        goto out;
    i = j = 0;
#define EVENT(a, b) do { \
        if (ne + 1 > events_cap) { rc = -ENOSPC; goto out; } \
        events[4 * ne] = (a) < 0 ? -1 : (int64_t)(a); \
        events[4 * ne + 1] = (a) < 0 ? -1 : (int64_t)no[(a)]; \
        events[4 * ne + 2] = (b) < 0 ? -1 : (int64_t)(b); \
        events[4 * ne + 3] = (b) < 0 ? -1 : (int64_t)oo[(b)]; \
        ne++; } while (0)
    while (i < (size_t)nn || j < (size_t)on) {
        int c;
        const uint8_t *np = NULL, *op = NULL;
        size_t nl = 0, ol = 0;
        if (i < (size_t)nn) { nl = PLEN(new_, no[i]); np = new_ + no[i] + 2; }
        if (j < (size_t)on) { ol = PLEN(old, oo[j]); op = old + oo[j] + 2; }
        if (i >= (size_t)nn)
            c = 1;
        else if (j >= (size_t)on)
            c = -1;
        else
            c = cmp_paths(np, nl, op, ol);
        if (c > 0) {
            /* gone: a whiteout, and nothing for what was under it */
            EVENT(-1, (int64_t)j);
            uint32_t mode = get_u32(op + ol + OFF_MODE);
            size_t k = j + 1;
            if (S_ISDIR(mode))
                while (k < (size_t)on && under(old + oo[k] + 2, PLEN(old, oo[k]), op, ol))
                    k++;
            j = k;
            continue;
        }
        const uint8_t *nf = np + nl;
        uint32_t nmode = get_u32(nf + OFF_MODE);
        if (S_ISREG(nmode)) {
            files++;
            bytes += get_u64(nf + OFF_SIZE);
        }
        if (c < 0) {
            match[i] = 0;
            EVENT((int64_t)i, -1);
            i++;
            continue;
        }
        const uint8_t *of = op + ol;
        uint32_t omode = get_u32(of + OFF_MODE);
        int same = same_record(nf, of)
                   && (S_ISDIR(nmode) || get_u64(nf + OFF_NLINK) == 1 || links[i]);
        match[i] = (uint8_t)same;
        if (same) {
            if (S_ISREG(nmode)) {
                hits++;
                hit_bytes += get_u64(nf + OFF_SIZE);
            }
        } else {
            EVENT((int64_t)i, (int64_t)j);
        }
        i++;
        j++;
        if (S_ISDIR(omode) && !S_ISDIR(nmode))
            /* a directory replaced: what was under it goes with it, no whiteouts */
            while (j < (size_t)on && under(old + oo[j] + 2, PLEN(old, oo[j]), op, ol))
                j++;
    }
#undef EVENT
    totals[0] = (uint64_t)nn;
    totals[1] = files;
    totals[2] = bytes;
    totals[3] = hits;
    totals[4] = hit_bytes;
    rc = (int64_t)ne;
out:
    free(links);
    free(oo);
    free(no);
    return rc;
}

int64_t pl_walk_keep(const uint8_t *buf, size_t len, const uint8_t *flags, size_t nflags,
                     uint8_t *out, size_t out_cap)
{
    size_t pos = 0, n = 0, w = 0;
    while (pos < len) {
        if (len - pos < 2)
            return -EINVAL;
        size_t plen = PLEN(buf, pos);
        size_t rec = 2 + plen + FIXED;
        if (len - pos < rec || n >= nflags)
            return -EINVAL;
        if (flags[n]) {
            if (out_cap - w < rec)
                return -ENOSPC;
            memcpy(out + w, buf + pos, rec);
            put_u32(out + w + 2 + plen + OFF_RESERVED, flags[n] == 1 ? 0 : 1);
            w += rec;
        }
        n++;
        pos += rec;
    }
    if (n != nflags)
        return -EINVAL;
    return (int64_t)w;
}
