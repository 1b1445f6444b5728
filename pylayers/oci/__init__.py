"""OCI interop: images in and out of the store (issue 11): import and export,
registries, chunk-level transfer.

Layering: ranks beside `mounts`, above `layers`; imports `layers` and `store`, never
`cli`, `build` or `mounts`. One module per concept: `streams` (compression, digests,
size limits), `tarread` (a layer tar into entries), `changeset` (OCI whiteouts and
opaque markers onto a parent tree), `tarwrite` (entries into a reproducible changeset
tar), `layout` and `dockerarchive` (the two image containers), `config` (the image
config kept beside the top layer), `importer` and `exporter` (the two commands);
registries: `reference` (REGISTRY/REPO:TAG), `auth` (credentials, basic and bearer),
`registry` (the distribution API client), `registry_downloads` (pull's download area),
`registry_transfer` (push and pull of an image, layer by layer);
chunk-level transfer: `chunkartifact` (the artifact's blobs), `chunkremote` (where they
go), `chunkpush` and `chunkpull`.
"""

from .exporter import ExportResult, export_image
from .importer import DEFAULT_MAX_LAYER_SIZE, ImportResult, import_source

__all__ = ["DEFAULT_MAX_LAYER_SIZE", "ExportResult", "ImportResult", "export_image",
           "import_source"]
