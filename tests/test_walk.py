"""The C tree walk (csrc/walk.c) against a pure-Python reference, and the tree
fingerprint that lets an unchanged directory skip scanning."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pylayers import Layers, Store
from pylayers._native import walk_compare, walk_records, xattr_marks
from pylayers.layers.fingerprint import tree_fingerprint

REC = struct.Struct("<IIIIQQqqQQQ")


def reference_records(root: bytes) -> tuple[bytes, int]:
    out = []
    newest = -(1 << 63)

    def emit(rel: bytes, st: os.stat_result) -> None:
        nonlocal newest
        newest = max(newest, st.st_ctime_ns)
        out.append(struct.pack("<H", len(rel)) + rel + REC.pack(
            st.st_mode, st.st_uid, st.st_gid, 0, st.st_nlink, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns, st.st_ino, st.st_dev, st.st_rdev))

    def walk(abs_dir: bytes, rel_dir: bytes) -> None:
        for name in sorted(os.listdir(abs_dir)):
            rel = rel_dir + b"/" + name if rel_dir else name
            path = abs_dir + b"/" + name
            st = os.lstat(path)
            emit(rel, st)
            if os.path.isdir(path) and not os.path.islink(path):
                walk(path, rel)

    emit(b"", os.stat(root))
    walk(root, b"")
    return b"".join(out), newest


def make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x" * 100)
    (root / "a.b").write_text("sorted after a/ in component order")
    (root / "link").symlink_to("a")  # not followed
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    (root / "n\nl").write_text("newline")
    os.link(root / "a" / "f", root / "hard")
    os.setxattr(root / "a" / "f", "user.pylayers-test", b"v")
    for i in range(300):
        (root / "a" / "b" / "c" / f"{i:04}").write_bytes(b"")


def test_records_match_reference(tmp_path: Path) -> None:
    make_tree(tmp_path)
    got = walk_records(os.fsencode(tmp_path))
    assert got == reference_records(os.fsencode(tmp_path))


def test_buffer_grows_past_its_first_allocation(tmp_path: Path) -> None:
    # ~100 bytes a record: 15,000 entries need more than the first 1 MiB
    for d in range(15):
        sub = tmp_path / f"d{d}"
        sub.mkdir()
        for i in range(1000):
            (sub / f"{i:05}-{'x' * 20}").touch()
    records, _ = walk_records(str(tmp_path))
    assert len(records) > 1 << 20
    assert (records, _) == reference_records(os.fsencode(tmp_path))


def test_errors_are_oserrors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        walk_records(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        walk_records(str(tmp_path / "file"))


def test_fingerprint_sees_every_kind_of_change(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    make_tree(root)
    f = root / "a" / "f"
    seen = {tree_fingerprint(root)[0]}
    assert tree_fingerprint(root)[0] in seen  # stable when nothing changes

    def changed(step) -> None:
        time.sleep(0.01)  # move ctime past the coarse timestamp tick
        step()
        fp = tree_fingerprint(root)[0]
        assert fp not in seen, step
        seen.add(fp)

    st = f.stat()

    def same_size_edit_time_restored() -> None:
        f.write_bytes(b"y" * 100)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))

    changed(same_size_edit_time_restored)
    changed(lambda: os.chmod(f, 0o600))
    changed(lambda: os.setxattr(f, "user.k", b"v"))
    changed(lambda: os.rename(root / "a.b", root / "a.c"))
    changed(lambda: (root / "new").touch())
    changed(lambda: os.unlink(root / "new"))


def _snap(store: Path, src: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store),
                           "snapshot", str(src), *args], capture_output=True, text=True,
                          cwd=store.parent, check=True)


def test_unchanged_directory_skips_the_scan_and_a_change_does_not(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    old = time.time() - 10
    for dirpath, dirs, files in os.walk(src):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), (old, old), follow_symlinks=False)
    time.sleep(1.1)  # ctimes must leave the racy window before a fingerprint is kept
    store = tmp_path / "store"
    base = _snap(store, src, "--tag", "base").stdout.split()[-1]
    again = _snap(store, src, "--parent", "base")
    assert "unchanged since layer " + base[:12] in again.stderr
    with Store.open(store) as s:
        layers = Layers(s)
        assert layers.entries(bytes.fromhex(again.stdout.split()[-1])) == []
    # a same-size edit with its mtime put back is still seen
    f = src / "a" / "f"
    st = f.stat()
    f.write_bytes(b"z" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _snap(store, src, "--parent", "base")
    assert "unchanged" not in changed.stderr
    with Store.open(store) as s:
        layers = Layers(s)
        own = layers.entries(bytes.fromhex(changed.stdout.split()[-1]))
        assert [e.path for e in own] == [b"a/f"]
        assert layers.read_file(own[0]) == b"z" * 100
    # unchanged since that layer, on the same parent: that very layer, tagged, nothing
    # decoded or stored; on another parent (none): the whole tree, a different layer
    time.sleep(1.1)
    first = _snap(store, src, "--parent", "base").stdout.split()[-1]
    same = _snap(store, src, "--parent", "base", "--tag", "again", "-m", "ignored")
    assert "unchanged since layer " + first[:12] in same.stderr
    assert same.stdout.split()[-1] == first == changed.stdout.split()[-1]
    alone = _snap(store, src).stdout.split()[-1]
    assert alone != first
    with Store.open(store) as s:
        layers = Layers(s)
        assert layers.resolve("again") == bytes.fromhex(first)
        assert layers.record(bytes.fromhex(first)).kept
        assert [e.path for e in layers.entries(bytes.fromhex(first))] == [b"a/f"]
        assert layers.tree(bytes.fromhex(alone)) == layers.tree(bytes.fromhex(first))
        assert layers.record(bytes.fromhex(alone)).parent is None


def _checksum(data: bytes) -> int:
    s = 0
    for b in data:
        s = (s * 31 + b) & 0xFFFFFFFFFFFFFFFF
    return s


@pytest.mark.skipif(not Path("/usr/bin/gcc").exists() and not Path("/usr/bin/cc").exists(),
                    reason="no C compiler to build the sanitizer driver")
def test_walk_under_address_sanitizer(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    exe = tmp_path / "walk_asan"
    subprocess.run(["gcc", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g",
                    "-O1", "-I", str(repo / "csrc"), str(repo / "csrc" / "walk.c"),
                    str(repo / "tests" / "native" / "walk_asan_driver.c"), "-o", str(exe)],
                   check=True)
    tree = tmp_path / "tree"
    tree.mkdir()
    make_tree(tree)
    for i in range(12000):  # enough records to make the buffer grow several times
        (tree / "a" / "b" / f"{i:06}").touch()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    res = subprocess.run([str(exe), str(tree)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    records, _ = walk_records(str(tree))
    marked = sum(xattr_marks(str(tree), records))
    assert marked >= 1  # make_tree's xattr
    copy = bytearray(records)
    pos, i = 0, 0
    while pos < len(copy):  # the driver's mutation: every 7th record's ctime
        (plen,) = struct.unpack_from("<H", copy, pos)
        if i % 7 == 3:
            copy[pos + 2 + plen + 40] ^= 1
        pos += 2 + plen + REC.size
        i += 1
    events = len(walk_compare(records, bytes(copy))[1])
    assert res.stdout.split() == [str(len(records)), str(_checksum(records)), str(marked),
                                  str(events)]


def test_xattr_marks_say_which_entries_have_xattrs(tmp_path: Path) -> None:
    make_tree(tmp_path)
    os.setxattr(tmp_path / "a", "user.dir", b"")  # an empty value is still an xattr
    records, _ = walk_records(str(tmp_path))
    marks = xattr_marks(str(tmp_path), records)
    paths = []
    pos = 0
    while pos < len(records):
        (n,) = struct.unpack_from("<H", records, pos)
        paths.append(records[pos + 2 : pos + 2 + n])
        pos += 2 + n + REC.size
    assert len(marks) == len(paths)
    for path, mark in zip(paths, marks, strict=True):
        full = os.fsencode(tmp_path) + (b"/" + path if path else b"")
        has = bool(os.listxattr(full, follow_symlinks=False))
        assert mark == has, (path, mark)
    assert sum(marks) == 3  # a, a/f and its hardlink `hard`
    with pytest.raises(OSError) as err:
        xattr_marks(str(tmp_path), records[:-1])  # a truncated buffer
    assert err.value.errno == 22


def test_scan_from_the_walk_equals_the_scan_of_its_own(tmp_path: Path) -> None:
    """The scan a snapshot runs over the native walk's records gives exactly the
    entries of the Python walk (kinds, metadata, xattrs, hardlinks, order), with an
    excluded directory and the store inside the tree left out by both."""
    from pylayers._native import walk
    from pylayers.layers.ignore import Exclusions
    from pylayers.layers.scan import Scanner
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    (src / "skip").mkdir()
    (src / "skip" / "x").write_bytes(b"left out")
    (src / "kept").write_bytes(b"kept")
    os.setxattr(src / "kept", "user.k", b"1")
    excl = Exclusions.for_directory(str(src), ("skip",))
    with Store.open(src / "store") as s:
        def scan(records=None):
            with s.writer() as w:
                sc = Scanner(s, s.config.chunker, w.put,
                             exclude=excl.excluded)
                return sc.scan(src, records), sc.stats.warnings
        plain, warn_plain = scan()
        with walk(str(src)) as (records, _newest):
            fast, warn_fast = scan(records)
    assert [e.path for e in fast] == [e.path for e in plain]
    assert fast == plain
    assert b"skip/x" not in [e.path for e in fast] and b"store" not in [e.path for e in fast]
    assert [e.xattrs for e in fast if e.path in (b"kept", b"a/f")] == \
        [((b"user.pylayers-test", b"v"),), ((b"user.k", b"1"),)]
    assert warn_fast == warn_plain and any("the store itself" in w for w in warn_fast)


# -- walk caches: pl_walk_compare and pl_walk_keep against a Python reference ------------

def _parse(buf: bytes) -> list[tuple[int, bytes, tuple]]:
    out, pos = [], 0
    while pos < len(buf):
        (plen,) = struct.unpack_from("<H", buf, pos)
        path = buf[pos + 2 : pos + 2 + plen]
        out.append((pos, path, REC.unpack_from(buf, pos + 2 + plen)))
        pos += 2 + plen + REC.size
    return out


def reference_compare(old: bytes, new: bytes):
    """pl_walk_compare's contract (csrc/walk.h), written plainly."""
    o, n = _parse(old), _parse(new)
    key = lambda p: p.replace(b"/", b"\0")  # noqa: E731
    under = lambda p, d: p != d and (d == b"" or p.startswith(d + b"/"))  # noqa: E731
    # files of several links: a group (by dev, ino) matches only whole and unchanged
    olds = {p: f for _o, p, f in o}
    unchanged = [p in olds and olds[p][3] == 0 and f[:3] == olds[p][:3]
                 and f[4:] == olds[p][4:] for _o, p, f in n]
    multi = lambda f: f[0] & 0o170000 == 0o100000 and f[4] > 1  # noqa: E731
    groups: dict[tuple, list[int]] = {}
    for i, (_o, _p, f) in enumerate(n):
        if multi(f):
            groups.setdefault((f[9], f[8]), []).append(i)
    old_count: dict[tuple, int] = {}
    for _o, _p, g in o:
        if multi(g):
            old_count[(g[9], g[8])] = old_count.get((g[9], g[8]), 0) + 1
    whole = {i for k, members in groups.items()
             if all(unchanged[i] for i in members) and old_count.get(k, 0) == len(members)
             for i in members}
    match, events = bytearray(len(n)), []
    files = nbytes = hits = hit_bytes = 0
    i = j = 0
    while i < len(n) or j < len(o):
        if i >= len(n) or (j < len(o) and key(o[j][1]) < key(n[i][1])):
            events.append((-1, -1, j, o[j][0]))
            d, isdir = o[j][1], o[j][2][0] & 0o170000 == 0o040000
            j += 1
            while isdir and j < len(o) and under(o[j][1], d):
                j += 1
            continue
        f = n[i][2]
        if f[0] & 0o170000 == 0o100000:
            files += 1
            nbytes += f[5]
        if j >= len(o) or key(n[i][1]) < key(o[j][1]):
            events.append((i, n[i][0], -1, -1))
            i += 1
            continue
        g = o[j][2]
        isdir = f[0] & 0o170000 == 0o040000
        same = g[3] == 0 and f[:3] == g[:3] and f[4:] == g[4:] and \
            (isdir or f[4] == 1 or i in whole)
        match[i] = same
        if same and f[0] & 0o170000 == 0o100000:
            hits += 1
            hit_bytes += f[5]
        if not same:
            events.append((i, n[i][0], j, o[j][0]))
        d, was_dir = o[j][1], g[0] & 0o170000 == 0o040000
        i += 1
        j += 1
        if was_dir and not isdir:
            while j < len(o) and under(o[j][1], d):
                j += 1
    return bytes(match), events, (len(n), files, nbytes, hits, hit_bytes)


def _random_records(rnd, paths: list[bytes], base: dict | None = None) -> tuple[bytes, dict]:
    out, fields = [], {}
    for p in sorted(paths, key=lambda p: p.replace(b"/", b"\0")):
        is_dir = any(q.startswith(p + b"/") for q in paths) or p == b""
        if base is not None and p in base and rnd.random() < 0.8 and \
                (base[p][0] & 0o170000 == 0o040000) == is_dir:
            f = list(base[p])
        else:
            mode = (0o040755 if is_dir else rnd.choice([0o100644, 0o120777, 0o010644]))
            f = [mode, rnd.choice([0, 1000]), 0, 0, rnd.choice([1, 1, 1, 2]),
                 rnd.randrange(5000), rnd.randrange(3), rnd.randrange(3), rnd.randrange(9),
                 1, 0]
        if base is None:
            f[3] = rnd.random() < 0.1  # untrusted in the cache
        else:
            f[3] = 0
        fields[p] = tuple(f)
        out.append(struct.pack("<H", len(p)) + p + REC.pack(*f))
    return b"".join(out), fields


def _random_paths(rnd) -> list[bytes]:
    names = [b"a", b"a.b", b"b", b"a-", b"z"]
    paths = {b""}
    for _ in range(rnd.randrange(1, 25)):
        parent = rnd.choice(sorted(paths))
        paths.add((parent + b"/" if parent else b"") + rnd.choice(names))
    return sorted(paths)


def test_walk_compare_is_the_reference() -> None:
    from pylayers._native import walk_compare, walk_keep

    rnd = __import__("random").Random(11)
    multi_link = [0, 0]  # files of several links: not matched, matched
    for _ in range(3000):
        old_paths = _random_paths(rnd)
        old, fields = _random_records(rnd, old_paths)
        keep = set(rnd.sample(old_paths, rnd.randrange(len(old_paths) + 1))) | {b""}
        new_paths = sorted({p for p in old_paths if p in keep or
                            any(q.startswith(p + b"/") for q in keep)}
                           | set(_random_paths(rnd)))
        new, _ = _random_records(rnd, new_paths, fields)
        got = walk_compare(old, new)
        assert got == reference_compare(old, new)
        for (_o, _p, f), m in zip(_parse(new), got[0], strict=True):
            if f[0] & 0o170000 == 0o100000 and f[4] > 1:
                multi_link[m] += 1
        flags = bytes(rnd.choice([0, 1, 2]) for _ in _parse(new))
        kept = walk_keep(new, flags)
        want = b"".join(struct.pack("<H", len(p)) + p + REC.pack(*f[:3], flag == 2, *f[4:])
                        for (_o, p, f), flag in zip(_parse(new), flags, strict=True) if flag)
        assert kept == want
    assert min(multi_link) > 100, multi_link  # both sides of the links rule were seen
    # malformed buffers are refused, never read past
    from pylayers.errors import CorruptData

    good, _ = _random_records(rnd, [b"", b"a"])
    for bad in (good[:-1], good + b"\0", good[:1]):
        with pytest.raises(CorruptData):
            walk_compare(good, bad)
        with pytest.raises(CorruptData):
            walk_compare(bad, good)
    with pytest.raises(CorruptData):
        walk_keep(good, b"\1")  # one flag for two records
