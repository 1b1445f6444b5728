"""`--json` on every read command, in the one schema of docs/cli.md: the same keys for
the same thing in every verb, and file names that are not UTF-8 carried exactly
(`path_b64`), names that are carried as plain text.

Real stores in tmp_path; the CLI is the installed `pylayers` command in a subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PYLAYERS = Path(sys.executable).parent / "pylayers"
LAYER_KEYS = {"id", "parent", "tags", "created", "message", "entries", "file_bytes",
              "new_bytes", "manifest_bytes", "manifest_chunks"}
BAD = b"caf\xe9-\xff"  # Latin-1, not UTF-8


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYLAYERS), "--store", str(store), *args], capture_output=True,
                          timeout=120, cwd=store.parent)


def js(store: Path, *args: str, code: int = 0):
    proc = cli(store, *args, "--json")
    assert proc.returncode == code, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def exact(d: dict, key: str = "path") -> bytes:
    if key + "_b64" in d:
        return base64.b64decode(d[key + "_b64"])
    return d[key].encode("utf-8")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path, str, str]:
    base = tmp_path_factory.mktemp("json")
    src = base / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    (src / "etc" / "shadow").write_text("s\n")
    store = base / "store"
    run = [str(PYLAYERS), "--store", str(store), "snapshot", str(src)]
    one = subprocess.run(run + ["--tag", "base", "-m", "first"], capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    os.symlink(BAD, os.path.join(os.fsencode(src), b"link-" + BAD))
    with open(os.path.join(os.fsencode(src), BAD), "wb") as f:
        f.write(b"latin-1 name\n")
    (src / "etc" / "motd").write_text("hello again\n")
    two = subprocess.run(run + ["--parent", "base", "--tag", "v2"], capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    return store, src, one, two


def test_layers_log_show_share_the_layer_schema(store) -> None:
    st, _src, one, two = store
    layers = js(st, "layers")
    log = js(st, "log", "v2")
    show = js(st, "show", "v2")
    assert [r["id"] for r in log] == [two, one]
    assert {r["id"] for r in layers} == {one, two}
    for row in (*layers, *log, show):
        assert set(row) == LAYER_KEYS, row
    assert show == log[0] == next(r for r in layers if r["id"] == two)
    assert show["parent"] == one and show["tags"] == ["v2"]
    assert log[1]["parent"] is None and log[1]["message"] == "first"


def test_tags(store) -> None:
    st, _src, one, two = store
    assert js(st, "tags") == [{"tag": "base", "id": one}, {"tag": "v2", "id": two}]


def test_ls_carries_non_utf8_names_exactly(store) -> None:
    st, *_ = store
    rows = js(st, "ls", "v2")
    by_name = {exact(r): r for r in rows}
    assert set(by_name) == {b"/" + BAD, b"/link-" + BAD, b"/etc"}
    bad = by_name[b"/" + BAD]
    assert "path_b64" in bad and "\ufffd" in bad["path"] and bad["kind"] == "file"
    link = by_name[b"/link-" + BAD]
    assert link["kind"] == "symlink" and exact(link, "target") == BAD
    assert "path_b64" not in by_name[b"/etc"] and by_name[b"/etc"]["kind"] == "dir"
    assert set(bad) >= {"path", "kind", "mode", "uid", "gid", "size", "mtime_ns"}


def test_diff_and_stat(store) -> None:
    st, src, *_ = store
    changes = js(st, "diff", "base", "v2")
    assert [(exact(c), c["change"], c["kind"]) for c in changes] == [
        (b"/" + BAD, "A", "file"), (b"/etc/motd", "C", "file"),
        (b"/link-" + BAD, "A", "symlink")]
    assert changes[1]["attributes"][0] == "content" and "path_b64" not in changes[1]
    stat = js(st, "diff", "base", "v2", "--stat")
    assert set(stat) == {"added", "changed", "deleted", "bytes_added", "bytes_removed",
                         "new_bytes"}
    assert js(st, "diff", "v2", str(src)) == []


def test_du_gc_fsck_snapshots(store) -> None:
    st, *_ = store
    du = js(st, "du")
    assert du["stored_bytes"] >= du["pack_bytes"] + du["index_bytes"]
    assert "new_bytes" not in du and du["dedup_ratio"] >= 1.0
    assert js(st, "snapshots") == []
    fsck = js(st, "fsck")
    assert fsck["ok"] is True and fsck["damaged"] == [] and fsck["layers_checked"] == 2
    gc = js(st, "gc")
    assert gc["chunks"] == 0 and gc["snapshots"] == [] and "bytes_freed" in gc


def test_docs_name_every_key(store) -> None:
    """docs/cli.md shows each key a verb prints."""
    st, *_ = store
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    keys = set(LAYER_KEYS) | set(js(st, "du")) | set(js(st, "gc")) | set(js(st, "fsck"))
    keys |= set(js(st, "ls", "v2")[0]) | set(js(st, "diff", "base", "v2", "--stat"))
    for k in keys:
        assert f'"{k}"' in doc, k
