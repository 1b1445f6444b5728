"""Build cache keys (pylayers.build) on a real store and real files.

What the keys must do (BuildKit's rules, docs/format.md "Build cache keys"): cover the
parent key, the instruction text and options, and for each input file its type, mode,
owner, size, content, link target and xattrs, but not its mtime; a changed file is never
missed, even one edited in place to the same size with its mtime put back (the stat cache
may only vouch for a file whose ctime and inode are unchanged); one miss changes every
later key; keys are the same in another process; gc drops keys whose layer is gone.
Misses are explained by naming what differs from the closest earlier key.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

import pylayers
from pylayers.build import BuildCache, CacheKey, cache_key, checksum_inputs

COPY = "COPY ctx /app"


def write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    """A build context: files, a subdirectory, a symlink."""
    root = tmp_path / "ctx"
    write(root / "main.py", "print('hello')\n")
    write(root / "lib" / "util.py", "def f():\n    return 1\n")
    write(root / "README", "read me\n")
    os.symlink("main.py", root / "link")
    return root


@pytest.fixture
def store(tmp_path: Path):
    st = pylayers.Store.open(tmp_path / "store")
    yield st
    st.close()


_n = 0


def make_layer(st: pylayers.Store, tmp_path: Path) -> bytes:
    """A real layer (what a builder would have built for a step)."""
    global _n
    _n += 1
    d = tmp_path / f"built{_n}"
    write(d / "out", f"build output {_n}\n")
    return pylayers.Layers(st).snapshot(d).layer_id


def copy_key(st, parent, ctx: Path, options=None, instruction: str = COPY) -> CacheKey:
    return cache_key(parent, instruction, [(ctx, "/app")], options, store=st)


def cached(st, tmp_path, parent, ctx) -> tuple[BuildCache, CacheKey, bytes]:
    """A key for COPY ctx /app recorded with a layer; checks it hits."""
    cache = BuildCache(st)
    key = copy_key(st, parent, ctx)
    assert cache.get(key) is None
    layer = make_layer(st, tmp_path)
    cache.put(key, layer)
    assert cache.get(key) == layer
    return cache, key, layer


def assert_miss(cache: BuildCache, old: CacheKey, new: CacheKey, *expected: str) -> str:
    assert new != old and new.digest != old.digest
    assert cache.get(new) is None
    why = cache.explain_miss(new)
    for text in expected:
        assert text in why, why
    return why


# -- metadata that counts, and mtime that does not -------------------------------------


def test_touch_does_not_miss(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, layer = cached(store, tmp_path, base, ctx)
    for p in (ctx / "main.py", ctx / "lib", ctx / "lib" / "util.py", ctx):
        os.utime(p, ns=(1_000_000_000, 1_234_567_891_000_000_000))
    os.utime(ctx / "link", ns=(5, 5), follow_symlinks=False)
    again = copy_key(store, base, ctx)
    assert again == key
    assert cache.get(again) == layer


def test_chmod_misses_and_is_explained_as_mode(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    os.chmod(ctx / "main.py", 0o755)
    why = assert_miss(cache, key, copy_key(store, base, ctx), "/app/main.py: mode 0644 -> 0755")
    assert "content" not in why and "README" not in why
    os.chmod(ctx / "main.py", 0o644)
    assert copy_key(store, base, ctx) == key


def test_directory_mode_misses(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    os.chmod(ctx / "lib", 0o700)
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/lib: mode 0755 -> 0700")


def test_content_change_misses_and_is_explained(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    write(ctx / "lib" / "util.py", "def f():\n    return 2 + 40\n")
    assert_miss(cache, key, copy_key(store, base, ctx),
                "/app/lib/util.py: content changed (size 22 -> 27)")


def test_same_size_edit_with_mtime_put_back_is_not_hidden_by_the_walk_cache(
        store, tmp_path, ctx):
    # Let every ctime age past the racy window, then snapshot the context: the walk
    # cache now vouches for each file by inode, size, mtime and ctime.
    time.sleep(1.1)
    pylayers.Layers(store).snapshot(ctx)
    with store.read() as t:
        assert t.walkcache.count() == 1
    first = checksum_inputs([(ctx, "/app")], store=store)
    assert first.cache_hits == 3 and first.bytes_read == 0  # the cache is in play
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)

    p = ctx / "main.py"
    before = os.stat(p)
    with open(p, "r+b") as f:  # same inode, same size
        f.write(b"PRINT")
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(p)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)

    scanned = checksum_inputs([(ctx, "/app")], store=store)
    assert scanned.cache_hits == 2 and scanned.bytes_read == before.st_size
    new = copy_key(store, base, ctx)
    why = assert_miss(cache, key, new, "/app/main.py: content changed")
    assert "size" not in why and "mode" not in why
    # the key made with the stat cache is the key made by reading everything
    assert cache_key(base, COPY, [(ctx, "/app")]) == new


def test_chown_misses(store, tmp_path, ctx):
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    os.chown(ctx / "main.py", 1234, 0)
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/main.py: owner 0:0 -> 1234:0")
    os.chown(ctx / "main.py", 0, 0)
    os.lchown(ctx / "link", 0, 4321)
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/link: owner 0:0 -> 0:4321")


def test_xattr_change_misses(store, tmp_path, ctx):
    p = ctx / "main.py"
    try:
        os.setxattr(p, "user.origin", b"one")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"no user xattrs here: {e.strerror}")
        raise
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    os.setxattr(p, "user.origin", b"two")
    k2 = copy_key(store, base, ctx)
    assert_miss(cache, key, k2, "/app/main.py: xattr 'user.origin' value changed")
    os.removexattr(p, "user.origin")
    assert_miss(cache, key, copy_key(store, base, ctx),
                "/app/main.py: xattr 'user.origin' removed")
    os.setxattr(ctx / "README", "user.new", b"")
    os.setxattr(p, "user.origin", b"one")
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/README: xattr 'user.new' added")


def test_symlink_target_change_misses(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    os.unlink(ctx / "link")
    os.symlink("README", ctx / "link")
    assert_miss(cache, key, copy_key(store, base, ctx),
                "/app/link: link target 'main.py' -> 'README'")


def test_type_change_misses(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    os.unlink(ctx / "link")
    write(ctx / "link", "main.py", 0o777)  # a file holding what the link pointed to
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/link: type symlink -> file")


def test_added_and_removed_files_miss(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    write(ctx / "lib" / "extra.py", "")
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/lib/extra.py: file added")
    os.unlink(ctx / "lib" / "extra.py")
    assert copy_key(store, base, ctx) == key
    os.unlink(ctx / "README")
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/README: file removed")


def test_hardlinked_content_change_misses(store, tmp_path, ctx):
    os.link(ctx / "README", ctx / "lib" / "README.link")
    base = make_layer(store, tmp_path)
    cache, key, _ = cached(store, tmp_path, base, ctx)
    with open(ctx / "lib" / "README.link", "r+b") as f:
        f.write(b"R")
    assert_miss(cache, key, copy_key(store, base, ctx), "/app/README: content changed",
                "/app/lib/README.link: content changed")


def test_single_file_input_named_by_destination(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache = BuildCache(store)
    inputs = [(ctx / "main.py", "/srv/app.py"), (ctx / "lib", "/srv/lib")]
    key = cache_key(base, "COPY main.py lib /srv/", inputs, store=store)
    cache.put(key, make_layer(store, tmp_path))
    os.chmod(ctx / "main.py", 0o600)
    new = cache_key(base, "COPY main.py lib /srv/", inputs, store=store)
    assert_miss(cache, key, new, "/srv/app.py: mode 0644 -> 0600")
    # the order of inputs matters (a later one may overwrite an earlier one)
    assert cache_key(base, "COPY main.py lib /srv/", inputs[::-1]) != new


# -- instruction, options, parents --------------------------------------------------------


def test_instruction_text_change_misses_and_is_explained(store, tmp_path):
    base = make_layer(store, tmp_path)
    cache = BuildCache(store)
    a = cache_key(base, "RUN a", store=store)
    cache.put(a, make_layer(store, tmp_path))
    assert cache_key(base, "RUN a", store=store) == a
    b = cache_key(base, "RUN b", store=store)
    assert_miss(cache, a, b, "instruction text differs: 'RUN a' vs 'RUN b'")
    # on another base layer, the same text misses too, and says why
    other = make_layer(store, tmp_path)
    assert_miss(cache, a, cache_key(other, "RUN a"),
                f"base layer {base.hex()[:12]} -> base layer {other.hex()[:12]}")


def test_options_change_misses(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache = BuildCache(store)
    key = copy_key(store, base, ctx, {"chown": "0:0", "link": False})
    cache.put(key, make_layer(store, tmp_path))
    assert copy_key(store, base, ctx, {"link": False, "chown": "0:0"}) == key  # order-free
    assert_miss(cache, key, copy_key(store, base, ctx, {"chown": "1000:1000", "link": False}),
                'option chown: "0:0" -> "1000:1000"')
    assert_miss(cache, key, copy_key(store, base, ctx, {"chown": "0:0"}),
                "option link removed")
    assert copy_key(store, base, ctx, None) == copy_key(store, base, ctx, {})


def test_one_miss_invalidates_every_later_step(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    cache = BuildCache(store)
    other = tmp_path / "other"
    write(other / "conf", "x=1\n")

    def steps():
        k1 = copy_key(store, base, ctx)
        k2 = cache_key(k1, "RUN make", store=store)
        k3 = cache_key(k2, "COPY other /etc/app", [(other, "/etc/app")], store=store)
        return [k1, k2, k3]

    first = steps()
    for k in first:
        cache.put(k, make_layer(store, tmp_path))
    assert steps() == first  # nothing changed: every step hits
    assert all(cache.get(k) is not None for k in first)

    write(ctx / "main.py", "print('changed')\n")
    second = steps()
    for old, new in zip(first, second, strict=True):
        assert new != old and cache.get(new) is None
    assert "/app/main.py: content changed" in cache.explain_miss(second[0])
    for k in second[1:]:
        assert "the parent step missed" in cache.explain_miss(k), cache.explain_miss(k)


def test_parent_kinds_are_distinct(store, tmp_path):
    layer = make_layer(store, tmp_path)
    as_layer = cache_key(layer, "RUN a")
    as_key = cache_key(CacheKey(layer), "RUN a")
    assert len({as_layer, as_key, cache_key(None, "RUN a")}) == 3


# -- the store: put, gc, other processes -------------------------------------------------


def test_put_needs_an_existing_layer(store, tmp_path):
    with pytest.raises(pylayers.NotFound):
        BuildCache(store).put(cache_key(None, "RUN a"), b"\x01" * 32)
    with store.read() as t:
        assert t.cachekeys.count() == 0


def run_cli(store_path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylayers", "--store", str(store_path), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_gc_removes_keys_of_removed_layers(tmp_path, ctx):
    store_path = tmp_path / "store"
    with pylayers.Store.open(store_path) as st:
        base = make_layer(st, tmp_path)
        cache = BuildCache(st)
        gone = copy_key(st, base, ctx)
        kept = cache_key(gone, "RUN make", store=st)
        gone_layer, kept_layer = make_layer(st, tmp_path), make_layer(st, tmp_path)
        cache.put(gone, gone_layer)
        cache.put(kept, kept_layer)
        with st.read() as t:
            assert t.cachekeys.count() == 4  # two records, two index entries

    proc = run_cli(store_path, "rm", gone_layer.hex(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with pylayers.Store.open(store_path) as st:
        cache = BuildCache(st)
        assert cache.get(gone) is None  # a hit only while the layer exists
        assert cache.get(kept) == kept_layer
        assert "which has been removed" in cache.explain_miss(gone)
    proc = run_cli(store_path, "gc", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    with pylayers.Store.open(store_path) as st:
        cache = BuildCache(st)
        assert cache.get(gone) is None and cache.record(gone) is None
        assert cache.get(kept) == kept_layer
        with st.read() as t:
            keys = [k for k, _ in t.cachekeys.items()]
            entries = t.cachekeys.count()
        # gone: its record and its index entry; kept: both (its index entry names its
        # parent, the gone key, which is fine)
        assert keys == [kept.digest] and entries == 2


_CHILD = """
import json, sys
import pylayers
from pylayers.build import cache_key
store, ctx, base = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
out = {}
with pylayers.Store.open(store) as st:
    k1 = cache_key(base, "COPY ctx /app", [(ctx, "/app")], {"chown": "1:1"}, store=st)
    k2 = cache_key(k1, "RUN make")
    k3 = cache_key(k2, "COPY main.py /", [(ctx + "/main.py", "/main.py")], store=st)
out["with_store"] = [k.hex for k in (k1, k2, k3)]
out["without_store"] = cache_key(base, "COPY ctx /app", [(ctx, "/app")], {"chown": "1:1"}).hex
print(json.dumps(out))
"""


def test_keys_are_stable_across_processes(store, tmp_path, ctx):
    base = make_layer(store, tmp_path)
    k1 = copy_key(store, base, ctx, {"chown": "1:1"})
    k2 = cache_key(k1, "RUN make", store=store)
    k3 = cache_key(k2, "COPY main.py /", [(ctx / "main.py", "/main.py")], store=store)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "store"), str(ctx),
                           base.hex()], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["with_store"] == [k.hex for k in (k1, k2, k3)]
    assert out["without_store"] == k1.hex


# -- the documented encoding, independently ------------------------------------------------


def documented_key(parent_kind: int, parent: bytes, instruction: str, options: str,
                   inputs: list[tuple[bytes, str]]) -> bytes:
    """docs/format.md "Build cache keys", from lstat and the standard library only."""
    def lp(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    out = [b"pylayers build cache key v1\0", bytes([parent_kind]), parent,
           lp(instruction.encode()), lp(options.encode()), struct.pack("<I", len(inputs))]
    for src, name in inputs:
        records: list[bytes] = []

        def visit(path: bytes, rel: bytes, records: list[bytes] = records) -> None:
            st = os.lstat(path)
            m = st.st_mode
            kind = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 3,
                    stat.S_IFIFO: 7}[stat.S_IFMT(m)]
            size, content, target = 0, bytes(32), b""
            if kind == 1:
                data = open(path, "rb").read()
                size, content = len(data), blake3.blake3(data).digest()
            if kind == 3:
                target = os.readlink(path)
            xattrs = sorted((n.encode(), os.getxattr(path, n, follow_symlinks=False))
                            for n in os.listxattr(path, follow_symlinks=False))
            rec = [lp(rel), struct.pack("<BIIIQ", kind, stat.S_IMODE(m), st.st_uid,
                                        st.st_gid, size), content, lp(target),
                   struct.pack("<IIH", 0, 0, len(xattrs))]
            rec += [struct.pack("<HI", len(n), len(v)) + n + v for n, v in xattrs]
            records.append(b"".join(rec))
            if kind == 2:
                for child in sorted(os.listdir(path)):
                    visit(path + b"/" + child, rel + b"/" + child if rel else child)

        visit(src, b"")
        out += [lp(name.encode()), struct.pack("<I", len(records)), *records]
    return blake3.blake3(b"".join(out)).digest()


def test_key_matches_the_documented_encoding(store, tmp_path, ctx):
    try:
        os.setxattr(ctx / "lib" / "util.py", "user.b", b"\x00\x01")
        os.setxattr(ctx / "lib" / "util.py", "user.a", b"va")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"no user xattrs here ({e.strerror}): the encoding of xattrs is "
                        "part of what this test checks")
        raise
    assert sorted(os.listxattr(ctx / "lib" / "util.py")) == ["user.a", "user.b"]
    os.mkfifo(ctx / "lib" / "fifo")
    write(ctx / "lib" / "empty", "")
    write(ctx / "lib.d", "sorts after lib/ in component order", 0o600)
    base = make_layer(store, tmp_path)
    inputs = [(os.fsencode(ctx), "/app"), (os.fsencode(ctx / "README"), "/README")]
    opts = {"chown": "1:2", "from": None, "exclude": ["*.pyc", "é"], "link": True}
    key = cache_key(base, "COPY . /app", inputs, opts, store=store)
    opts_json = '{"chown":"1:2","exclude":["*.pyc","\\u00e9"],"from":null,"link":true}'
    assert key.digest == documented_key(2, base, "COPY . /app", opts_json, inputs)
    assert cache_key(None, "RUN x").digest == documented_key(0, bytes(32), "RUN x", "{}", [])
    assert cache_key(key, "RUN x").digest == documented_key(1, key.digest, "RUN x", "{}", [])
