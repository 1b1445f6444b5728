"""`pylayers diff`."""

from __future__ import annotations

import bisect
import json
import os

import click

from ..display import one_line
from ..layers.manifest import KIND_NAMES, REG, Entry
from ..layers.repo import Layers
from ..layers.scan import Scanner
from ..layers.tree import diff_trees
from .app import cli, display_path, human, open_layers


def _tree_of(layers: Layers, ref: str, new_chunks: dict[bytes, int]) -> list[Entry]:
    """A layer's tree, or a directory's scanned without storing anything (chunks that
    the store lacks are collected in `new_chunks`)."""
    if os.path.isdir(ref):
        store = layers.store

        def sink(cid: bytes, data) -> bool:
            if cid in new_chunks or store.has_chunk(cid):
                return False
            new_chunks[cid] = len(data)
            return True

        scanner = Scanner(store, store.config.chunker, sink)
        tree = scanner.scan(ref)
        for w in scanner.stats.warnings:
            click.echo(f"pylayers: warning: {one_line(w)}", err=True)
        return tree
    return layers.tree(layers.resolve(ref))


def _subtree_bytes(tree: list[Entry], keys: list[bytes], root: Entry) -> int:
    """Bytes of the regular files at and under `root` (`keys`: the tree's sort keys).
    The subtree is contiguous in component order: no scan of the whole tree per call."""
    i = bisect.bisect_left(keys, root.key)
    prefix = root.key + b"\x00"
    total = 0
    while i < len(tree) and (tree[i] is root or keys[i].startswith(prefix)):
        if tree[i].kind == REG:
            total += tree[i].size
        i += 1
    return total


@cli.command()
@click.argument("ref1")
@click.argument("ref2")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of changes.")
@click.option("--stat", "as_stat", is_flag=True, help="Sum up bytes added, removed and new.")
@click.pass_context
def diff(ctx: click.Context, ref1: str, ref2: str, as_json: bool, as_stat: bool) -> None:
    """What changed from REF1 to REF2 (REF2 may be a directory, compared without
    storing): `A`dded, `C`hanged or `D`eleted paths, sorted by path."""
    with open_layers(ctx, create=False) as layers:
        from_dir = os.path.isdir(ref2)
        new_chunks: dict[bytes, int] = {}
        old = _tree_of(layers, ref1, {})
        new = _tree_of(layers, ref2, new_chunks)
        changes = diff_trees(old, new)
        if as_stat:
            # Bytes move only where content does: a new file, or a path whose content or
            # type changed (a deleted or replaced directory: all its files). A chmod,
            # chown or touch moves none.
            moved = [c for c in changes if c.change != "C" or
                     {"content", "type"} & set(c.attributes)]
            added = sum(c.new.size for c in moved if c.new is not None and c.new.kind == REG)
            keys = [e.key for e in old]
            removed = sum(_subtree_bytes(old, keys, c.old) for c in moved if c.old is not None)
            if from_dir:
                really_new = sum(new_chunks.values())
            else:
                have = set()
                for e in old:
                    if e.kind == REG:
                        have.update(cid for cid, _ in e.chunk_list())
                fresh: dict[bytes, int] = {}
                for c in changes:
                    if c.new is not None and c.new.kind == REG:
                        fresh.update((cid, n) for cid, n in c.new.chunk_list() if cid not in have)
                really_new = sum(fresh.values())
            stat = {"added": sum(c.change == "A" for c in changes),
                    "changed": sum(c.change == "C" for c in changes),
                    "deleted": sum(c.change == "D" for c in changes),
                    "bytes_added": added, "bytes_removed": removed,
                    "bytes_new_in_store": really_new}
            if as_json:
                click.echo(json.dumps(stat, indent=2))
            else:
                click.echo(f"{stat['added']} added, {stat['changed']} changed, "
                           f"{stat['deleted']} deleted; +{human(added)} -{human(removed)}; "
                           f"{human(really_new)} new in store")
            return
        if as_json:
            out = []
            for c in changes:
                e = c.new or c.old
                out.append({"path": "/" + os.fsdecode(c.path), "change": c.change,
                            "kind": KIND_NAMES[e.kind], "attributes": c.attributes})
            click.echo(json.dumps(out, indent=2))
            return
        for c in changes:
            click.echo(f"{c.change} {display_path(c.path)}")
