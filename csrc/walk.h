/* walk.h -- lstat every entry of a directory tree, in a canonical order, into one
 * buffer; used to fingerprint a tree (has anything changed since it was snapshotted?)
 * without a Python object per file.
 *
 * Contract
 *   pl_walk(root, &out, &len, &max_ctime) walks the tree under `root` (a directory;
 *   symlinks are not followed), depth first, each directory's names sorted bytewise,
 *   the root first. For each entry it appends one record to a buffer it allocates:
 *     u16 pathlen, path (relative to root, no leading '/'; the root's is empty),
 *     then the lstat fields as little-endian integers:
 *     u32 mode, u32 uid, u32 gid, u32 reserved(0), u64 nlink, u64 size,
 *     i64 mtime_ns, i64 ctime_ns, u64 ino, u64 dev, u64 rdev.
 *   On success it returns 0 and stores the buffer in *out (free it with pl_free), its
 *   length in *len and the newest ctime seen in *max_ctime (a fingerprint is only
 *   trusted when that is safely in the past). On failure it returns a negative errno
 *   (-ENOENT, -EACCES, -ENOTDIR, -ENAMETOOLONG, -ENOMEM) and allocates nothing.
 *   An entry that vanishes between readdir and lstat is skipped.
 *   A record's ctime changes whenever the entry's content, metadata or xattrs change,
 *   which is what makes a fingerprint of these records sound.
 */
#ifndef PYLAYERS_WALK_H
#define PYLAYERS_WALK_H

#include <stddef.h>
#include <stdint.h>

int pl_walk(const char *root, uint8_t **out, size_t *len, int64_t *max_ctime);

/* pl_xattr_marks(root, buf, len, marks, cap): for each record of a pl_walk buffer of
 * the tree at `root` (an absolute path), in order, sets marks[i] to 1 when the entry may
 * have extended attributes (llistxattr of root/path says so, or fails otherwise than
 * with ENOTSUP, ENODATA or EPERM: the caller looks again and reports what it finds) and
 * to 0 when it has none. Returns the number of records, or a negative errno: -EINVAL
 * for a malformed buffer or more than `cap` records, -ENAMETOOLONG, -ENOMEM. A scan
 * then reads xattrs only where marked, in one C loop instead of a call per entry. */
int64_t pl_xattr_marks(const char *root, const uint8_t *buf, size_t len, uint8_t *marks,
                       size_t cap);
/* Walk caches (docs/format.md, "Walk caches"): the records a snapshot kept from its
 * walk, each record's reserved u32 set to 1 when it is not to be trusted.
 *
 * pl_walk_compare(old, old_len, new, new_len, match, match_cap, events, events_cap,
 * totals) merges two record buffers of one tree (both in component order: bytewise,
 * '/' before every other byte, as pl_walk emits them) by path. For each new record i,
 * match[i] = 1 when the old buffer has a record of the same path with every field
 * equal but the reserved one, that old record is trusted (reserved 0), and the entry
 * is a directory, has one link, or is a regular file whose links in the tree are all
 * unchanged: every new regular record of more than one link with its (dev, ino) has
 * such an old record, and the old buffer holds as many regular records of more than
 * one link with that (dev, ino); else 0. It writes the differences as events, four
 * int64 each (new index, new offset, old index, old offset; -1 for none), in path
 * order: a new record that does not match (changed: both set; added: old -1), and an
 * old path that is gone (new -1), except under a directory that is gone or replaced
 * by a non-directory (what a diff of the two trees needs: one whiteout for the
 * directory, or none). totals[0..4]: new records, regular files among them, their
 * bytes, matched regular files, their bytes. Returns the number of events, or -EINVAL
 * (malformed buffer, more than match_cap new records), -ENOSPC (more than events_cap
 * events), -ENOMEM. */
int64_t pl_walk_compare(const uint8_t *old, size_t old_len, const uint8_t *new_, size_t new_len,
                        uint8_t *match, size_t match_cap, int64_t *events, size_t events_cap,
                        uint64_t *totals);

/* pl_walk_keep(buf, len, flags, nflags, out, out_cap): the records of `buf` whose flag
 * is not 0, copied to `out` with the reserved u32 set to 0 (flag 1: trusted) or 1 (any
 * other flag); one flag per record. Returns the bytes written, or -EINVAL (malformed,
 * or not one flag per record), -ENOSPC. */
int64_t pl_walk_keep(const uint8_t *buf, size_t len, const uint8_t *flags, size_t nflags,
                     uint8_t *out, size_t out_cap);
void pl_free(void *p);

#endif
