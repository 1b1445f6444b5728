"""A checkout writes a file of several chunks up to `checkout.GATHER_MAX` bytes by
gathering its chunks into one buffer and making the file in one C call (a larger one
chunk by chunk, as before): the same bytes, holes, mode and mtime either way, through
both readers (a thread, a reader process); a file whose chunks do not add up to its
size is refused in one line, leaving no file. Real stores, real files."""

from __future__ import annotations

import os
import random
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hostile import raw_manifest, store_file, store_manifest  # noqa: E402
from test_materialise_views import _expected, _holes  # noqa: E402

from pylayers.errors import CorruptData  # noqa: E402
from pylayers.layers import checkout as checkout_mod  # noqa: E402
from pylayers.layers.manifest import DIR, REG, Entry, pack_chunks  # noqa: E402
from pylayers.layers.repo import Layers  # noqa: E402
from pylayers.store import Store  # noqa: E402

MiB = 1 << 20


def _files(root: Path) -> dict[str, bytes]:
    rnd = random.Random(3)
    files = {
        "dense": rnd.randbytes(3 * MiB),
        "holes": bytes(1 * MiB) + rnd.randbytes(700_000) + bytes(2 * MiB) + b"end",
        "zeros": bytes(2 * MiB),
        "tail-zeros": rnd.randbytes(500_000) + bytes(1 * MiB + 123),
        "big": rnd.randbytes(5 * MiB) + bytes(3 * MiB) + rnd.randbytes(1 * MiB),
    }
    root.mkdir()
    for n, (name, data) in enumerate(sorted(files.items())):
        p = root / name
        p.write_bytes(data)
        os.chmod(p, 0o640 + n % 2)
        os.utime(p, ns=(1_600_000_000_000_000_000 + n, 1_600_000_000_000_000_000 + n))
    return files


@pytest.mark.parametrize("process", [False, True], ids=["thread", "reader-process"])
@pytest.mark.parametrize("gather", [0, 6 * MiB, 64 * MiB], ids=["none", "some", "all"])
def test_gathered_files_are_the_files(tmp_path: Path, monkeypatch, process: bool,
                                      gather: int) -> None:
    monkeypatch.setattr(checkout_mod, "GATHER_MAX", gather)
    src = tmp_path / "src"
    files = _files(src)
    with Store.open(tmp_path / "store") as s:
        layers = Layers(s)
        lid = layers.snapshot(src).layer_id
        tree = layers.tree(lid)
        assert all(e.chunk_count() > 1 for e in tree if e.kind == REG)
        dest = tmp_path / "out"
        layers.checkout(lid, dest, reader_process=process)
    for name, data in files.items():
        got, want = dest / name, src / name
        assert got.read_bytes() == data, name
        st, sw = os.stat(got), os.stat(want)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == \
            (stat.S_IMODE(sw.st_mode), sw.st_mtime_ns), name
        assert _holes(got) == _expected(data, got), name  # all-zero blocks: holes


@pytest.mark.parametrize("process", [False, True], ids=["thread", "reader-process"])
def test_chunks_that_do_not_add_up_are_refused(tmp_path: Path, process: bool) -> None:
    """The entry lists chunk A as 1000 bytes; A holds 1500 (its id is right): the
    entry's size is 3000, the chunks give 3500."""
    rnd = random.Random(4)
    a, b = rnd.randbytes(1500), rnd.randbytes(2000)
    with Store.open(tmp_path / "store") as s:
        ca, _ = store_file(s, a)
        cb, _ = store_file(s, b)
        f = Entry(b"f", REG, 0o644, os.getuid(), os.getgid(), 0, 3000, bytes(32),
                  pack_chunks([(ca, 1000), (cb, 2000)]))
        # 17 MiB more: the CLI's size for a reader process (READ_PROCESS_MIN)
        content, chunks = store_file(s, rnd.randbytes(17 * MiB))
        pad = Entry(b"pad", REG, 0o644, os.getuid(), os.getgid(), 0, 17 * MiB, content,
                    chunks)
        lid = store_manifest(s, raw_manifest(None, [Entry(b"", DIR, 0o755), f, pad]))
        dest = tmp_path / "out"
        with pytest.raises(CorruptData) as info:
            Layers(s).checkout(lid, dest, reader_process=process)
    assert len(str(info.value).splitlines()) == 1, info.value
    assert not (dest / "f").exists()
