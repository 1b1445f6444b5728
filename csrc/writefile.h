/* writefile.h -- create one regular file from one buffer, with its metadata, in one
 * call: what a checkout does for most files (one chunk, no xattrs), without a Python
 * round trip (and a GIL hand-over) per system call.
 *
 * Contract
 *   pl_write_file(dir_fd, name, mode, uid, gid, mtime_ns, data, len, &step) creates
 *   `name` relative to the directory open at `dir_fd` (O_CREAT|O_EXCL|O_NOFOLLOW, with
 *   the permission bits of `mode`), writes `data` leaving every all-zero block of the
 *   file's block size (st_blksize, at least 512) as a hole, as `tar -S` does (the file
 *   is then extended to `len` with ftruncate), then sets the owner (only where the new
 *   file's differs: chown clears setuid bits, so it goes first), the mode (only where
 *   it differs), and atime and mtime to `mtime_ns`; and closes it.
 *   Returns 0, or a negative errno with `*step` saying what failed: 1 create, 2 write,
 *   3 owner, 4 mode, 5 times, 6 close. On failure the file may exist, partly written.
 */
#ifndef PYLAYERS_WRITEFILE_H
#define PYLAYERS_WRITEFILE_H

#include <stddef.h>
#include <stdint.h>

int pl_write_file(int dir_fd, const char *name, uint32_t mode, uint32_t uid, uint32_t gid,
                  int64_t mtime_ns, const uint8_t *data, size_t len, int *step);

#endif
