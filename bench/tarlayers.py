"""Docker-style tar layers: tree manifests, diffs with whiteouts, applying a layer chain.

A diff layer holds what changed from the parent tree, as Docker's overlay2 upper
directory would: added and changed entries (a changed file in full, a chmod-only change
too), the parent directories of each, and an empty `.wh.NAME` file for each deleted
NAME (one for a deleted directory, not one per file in it). `stage_upper` builds that
directory from the version's tree; it is untimed in the benchmark, since overlayfs hands
Docker its upper directory for free; the timed part is `tar | compressor`.

`python bench/tarlayers.py apply DEST CODEC LAYER...` restores a chain the way
`docker pull` applies layers: extract each in order, then delete each whiteout's target
and the whiteout itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

# path (relative, str) -> (type, mode, uid, gid, size, mtime_ns, symlink target)
Manifest = dict[str, tuple]

DECOMPRESS = {"gzip": ["gzip", "-dc"], "pigz": ["pigz", "-dc"], "zstd": ["zstd", "-dcq"]}
TAR_X = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner"]


def manifest(root: Path) -> Manifest:
    """The stat facts a diff compares, for every entry under root (root excluded)."""
    out: Manifest = {}
    base = os.fspath(root)
    for dirpath, dirs, files in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, size, st.st_mtime_ns, target)
    return out


def content_manifest(root: Path) -> dict[str, tuple]:
    """What a restore must reproduce: type, permissions, size, content digest (or link
    target) of every entry. Directory mtimes and ownership are left out (OSTree, for
    one, does not keep mtimes)."""
    import blake3  # here, so the `apply` helper starts without it

    out: dict[str, tuple] = {}
    base = os.fspath(root)
    for dirpath, dirs, files in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if stat.S_ISREG(st.st_mode):
                h = blake3.blake3()
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                what = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(full)
            else:
                what = None
            perm = None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[rel] = (stat.S_IFMT(st.st_mode), perm, size, what)
    return out


def diff(old: Manifest, new: Manifest) -> tuple[list[str], list[str]]:
    """(changed or added paths, deleted paths); a deleted directory's children are not
    listed (its one whiteout covers them)."""
    changed = [p for p, facts in new.items() if old.get(p) != facts]
    gone = set(old) - set(new)
    deleted = [p for p in gone if os.path.dirname(p) not in gone]
    return sorted(changed), sorted(deleted)


def stage_upper(src: Path, old: Manifest, new: Manifest, upper: Path) -> tuple[int, int]:
    """Fill `upper` (absent or empty) with the diff from `old` to `new` (whose tree is
    `src`); returns (entries, whiteouts)."""
    changed, deleted = diff(old, new)
    upper.mkdir(parents=True, exist_ok=True)
    dirs: set[str] = set()

    def ensure_parents(rel: str) -> None:
        parent = os.path.dirname(rel)
        chain = []
        while parent and parent not in dirs:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(chain):
            (upper / d).mkdir(exist_ok=True)
            dirs.add(d)

    for rel in changed:
        ensure_parents(rel)
        s, u = src / rel, upper / rel
        st = os.lstat(s)
        if stat.S_ISDIR(st.st_mode):
            u.mkdir(exist_ok=True)
            dirs.add(rel)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), u)
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(s, u)
            _copy_xattrs(s, u)
        else:
            os.mknod(u, st.st_mode, st.st_rdev)
        os.lchown(u, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(u, stat.S_IMODE(st.st_mode))
        if not stat.S_ISDIR(st.st_mode):
            os.utime(u, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    for rel in deleted:
        ensure_parents(rel)
        parent, name = os.path.split(rel)
        (upper / parent / f".wh.{name}").touch()
    # Directories last, deepest first, so writing into them does not move their mtime.
    for d in sorted(dirs, key=lambda p: p.count("/"), reverse=True):
        st = os.lstat(src / d)
        os.lchown(upper / d, st.st_uid, st.st_gid)
        os.chmod(upper / d, stat.S_IMODE(st.st_mode))
        os.utime(upper / d, ns=(st.st_atime_ns, st.st_mtime_ns))
    st = os.lstat(src)
    os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    return len(changed), len(deleted)


def _copy_xattrs(s: Path, d: Path) -> None:
    try:
        for name in os.listxattr(s, follow_symlinks=False):
            os.setxattr(d, name, os.getxattr(s, name, follow_symlinks=False),
                        follow_symlinks=False)
    except OSError:
        pass


def apply_layers(dest: Path, codec: str, layers: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        with open(layer, "rb") as f:
            unz = subprocess.Popen(DECOMPRESS[codec], stdin=f, stdout=subprocess.PIPE)
            tar = subprocess.run([*TAR_X, "-xvf", "-", "-C", os.fspath(dest)],
                                 stdin=unz.stdout, capture_output=True, check=True)
            unz.stdout.close()
            if unz.wait() != 0:
                raise SystemExit(f"{codec} failed on {layer}")
        for line in tar.stdout.decode("utf-8", "surrogateescape").splitlines():
            parent, name = os.path.split(line.rstrip("/"))
            if name.startswith(".wh."):
                target = dest / parent / name[4:]
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                (dest / parent / name).unlink()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "apply":
        raise SystemExit("usage: python bench/tarlayers.py apply DEST CODEC LAYER...")
    apply_layers(Path(argv[1]), argv[2], argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
