"""Building real directory trees declaratively, and describing them exactly.

`build(root, specs)` applies a list of specs (File, Dir, Symlink, Hardlink, Fifo,
CharDev, BlockDev, Sparse, Remove, Meta) in order. Metadata given explicitly is applied
right after each entry is made, except a directory's, which is (re)applied after the
whole list ran, deepest first, so creating children does not move a directory's mtime
away from the one asked for. Paths are bytes or str, relative to `root`; b"" is the root.

`describe_tree(root)` maps each path (bytes, relative, b"" for the root) to a `Node`,
a tuple of everything a faithful copy must keep: type, permission bits, owner, size,
mtime in ns, content hash / link target / device numbers, every xattr (listed with
llistxattr, so trusted.*, security.capability and the POSIX ACLs too), link count,
which paths share the inode, and the data blocks of regular files (sparseness: the
file's data ranges by SEEK_DATA/SEEK_HOLE, in 512-byte units; not st_blocks, which also
counts the file system's own blocks, such as an ext4 extent tree block allocated at
writeback, so it moves with timing).
Directories' sizes and blocks are left out: they depend on the directory's history, not
its contents.

`build` first checks what its specs need: root (chown to another id, device nodes,
trusted.* or security.* xattrs, capabilities) and tools (`setfacl` for ACLs, `setcap`
for capabilities); when something is missing it skips the calling test with the reason
(`need_root`, `need_tools`), before it makes anything.

The CLI helpers (`run_cli`, `start_cli`, `snapshot`, `checkout`, `assert_checks_out`,
`du`) and `tree_state`, a plainer description than `describe_tree`, are shared by the
test modules that drive real processes.

The helpers use only os/stat and the standard tools; nothing of pylayers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import NamedTuple

import blake3
import pytest

PathLike = bytes | str

# Debian package of each optional tool the tests run, for the skip reasons
TOOL_PACKAGES = {"setfacl": "acl", "getfacl": "acl", "setfattr": "attr", "getfattr": "attr",
                 "b3sum": "b3sum", "setcap": "libcap2-bin", "tar": "tar",
                 "setpriv": "util-linux", "unshare": "util-linux"}


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def need_tools(*tools: str) -> None:
    """Skip the calling test, with the reason, unless every tool is on PATH."""
    missing = missing_tools(*tools)
    if missing:
        pytest.skip(", ".join(f"{t} is not installed (Debian: {TOOL_PACKAGES.get(t, t)})"
                              for t in missing))


def need_root(why: str) -> None:
    """Skip the calling test unless it runs as root."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root ({why})")


def _b(p: PathLike) -> bytes:
    return p if isinstance(p, bytes) else os.fsencode(p)


def _join(root: PathLike, rel: PathLike) -> bytes:
    rel = _b(rel)
    return _b(root) + (b"/" + rel if rel else b"")


@dataclass
class _Meta:
    """Optional metadata of any entry; None leaves what the system gave."""

    path: PathLike
    _: KW_ONLY
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    # (name, value) pairs, set in this order after chown and chmod
    xattrs: dict[PathLike, bytes] = field(default_factory=dict)
    acl: str | None = None  # setfacl -m text for the access ACL, e.g. "u:1234:rwx"
    default_acl: str | None = None  # setfacl -d -m text (directories)
    cap: str | None = None  # setcap text, e.g. "cap_net_raw+ep" (after chown and chmod)


@dataclass
class File(_Meta):
    content: bytes = b""


@dataclass
class Sparse(_Meta):
    """A file of `size` bytes that is a hole except for `writes` [(offset, data)]."""

    size: int = 0
    writes: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class Dir(_Meta):
    pass


@dataclass
class Symlink(_Meta):
    target: PathLike = b""


@dataclass
class Hardlink:
    path: PathLike
    target: PathLike  # an existing path, relative to the root


@dataclass
class Fifo(_Meta):
    pass


@dataclass
class CharDev(_Meta):
    major: int = 1
    minor: int = 3


@dataclass
class BlockDev(_Meta):
    major: int = 7
    minor: int = 0


@dataclass
class Meta(_Meta):
    """Change the metadata of an existing entry only."""


@dataclass
class Write:
    """Overwrite bytes of an existing file in place (same inode, size may grow)."""

    path: PathLike
    offset: int
    data: bytes
    keep_mtime: bool = False  # put the mtime back as it was (a `touch -d` after an edit)


@dataclass
class Remove:
    """Remove a path, recursively if it is a directory."""

    path: PathLike


def _apply_meta(p: bytes, m: _Meta) -> None:
    is_link = os.path.islink(p)
    if m.uid is not None or m.gid is not None:
        os.chown(p, -1 if m.uid is None else m.uid, -1 if m.gid is None else m.gid,
                 follow_symlinks=False)
    if m.mode is not None and not is_link:
        os.chmod(p, m.mode)
    if m.acl is not None:
        subprocess.run(["setfacl", "-m", m.acl, p], check=True)
    if m.default_acl is not None:
        subprocess.run(["setfacl", "-d", "-m", m.default_acl, p], check=True)
    for name, value in m.xattrs.items():
        os.setxattr(p, _b(name), value, follow_symlinks=False)
    if m.cap is not None:
        subprocess.run(["setcap", m.cap, p], check=True)
    if m.mtime_ns is not None:
        os.utime(p, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)


def needs(specs: list) -> tuple[list[str], list[str]]:
    """(why root is needed, tools needed) to build `specs` here; both empty if none."""
    root: list[str] = []
    tools: list[str] = []

    def add(lst: list[str], item: str) -> None:
        if item not in lst:
            lst.append(item)

    mine_u, mine_g = os.geteuid(), {os.getegid(), *os.getgroups()}
    for s in specs:
        if isinstance(s, CharDev | BlockDev):
            add(root, "device nodes")
        if not isinstance(s, _Meta):
            continue
        if s.uid not in (None, mine_u) or s.gid not in (None, *mine_g):
            add(root, "chown")
        if any(_b(n).startswith((b"trusted.", b"security.")) for n in s.xattrs):
            add(root, "trusted.* and security.* xattrs")
        if s.acl is not None or s.default_acl is not None:
            add(tools, "setfacl")
        if s.cap is not None:
            add(root, "file capabilities")
            add(tools, "setcap")
    return root, tools


def build(root: PathLike, specs: list) -> None:
    """Make `root` (if absent) and apply `specs` in order (see the module docstring).
    Skips the calling test if the specs need root or a tool this machine lacks."""
    why_root, tools = needs(specs)
    if why_root:
        need_root(", ".join(why_root))
    need_tools(*tools)
    root_b = _b(root)
    os.makedirs(root_b, exist_ok=True)
    dirs: list[tuple[bytes, _Meta]] = []
    for s in specs:
        p = _join(root_b, s.path)
        if isinstance(s, Remove):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            continue
        if isinstance(s, Write):
            before = os.lstat(p)
            fd = os.open(p, os.O_WRONLY)
            try:
                os.pwrite(fd, s.data, s.offset)
            finally:
                os.close(fd)
            if s.keep_mtime:
                os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
            continue
        if isinstance(s, Hardlink):
            os.link(_join(root_b, s.target), p, follow_symlinks=False)
            continue
        if isinstance(s, File):
            with open(p, "wb") as f:
                f.write(s.content)
        elif isinstance(s, Sparse):
            with open(p, "wb") as f:
                for off, data in s.writes:
                    f.seek(off)
                    f.write(data)
                f.truncate(s.size)
        elif isinstance(s, Dir):
            if not (s.path == b"" or s.path == "") and not os.path.isdir(p):
                os.mkdir(p)
            dirs.append((p, s))
        elif isinstance(s, Symlink):
            os.symlink(_b(s.target), p)
        elif isinstance(s, Fifo):
            os.mkfifo(p)
        elif isinstance(s, CharDev):
            os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(s.major, s.minor))
        elif isinstance(s, BlockDev):
            os.mknod(p, stat.S_IFBLK | 0o644, os.makedev(s.major, s.minor))
        elif isinstance(s, Meta):
            if os.path.isdir(p) and not os.path.islink(p):
                dirs.append((p, s))
        else:
            raise TypeError(f"unknown spec {s!r}")
        _apply_meta(p, s)
    # Directory times last, deepest first: making their children moved them.
    for p, m in sorted(dirs, key=lambda pm: -pm[0].count(b"/")):
        if m.mtime_ns is not None and os.path.isdir(p):
            os.utime(p, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)


class Node(NamedTuple):
    kind: str  # "file", "dir", "symlink", "char", "block", "fifo", "socket"
    mode: int  # S_IMODE
    uid: int
    gid: int
    size: int  # regular files and symlinks; 0 for the rest
    mtime_ns: int
    data: object  # BLAKE3 hex of a file, a symlink's target, a device's (major, minor)
    xattrs: tuple[tuple[bytes, bytes], ...]  # every name llistxattr gives, sorted
    nlink: int
    links: tuple[bytes, ...]  # the tree's paths sharing this inode (files with nlink > 1)
    blocks: int  # regular files: data (not hole) bytes / 512, rounded up; 0 for the rest


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


def lxattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for name in os.listxattr(path, follow_symlinks=False):
        out.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)))
    return tuple(sorted(out))


def data_blocks(path: bytes) -> int:
    """512-byte units of a file's data ranges (holes left out), by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        total, pos = 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from pos to the end
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
        return (total + 511) // 512
    finally:
        os.close(fd)


def file_hash(path: bytes) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def describe_tree(root: PathLike) -> dict[bytes, Node]:
    root_b = _b(root)
    raw: dict[bytes, os.stat_result] = {}

    def walk(rel: bytes) -> None:
        p = _join(root_b, rel)
        st = os.lstat(p)
        raw[rel] = st
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(p)):
                walk(rel + b"/" + name if rel else name)

    walk(b"")
    by_inode: dict[tuple[int, int], list[bytes]] = {}
    for rel, st in raw.items():
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out: dict[bytes, Node] = {}
    for rel, st in raw.items():
        p = _join(root_b, rel)
        fmt = stat.S_IFMT(st.st_mode)
        kind = _KINDS[fmt]
        size, blocks, data = 0, 0, None
        links: tuple[bytes, ...] = ()
        if fmt == stat.S_IFREG:
            size, blocks, data = st.st_size, data_blocks(p), file_hash(p)
            if st.st_nlink > 1:
                links = tuple(sorted(by_inode[(st.st_dev, st.st_ino)]))
        elif fmt == stat.S_IFLNK:
            size, data = st.st_size, os.readlink(p)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            data = (os.major(st.st_rdev), os.minor(st.st_rdev))
        out[rel] = Node(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                        st.st_mtime_ns, data, lxattrs(p), st.st_nlink, links, blocks)
    return out


def tree_differences(a: dict[bytes, Node], b: dict[bytes, Node],
                     fields: tuple[str, ...] = Node._fields) -> list[str]:
    """Readable differences between two descriptions (empty when they agree on
    `fields`)."""
    out = []
    for path in sorted(a.keys() | b.keys()):
        if path not in a:
            out.append(f"{path!r}: only in the second tree")
        elif path not in b:
            out.append(f"{path!r}: only in the first tree")
        else:
            for f in fields:
                va, vb = getattr(a[path], f), getattr(b[path], f)
                if va != vb:
                    out.append(f"{path!r}: {f} {va!r} != {vb!r}")
    return out


def assert_same_tree(a: PathLike | dict, b: PathLike | dict) -> None:
    da = a if isinstance(a, dict) else describe_tree(a)
    db = b if isinstance(b, dict) else describe_tree(b)
    diffs = tree_differences(da, db)
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:40])


def clean(path: PathLike | Path) -> None:
    """Remove a tree we made (as root, read-only dirs do not get in the way)."""
    shutil.rmtree(os.fspath(path), ignore_errors=True)


def _argv(store: PathLike | Path, args: tuple) -> list[str]:
    return [sys.executable, "-m", "pylayers", "--store", os.fsdecode(os.fspath(store)),
            *(os.fsdecode(a) if isinstance(a, bytes) else os.fspath(a) for a in args)]


def run_cli(store: Path, *args: PathLike, cwd: Path | None = None,
            preexec_fn=None, timeout: float = 120,
            text: bool = False) -> subprocess.CompletedProcess:
    """`python -m pylayers --store STORE ARGS...`, capturing bytes (str with `text`).
    The working directory must not be the source tree, or `-m` would import the unbuilt
    sources."""
    return subprocess.run(_argv(store, args), capture_output=True, timeout=timeout,
                          cwd=cwd or Path(store).parent, preexec_fn=preexec_fn, text=text)


def start_cli(store: Path, *args: PathLike) -> subprocess.Popen:
    """`run_cli` started in the background, stdout and stderr piped as text."""
    return subprocess.Popen(_argv(store, args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(store).parent)


def snapshot(store: Path, src: PathLike | Path, *args: str) -> str:
    """Snapshot through the CLI; the new layer's id (the last line of stdout)."""
    proc = run_cli(store, "snapshot", os.fspath(src), *args)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode().strip().splitlines()[-1]


def checkout(store: Path, ref: str, dest: PathLike | Path) -> None:
    proc = run_cli(store, "checkout", ref, os.fspath(dest))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def assert_checks_out(store: Path, ref: str, src: Path, dest: Path) -> None:
    """REF checks out into DEST as a tree equal to SRC by `tree_state`."""
    checkout(store, ref, dest)
    assert tree_state(dest) == tree_state(src)


def du(store: Path) -> dict:
    proc = run_cli(store, "du", "--json")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def tree_state(root: PathLike | Path) -> dict[str, tuple]:
    """Relative path -> ("link", target) | ("dir", mode) | ("file", mode, size, sha256,
    mtime_ns): what a tree must keep, without owners, xattrs or inode sharing."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, h.hexdigest(),
                            st.st_mtime_ns)
    return out


def module_source(n: int, seed: int) -> bytes:
    """Text like a Python module: compresses, and a few edits keep most of it."""
    rnd = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "value", "None", "for", "in",
             "if", "else", "lambda", "yield", "with", "as", "data", "result", "index"]
    out = bytearray()
    while len(out) < n:
        out += (" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
                + f"  # {rnd.getrandbits(40):x}\n").encode()
    return bytes(out[:n])


def flip_byte(path: Path, offset: int) -> None:
    """Invert the byte at `offset` of the file `path` (damage, in place)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def set_store_version(store: Path, version: int) -> None:
    """Make the store at `store` say format `version` (its config and its index), as a
    pylayers of that version would have made it."""
    import lmdb

    cfg = json.loads((store / "config.json").read_text())
    cfg["version"] = version
    (store / "config.json").write_text(json.dumps(cfg))
    env = lmdb.open(str(store / "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"format_version", str(version).encode(), db=env.open_db(b"meta", txn=txn))
    env.close()


_REPO = Path(__file__).resolve().parent.parent
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the driver")
needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None,
                                    reason="valgrind is not installed")


def _build_driver(out: Path, sources: list[str], *flags: str) -> Path:
    """Compile a C driver (paths relative to the repository) with the C core's headers."""
    subprocess.run(["gcc", *flags, "-g", "-I", str(_REPO / "csrc"),
                    *(str(_REPO / src) for src in sources), "-o", str(out)], check=True)
    return out


def driver_under_asan(tmp_path: Path, sources: list[str]) -> None:
    """Build the driver with AddressSanitizer and UBSan, run it, and expect "ok"."""
    exe = _build_driver(tmp_path / "driver_asan", sources, "-O1",
                        "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                        "-fno-sanitize-recover=all")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def driver_under_valgrind(tmp_path: Path, sources: list[str]) -> None:
    """Build the driver plainly, run it under valgrind (errors and definite or indirect
    leaks fail), and expect "ok"."""
    exe = _build_driver(tmp_path / "driver_plain", sources, "-O2")
    res = subprocess.run(["valgrind", "--error-exitcode=3", "--leak-check=full",
                          "--errors-for-leak-kinds=definite,indirect", "-q", str(exe)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
