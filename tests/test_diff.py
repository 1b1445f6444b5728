"""`pylayers diff` against a brute-force comparison of two real trees.

The oracle here lstats both trees itself (it does not use treeutil.describe_tree, nor
anything of pylayers) and applies the documented rules (README, "Diff rules"):

- one line per changed path; the root is never listed;
- `A` for a path only in the new tree (so an added directory is `A` and so is each
  child), `D` for a path only in the old tree whose parent is still a directory (so a
  deleted directory, or a directory replaced by a file, is one line and its children are
  not listed), `C` for a path in both whose type, content, mode, owner, mtime or xattrs
  changed, or (both directories) whose set of entries changed;
- the attributes of a `C`, in this order: "type" (else "content": file bytes, symlink
  target, device numbers), "link", "mode", "owner", "mtime", "xattrs", "entries".
  "link" is about hardlinks: a layer stores an inode's first name (in the order below)
  as the file and each other name as a link to that first name; "link" says a name
  became, stopped being, or changed which first name it is, a link. An inode's owner,
  mode, mtime and xattrs belong to all its names: a chown shows on each;
- --json gives path ("/" + the path; when not UTF-8, with U+FFFD for the bad bytes and
  path_b64, the exact bytes), change,
  attributes, and kind (file, dir, symlink, fifo, char, block, or "hardlink" for a
  name of a hardlinked inode other than its first);
- order: by path *components*: the path is compared with "/" ordering before every
  other byte, so a directory's descendants directly follow it ("/a/b" before "/a!"
  before "/a.b"), unlike plain byte order where "!" (0x21) and "." (0x2e) sort before
  "/" (0x2f). Checked on purpose with names holding bytes below "/";
- --stat: bytes_added is the size of each regular file of the new tree that is new or
  whose content or type changed, bytes_removed the same for the old tree (a deleted or
  replaced directory's files included); metadata-only changes move no bytes. A hardlinked
  inode counts once, under its first name. new_bytes is the file data a snapshot
  of the new side would add: checked by taking that snapshot (for a directory) or by the
  data the second layer really stored on top of the first.

Trees are mutated by a seeded random generator for several rounds.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import stat
import sys
import unicodedata
from pathlib import Path
from typing import NamedTuple

import blake3
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treeutil import (  # noqa: E402
    assert_same_tree,
    checkout,
    describe_tree,
    need_root,
    run_cli,
)

import pylayers  # noqa: E402
from pylayers.layers.manifest import HARDLINK, REG  # noqa: E402

# As root the random rounds chown to any ids and set trusted.* xattrs; as another user
# they chown among the user's own ids (a change only where the user has several groups),
# set user.* xattrs only and keep the owner's rwx bits (to read what they made), so a
# developer without root runs the oracle too.
ROOT = os.geteuid() == 0
UIDS = [0, 7, 1234] if ROOT else [os.geteuid()]
GIDS = [0, 8, 5678] if ROOT else sorted({os.getegid(), *os.getgroups()})
XATTRS = ["user.a", "user.b", "trusted.c"] if ROOT else ["user.a", "user.b"]

T = 1_600_000_000_000_000_000


# -- the oracle ----------------------------------------------------------------------------


class B(NamedTuple):
    kind: str
    size: int
    data: object  # file digest, symlink target, (major, minor)
    mode: int
    uid: int
    gid: int
    mtime: int
    xattrs: tuple
    children: frozenset  # directories: names of entries
    first: bytes | None  # regular files: the inode's first name in component order


def ckey(path: bytes) -> bytes:
    """Component order: '/' before every other byte."""
    return path.replace(b"/", b"\x00")


def scan(root: Path) -> dict[bytes, B]:
    rootb = os.fsencode(root)
    raw: dict[bytes, os.stat_result] = {}
    kids: dict[bytes, frozenset] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        p = rootb + b"/" + rel if rel else rootb
        st = os.lstat(p)
        raw[rel] = st
        if stat.S_ISDIR(st.st_mode):
            names = os.listdir(p)
            kids[rel] = frozenset(names)
            stack.extend(rel + b"/" + n if rel else n for n in names)
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel, st in raw.items():
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    out = {}
    for rel, st in raw.items():
        p = rootb + b"/" + rel if rel else rootb
        m = st.st_mode
        first = None
        if stat.S_ISREG(m):
            kind = "file"
            with open(p, "rb") as f:
                data = blake3.blake3(f.read()).hexdigest()
            first = min(inodes[(st.st_dev, st.st_ino)], key=ckey)
        elif stat.S_ISDIR(m):
            kind, data = "dir", None
        elif stat.S_ISLNK(m):
            kind, data = "symlink", os.readlink(p)
        elif stat.S_ISFIFO(m):
            kind, data = "fifo", None
        elif stat.S_ISCHR(m):
            kind, data = "char", (os.major(st.st_rdev), os.minor(st.st_rdev))
        else:
            kind, data = "block", (os.major(st.st_rdev), os.minor(st.st_rdev))
        xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                              for n in os.listxattr(p, follow_symlinks=False)))
        out[rel] = B(kind, st.st_size if kind == "file" else 0, data, stat.S_IMODE(m),
                     st.st_uid, st.st_gid, st.st_mtime_ns, xattrs,
                     kids.get(rel, frozenset()), first)
    return out


def _attrs(path: bytes, o: B, n: B) -> list[str]:
    a = []
    if o.kind != n.kind:
        a.append("type")
    elif (o.size, o.data) != (n.size, n.data):
        a.append("content")
    o_link = o.kind == "file" and o.first != path
    n_link = n.kind == "file" and n.first != path
    if (o_link or n_link) and not (o_link and n_link and o.first == n.first):
        a.append("link")
    if o.mode != n.mode:
        a.append("mode")
    if (o.uid, o.gid) != (n.uid, n.gid):
        a.append("owner")
    if o.mtime != n.mtime:
        a.append("mtime")
    if o.xattrs != n.xattrs:
        a.append("xattrs")
    if o.kind == n.kind == "dir" and o.children != n.children:
        a.append("entries")
    return a


def kind(path: bytes, b: B) -> str:
    """The kind --json reports: a layer's own name for each entry, so a name of a
    hardlinked inode other than its first is a "hardlink"."""
    return "hardlink" if b.kind == "file" and b.first != path else b.kind


class Change(NamedTuple):
    change: str
    path: bytes
    attributes: list[str]
    kind: str


def expected_changes(old: dict[bytes, B], new: dict[bytes, B]) -> list[Change]:
    out = []
    for p in old.keys() | new.keys():
        if p == b"":
            continue
        parent = p.rpartition(b"/")[0]
        if p not in new:
            if parent in new and new[parent].kind == "dir":
                out.append(Change("D", p, [], kind(p, old[p])))
        elif p not in old:
            out.append(Change("A", p, [], kind(p, new[p])))
        else:
            a = _attrs(p, old[p], new[p])
            if a:
                out.append(Change("C", p, a, kind(p, new[p])))
    return sorted(out, key=lambda c: ckey(c.path))


def expected_stat(old: dict[bytes, B], new: dict[bytes, B], changes: list[Change]) -> dict:
    def moved(a: dict[bytes, B], b: dict[bytes, B]) -> int:
        total = 0
        for p, e in a.items():
            if e.kind != "file" or e.first != p:
                continue  # an inode counts once, under its first name
            other = b.get(p)
            if other is None or other.kind != e.kind or (other.size, other.data) != (
                    e.size, e.data):
                total += e.size
        return total

    return {"added": sum(c.change == "A" for c in changes),
            "changed": sum(c.change == "C" for c in changes),
            "deleted": sum(c.change == "D" for c in changes),
            "bytes_added": moved(new, old), "bytes_removed": moved(old, new)}


def quoted(path: bytes) -> str:
    """How a path is printed: '/' + path, C-quoted as git does when it holds control
    characters (C0, DEL, C1 such as U+0085, and the line separators U+2028/9), '"', '\\'
    or bytes that are not UTF-8; quoted, every byte >= 0x7f is an octal escape."""
    p = b"/" + path
    try:
        text = p.decode("utf-8")
        if not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in '"\\'
                   for c in text):
            return text
    except UnicodeDecodeError:
        pass
    esc = {0x5C: "\\\\", 0x22: '\\"', 0x0A: "\\n", 0x09: "\\t"}
    return '"' + "".join(esc.get(b) or (f"\\{b:03o}" if b < 0x20 or b >= 0x7F else chr(b))
                         for b in p) + '"'


# -- running diff --------------------------------------------------------------------------


def cli_ok(store: Path, *args: str) -> str:
    proc = run_cli(store, *args)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    return proc.stdout.decode("utf-8")


def snap(store: Path, src: Path, *args: str) -> str:
    return cli_ok(store, "snapshot", str(src), *args).strip().splitlines()[-1]


def json_path(g: dict) -> bytes:
    """The exact bytes of a --json path (without the leading /)."""
    if "path_b64" in g:
        return base64.b64decode(g["path_b64"])[1:]
    return g["path"][1:].encode("utf-8")


def check_diff(store: Path, ref1: str, ref2: str, old: dict, new: dict,
               full: bool = True) -> dict:
    """Run diff REF1 REF2 plain and (if `full`) --json, --stat --json and --stat;
    compare each with the oracle. Returns the --stat numbers."""
    want = expected_changes(old, new)
    plain = cli_ok(store, "diff", ref1, ref2)
    assert plain.splitlines() == [f"{c.change} {quoted(c.path)}" for c in want]
    if not full:
        return {}
    got = json.loads(cli_ok(store, "diff", ref1, ref2, "--json"))
    assert [(json_path(g), g["change"], g["attributes"], g["kind"])
            for g in got] == [(c.path, c.change, c.attributes, c.kind) for c in want]
    assert all(g["path"].startswith("/") for g in got)
    st = json.loads(cli_ok(store, "diff", ref1, ref2, "--stat", "--json"))
    exp = expected_stat(old, new, want)
    assert {k: st[k] for k in exp} == exp
    return st


def chunk_ids(store: Path) -> dict[bytes, int]:
    with pylayers.Store.open(store, create=False) as s:
        return {cid: loc.length for cid, loc in s.iter_chunk_locations()}


def stored_file_bytes(store: Path, layer: str, before: dict[bytes, int]) -> int:
    """File data the layer added to the store, given the chunks before: new chunks (not
    the manifest's own), and the bytes of small files its manifest holds whose content
    is not the parent's at that path (a file named again, or made a hardlink group's
    first name, adds its bytes to the manifest again, but no new content)."""
    with pylayers.Store.open(store, create=False) as s:
        layers = pylayers.Layers(s)
        lid = bytes.fromhex(layer)
        rec = layers.record(lid)
        parent = {e.path: e for e in layers.tree(rec.parent)} if rec.parent else {}
        inline = 0
        for e in layers.entries(lid):
            old = parent.get(e.path)
            if old is not None and old.kind == HARDLINK:  # its group's file
                old = parent[old.target]
            if e.kind == REG and e.inline and not (
                    old is not None and old.kind == REG and old.content == e.content):
                inline += e.size
    manifest = {cid for cid, _ in rec.manifest}
    now = chunk_ids(store)
    return inline + sum(n for cid, n in now.items() if cid not in before and cid not in manifest)


# -- the random tree and its mutations -----------------------------------------------------

NAMES = [b"a", b"a.b", b"a-b", b"a0", b"a!", b"b", b"sp ace", b"new\nline", b"\xff\xfe",
         b"caf\xc3\xa9", b'q"uote', b"back\\slash", b"\x01ctl", b"z" * 60, b"c", b"d",
         b"nel\xc2\x85", b"sep\xe2\x80\xa8"]


class Mutator:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = os.fsencode(root)
        self.rng = rng
        self.log: list[str] = []

    def p(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def listing(self) -> dict[bytes, str]:
        return {rel: b.kind for rel, b in scan(Path(os.fsdecode(self.root))).items()}

    def pick(self, kinds: set[str], root_ok: bool = False) -> bytes | None:
        cands = sorted(r for r, k in self.listing().items() if k in kinds and (r or root_ok))
        return self.rng.choice(cands) if cands else None

    def new_name(self, parent: bytes) -> bytes:
        existing = set(os.listdir(self.p(parent)))
        name = self.rng.choice(NAMES)
        while name in existing:
            name = name + b"%d" % self.rng.randrange(10)
        return parent + b"/" + name if parent else name

    def content(self) -> bytes:
        size = self.rng.choice([0, 1, 100, 5000, 70_000, 300_000])
        return self.rng.randbytes(size)

    def write_file(self, rel: bytes) -> None:
        with open(self.p(rel), "wb") as f:
            f.write(self.content())

    def add_dir(self, rel: bytes, depth: int = 0) -> None:
        os.mkdir(self.p(rel))
        for _ in range(self.rng.randrange(3)):
            child = self.new_name(rel)
            if depth < 2 and self.rng.random() < 0.3:
                self.add_dir(child, depth + 1)
            else:
                self.write_file(child)

    def mutate(self) -> None:
        rng = self.rng
        op = rng.choice(["edit", "same_size", "chmod", "chown", "touch", "xattr", "rm",
                         "rmdir", "add_file", "add_dir", "add_symlink", "add_fifo",
                         "add_hardlink", "file_to_dir", "dir_to_file", "retarget",
                         "file_to_symlink", "break_link"])
        files, dirs = {"file"}, {"dir"}
        target = None
        if op == "edit":
            target = self.pick(files)
            if target:
                self.write_file(target)
        elif op == "same_size":
            target = self.pick(files)
            if target and os.path.getsize(self.p(target)):
                st = os.lstat(self.p(target))
                fd = os.open(self.p(target), os.O_WRONLY)
                os.pwrite(fd, bytes([rng.randrange(256) ^ 0x55]) * 3, st.st_size // 2)
                os.close(fd)
                os.truncate(self.p(target), st.st_size)
                os.utime(self.p(target), ns=(st.st_atime_ns, st.st_mtime_ns))
        elif op == "chmod":
            target = self.pick(files | dirs | {"fifo"}, root_ok=True)
            if target is not None:
                mode = rng.choice([0o644, 0o600, 0o755, 0o4755, 0o000, 0o1777, 0o2750, 0o555])
                os.chmod(self.p(target), mode if ROOT else mode | 0o700)
        elif op == "chown":
            target = self.pick(files | dirs | {"symlink", "fifo"})
            if target:
                os.chown(self.p(target), rng.choice(UIDS), rng.choice(GIDS),
                         follow_symlinks=False)
        elif op == "touch":
            target = self.pick(files | dirs | {"symlink", "fifo"}, root_ok=True)
            if target is not None:
                t = T + rng.randrange(10**12)
                os.utime(self.p(target), ns=(t, t), follow_symlinks=False)
        elif op == "xattr":
            target = self.pick(files | dirs)
            if target:
                p = self.p(target)
                have = os.listxattr(p)
                if have and rng.random() < 0.4:
                    os.removexattr(p, rng.choice(have))
                else:
                    os.setxattr(p, rng.choice(XATTRS),
                                rng.randbytes(rng.randrange(1, 20)))
        elif op == "rm":
            target = self.pick(files | {"symlink", "fifo"})
            if target:
                os.unlink(self.p(target))
        elif op == "rmdir":
            target = self.pick(dirs)
            if target:
                shutil.rmtree(self.p(target))
        elif op in ("add_file", "add_dir", "add_symlink", "add_fifo", "add_hardlink"):
            parent = self.pick(dirs, root_ok=True)
            target = self.new_name(parent)
            if op == "add_file":
                self.write_file(target)
            elif op == "add_dir":
                self.add_dir(target)
            elif op == "add_symlink":
                os.symlink(rng.choice([b"a", b"../x", b"/etc/hostname", b"\xffnowhere"]),
                           self.p(target))
            elif op == "add_fifo":
                os.mkfifo(self.p(target))
            else:
                src = self.pick(files)
                if src:
                    os.link(self.p(src), self.p(target))
        elif op == "file_to_dir":
            target = self.pick(files)
            if target:
                os.unlink(self.p(target))
                self.add_dir(target)
        elif op == "dir_to_file":
            target = self.pick(dirs)
            if target:
                shutil.rmtree(self.p(target))
                self.write_file(target)
        elif op == "retarget":
            target = self.pick({"symlink"})
            if target:
                os.unlink(self.p(target))
                os.symlink(b"t%d" % rng.randrange(1000), self.p(target))
        elif op == "file_to_symlink":
            target = self.pick(files)
            if target:
                os.unlink(self.p(target))
                os.symlink(b"was a file", self.p(target))
        elif op == "break_link":  # a name of a hardlinked inode gets its own copy
            multi = [r for r, b in scan(Path(os.fsdecode(self.root))).items()
                     if b.kind == "file" and os.lstat(self.p(r)).st_nlink > 1]
            if multi:
                target = rng.choice(sorted(multi))
                data = open(self.p(target), "rb").read()
                os.unlink(self.p(target))
                with open(self.p(target), "wb") as f:
                    f.write(data)
        self.log.append(f"{op} {target!r}")

    def round(self, n: int) -> None:
        """n mutations; in about half the rounds directories get their mtimes back, so
        that only their set of entries tells that they changed."""
        restore = self.rng.random() < 0.5
        before = {r: os.lstat(self.p(r)).st_mtime_ns
                  for r, k in self.listing().items() if k == "dir"}
        for _ in range(n):
            self.mutate()
        if restore:
            for r, k in self.listing().items():
                if k == "dir" and r in before:
                    os.utime(self.p(r), ns=(before[r], before[r]))


def initial_tree(root: Path, rng: random.Random) -> None:
    m = Mutator(root, rng)
    os.mkdir(root)
    for _ in range(6):
        m.write_file(m.new_name(b""))
    for _ in range(3):
        m.add_dir(m.new_name(b""))
    d = m.new_name(b"")
    os.mkdir(m.p(d))
    os.symlink(b"a", m.p(d + b"/link"))
    os.mkfifo(m.p(d + b"/fifo"))
    f = m.pick({"file"})
    os.link(m.p(f), m.p(d + b"/hard"))


@pytest.mark.parametrize("seed", [1, 2])
def test_diff_matches_brute_force_over_random_rounds(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    src = tmp_path / "src"
    store = tmp_path / "store"
    initial_tree(src, rng)
    states = [scan(src)]
    layers = [snap(store, src)]
    exact = [describe_tree(src)]
    # a layer against itself, and against its own directory: nothing
    assert cli_ok(store, "diff", layers[0], layers[0]) == ""
    assert cli_ok(store, "diff", layers[0], str(src)) == ""
    m = Mutator(src, rng)
    for rnd in range(4):
        m.round(rng.randrange(3, 8))
        new = scan(src)
        old = states[-1]
        assert new != old, m.log
        # the directory side first (nothing is stored), then the layer side
        before = chunk_ids(store)
        from_dir = check_diff(store, layers[-1], str(src), old, new)
        assert chunk_ids(store) == before, "diff against a directory stored something"
        layer = snap(store, src, "--parent", layers[-1])
        stored = stored_file_bytes(store, layer, before)
        assert from_dir["new_bytes"] == stored, (rnd, m.log)
        from_layers = check_diff(store, layers[-1], layer, old, new)
        assert from_layers["new_bytes"] == stored, (rnd, m.log)
        if rnd % 2:  # backwards
            check_diff(store, layer, layers[-1], new, old, full=False)
        states.append(new)
        layers.append(layer)
        # and each layer checks out as exactly the tree it was taken of
        exact.append(describe_tree(src))
        checkout(store, layer, tmp_path / f"co{rnd}")
        assert_same_tree(exact[-1], tmp_path / f"co{rnd}")
    checkout(store, layers[0], tmp_path / "co-first")
    assert_same_tree(exact[0], tmp_path / "co-first")
    check_diff(store, layers[0], layers[-1], states[0], states[-1])
    check_diff(store, layers[0], str(src), states[0], states[-1], full=False)
    check_diff(store, layers[-1] + "~3", layers[-1] + "~1", states[-4], states[-2],
               full=False)


def test_sort_order_puts_slash_before_every_other_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    store = tmp_path / "store"
    base = snap(store, src)
    names = [b"a!", b"a b", b"a-b", b"a.b", b"a0", b"a\x01", b"a\n", b"ab", b"a"]
    for n in names:
        (src / os.fsdecode(n)).write_bytes(n)
    os.remove(src / "a")
    (src / "a").mkdir()
    (src / "a" / "b").write_bytes(b"")
    (src / "a" / "b.c").write_bytes(b"")
    lines = cli_ok(store, "diff", base, str(src)).splitlines()
    # component order: a, a/b, a/b.c, then a\x01, a\n, "a b", a!, a-b, a.b, a0, ab
    assert lines == ["A /a", "A /a/b", "A /a/b.c", 'A "/a\\001"', 'A "/a\\n"', "A /a b",
                     "A /a!", "A /a-b", "A /a.b", "A /a0", "A /ab"]
    # which is not byte order of the whole path, where "!" (0x21) < "/" (0x2f)
    assert sorted([b"a/b", b"a!"]) == [b"a!", b"a/b"]


def test_hardlinked_inode_change_shows_on_every_name(tmp_path: Path) -> None:
    need_root("chown")
    src = tmp_path / "src"
    src.mkdir()
    (src / "one").write_bytes(b"x" * 1000)
    (src / "sub").mkdir()
    os.link(src / "one", src / "sub" / "two")
    os.link(src / "one", src / "three")
    store = tmp_path / "store"
    base = snap(store, src)
    old = scan(src)
    os.chown(src / "one", 4321, 8765)
    os.setxattr(src / "one", "user.k", b"v")
    os.utime(src / "one", ns=(T, T))
    new = scan(src)
    assert cli_ok(store, "diff", base, str(src)).splitlines() == \
        ["C /one", "C /sub/two", "C /three"]
    check_diff(store, base, str(src), old, new)
    got = json.loads(cli_ok(store, "diff", base, str(src), "--json"))
    assert [g["attributes"] for g in got] == [["owner", "mtime", "xattrs"]] * 3
    # the first name goes: the next name becomes the file (a "link" change only)
    layer = snap(store, src, "--parent", base)
    os.unlink(src / "one")
    now = scan(src)
    check_diff(store, layer, str(src), new, now)
    got = json.loads(cli_ok(store, "diff", layer, str(src), "--json"))
    assert [(g["path"], g["change"], g["attributes"]) for g in got] == [
        ("/one", "D", []), ("/sub/two", "C", ["link"]), ("/three", "C", ["link"])]


def test_directory_replaced_by_a_file_counts_its_bytes_removed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f" * 5000)
    (src / "d" / "e" / "g").write_bytes(b"g" * 7000)
    (src / "keep").write_bytes(b"k" * 300)
    store = tmp_path / "store"
    base = snap(store, src)
    old = scan(src)
    shutil.rmtree(src / "d")
    (src / "d").write_bytes(b"now a file")
    os.chmod(src / "keep", 0o600)  # metadata only: no bytes either way
    new = scan(src)
    st = check_diff(store, base, str(src), old, new)
    assert (st["bytes_added"], st["bytes_removed"]) == (10, 12000)
    assert cli_ok(store, "diff", base, str(src)).splitlines() == ["C /d", "C /keep"]
    text = cli_ok(store, "diff", base, str(src), "--stat")
    assert text.startswith("0 added, 2 changed, 0 deleted; +10 B -11.7 KiB; 10 B new in store")


def test_directory_with_only_its_entries_changed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_bytes(b"o")
    os.utime(src / "d", ns=(T, T))
    store = tmp_path / "store"
    base = snap(store, src)
    old = scan(src)
    os.rename(src / "d" / "old", src / "d" / "new")
    os.utime(src / "d", ns=(T, T))
    new = scan(src)
    check_diff(store, base, str(src), old, new)
    got = json.loads(cli_ok(store, "diff", base, str(src), "--json"))
    assert [(g["path"], g["change"], g["attributes"]) for g in got] == [
        ("/d", "C", ["entries"]), ("/d/new", "A", []), ("/d/old", "D", [])]


def test_json_paths_round_trip_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    store = tmp_path / "store"
    base = snap(store, src)
    names = [b"\xff\xfe", b"new\nline", b"caf\xc3\xa9", b'q"', b"tab\there", b"nel\xc2\x85",
             b"csi\xc2\x9b31m", b"sep\xe2\x80\xa8", b"esc\x1b[0m"]
    for n in names:
        (src / os.fsdecode(n)).write_bytes(b"")
    got = json.loads(cli_ok(store, "diff", base, str(src), "--json"))
    assert sorted(json_path(g) for g in got) == sorted(names)
    # a name that is not UTF-8 carries its exact bytes; one that is carries none
    assert [g["path"] for g in got if "path_b64" in g] == ["/\ufffd\ufffd"]
    assert {g["kind"] for g in got} == {"file"}
    plain = cli_ok(store, "diff", base, str(src)).splitlines()
    assert len(plain) == len(names)  # one line per path, newline or not
    assert 'A "/caf\\303\\251"' not in plain and "A /café" in plain
    assert 'A "/\\377\\376"' in plain and 'A "/new\\nline"' in plain
    # C1 controls and line separators are control characters too: quoted
    assert 'A "/nel\\302\\205"' in plain and 'A "/csi\\302\\23331m"' in plain
    assert 'A "/sep\\342\\200\\250"' in plain and 'A "/esc\\033[0m"' in plain
