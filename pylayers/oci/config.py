"""The image config (the OCI image-spec's `application/vnd.oci.image.config.v1+json`):
kept per image, and made or updated on export.

An image is a config and the layers under its top layer; a tag names an image (as in
Docker and OCI), so two images that end on the same layer with other configs (a build
that differs only in CMD) keep their own. Where it is kept (docs/format.md, "Image
configs"): each config's exact bytes in the index's `image_configs` table under its
sha256; a tag written with an image (`build -t`, `import -t`, `pull -t`) holds the
digest beside its layer id (`tags`); `layer_configs` gives each top layer the config of
the image last stored on it, for a REF that names the layer rather than a tag. Configs
are small (a few KB) and inline, so gc (which keeps chunks only for layers' manifests
and files) cannot take them away; gc removes the entries of layers that are gone and
the configs nothing names any more (`prune`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import CorruptData
from ..store import Store

if TYPE_CHECKING:
    from ..layers.repo import Layers
    from ..store.tables import Tables

MAX_JSON = 4 << 20  # bytes of an index, manifest or config read into memory

GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
          "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def digest(config: bytes) -> str:
    """The config's OCI digest, `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(config).hexdigest()


def _raw(digest_text: str) -> bytes | None:
    algo, _, hexpart = digest_text.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        return None
    try:
        return bytes.fromhex(hexpart)
    except ValueError:
        return None


def save_in(t: Tables, layer_id: bytes, config: bytes, tags: Iterable[str] = ()) -> str:
    """In the transaction `t`: keep `config` as the config of the image whose top layer
    is `layer_id`, point each of `tags` at that image (layer and config; the names must
    be valid tags), and make it the layer's config. Its digest."""
    raw = hashlib.sha256(config).digest()
    t.image_configs.put(raw, config)
    t.layer_configs.put(layer_id, raw)
    for tag in tags:
        t.tags.put(tag, layer_id, raw)
    return "sha256:" + raw.hex()


def save(store: Store, layer_id: bytes, config: bytes, tags: Iterable[str] = ()) -> str:
    """`save_in`, in a transaction of its own."""
    with store.write() as t:
        return save_in(t, layer_id, config, tags)


def load(store: Store, layer_id: bytes) -> bytes | None:
    """The config of the image last stored with top layer `layer_id`, if any."""
    with store.read() as t:
        raw = t.layer_configs.get(layer_id)
        return t.image_configs.get(raw) if raw is not None else None


def by_digest(store: Store, digest_text: str) -> bytes | None:
    """The stored config whose digest is `digest_text`, if any."""
    raw = _raw(digest_text)
    if raw is None:
        return None
    with store.read() as t:
        return t.image_configs.get(raw)


def for_ref(layers: Layers, ref: str) -> tuple[bytes, bytes | None]:
    """(layer id, config) of the image REF names: a tag's own image when REF is a tag
    written with one, else the config last stored with the layer REF resolves to."""
    with layers.store.read() as t:
        lid = layers.resolve_in(t, ref)
        image = t.tags.image(ref)
        raw = image[1] if image is not None and image[0] == lid else None
        if raw is None:
            raw = t.layer_configs.get(lid)
        return lid, (t.image_configs.get(raw) if raw is not None else None)


def tag(layers: Layers, name: str, ref: str) -> bytes:
    """Point tag `name` at the image REF names (`pylayers tag`): a tag written with an
    image gives the new tag the same image; the layer id."""
    from ..layers.refs import check_tag

    check_tag(name)
    with layers.store.write() as t:
        lid = layers.resolve_in(t, ref)
        image = t.tags.image(ref)
        t.tags.put(name, lid, image[1] if image is not None and image[0] == lid else None)
    return lid


def images(store: Store) -> list[tuple[bytes, bytes]]:
    """(top layer id, config) of every image the store keeps a config for."""
    out: dict[tuple[bytes, bytes], None] = {}
    with store.read() as t:
        pairs = [(lid, raw) for lid, raw in t.layer_configs.items()]
        pairs += [(lid, raw) for _name, lid, raw in t.tags.images()]
        found = []
        for lid, raw in pairs:
            if (lid, raw) in out:
                continue
            out[(lid, raw)] = None
            cfg = t.image_configs.get(raw)
            if cfg is not None:
                found.append((lid, cfg))
    return found


def forget(store: Store, layer_id: bytes) -> None:
    with store.write() as t:
        t.layer_configs.delete(layer_id)


def prune(store: Store) -> int:
    """gc: drop the layer entries of layers that are gone, then the configs no tag and
    no layer entry names; how many configs went. One write transaction, so an image
    stored meanwhile keeps its config."""
    with store.write() as t:
        for lid in [lid for lid, _raw in t.layer_configs.items() if not t.layers.has(lid)]:
            t.layer_configs.delete(lid)
        named = {raw for _lid, raw in t.layer_configs.items()}
        named.update(raw for _name, _lid, raw in t.tags.images())
        gone = [raw for raw in t.image_configs.digests() if raw not in named]
        for raw in gone:
            t.image_configs.delete(raw)
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
