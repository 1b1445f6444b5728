"""The image config (the OCI image-spec's `application/vnd.oci.image.config.v1+json`):
kept beside an image's top layer, and made or updated on export.

Where it is kept (docs/format.md, "Image configs"): the config's exact bytes, in the
index's `image_configs` table under the top layer's id. They are small (a few KB)
and inline, so gc (which keeps chunks only for layers' manifests and files) cannot
take them away; gc removes the configs of layers that are gone (`prune`).
"""

from __future__ import annotations

import json
import platform

from ..errors import CorruptData
from ..store import Store

MAX_JSON = 4 << 20  # bytes of an index, manifest or config read into memory

GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
          "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def save(store: Store, layer_id: bytes, config: bytes) -> None:
    with store.write() as t:
        t.image_configs.put(layer_id, config)


def load(store: Store, layer_id: bytes) -> bytes | None:
    with store.read() as t:
        return t.image_configs.get(layer_id)


def forget(store: Store, layer_id: bytes) -> None:
    with store.write() as t:
        t.image_configs.delete(layer_id)


def prune(store: Store) -> int:
    """Remove the configs whose layer is gone (gc); how many. One write transaction, so
    a layer imported meanwhile keeps its config."""
    with store.write() as t:
        gone = [lid for lid in t.image_configs.ids() if not t.layers.has(lid)]
        for lid in gone:
            t.image_configs.delete(lid)
    return len(gone)


def parse(data: bytes, what: str = "image config") -> dict:
    """An untrusted JSON object (an image config, a manifest, an index), or CorruptData
    naming `what`."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptData(f"{what} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptData(f"{what} is not a JSON object")
    return doc


def diff_ids(config: dict) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
        raise CorruptData("image config has no rootfs.diff_ids list")
    return ids


def for_export(stored: bytes | None, ids: list[str], created: str | None) -> bytes:
    """The config to export with layers whose diffIDs are `ids`: the stored one with
    its rootfs (and, when the layer count changed, its history) made to match, or a
    minimal one for this machine's architecture. Canonical JSON (sorted keys, no
    spaces), so the same layers give the same config blob."""
    doc = parse(stored) if stored is not None else {}
    if not doc:
        doc = {"architecture": GOARCH.get(platform.machine(), platform.machine()),
               "os": "linux", "config": {}}
        if created is not None:
            doc["created"] = created
    doc["rootfs"] = {"type": "layers", "diff_ids": ids}
    history = doc.get("history")
    if not isinstance(history, list) or sum(
            1 for h in history if isinstance(h, dict) and not h.get("empty_layer")) != len(ids):
        item: dict = {"created_by": "pylayers export"}
        if created is not None:
            item["created"] = created
        doc["history"] = [dict(item) for _ in ids]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
