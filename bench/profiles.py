"""The two run profiles: --quick (small data, every scenario, under 3 minutes on two
cores) and --full (the issue's sizes). `scaled()` shrinks a profile's data (not its
version counts) for a reduced full run."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

MiB = 1 << 20


@dataclass(frozen=True)
class Profile:
    name: str
    scenarios: tuple[str, ...]
    repeat: int            # alternated runs of the last version's checkout, of re-snapshots
    middle_repeat: int     # alternated runs of the middle version's checkout
    chain_repeat: int      # runs of each whole scenario (commit times: medians over them)
    # linear chain: a Python environment upgraded package by package, an app edited
    env_bytes: int
    env_packages: int
    app_bytes: int
    env_versions: int
    wheels: bool           # the real-wheels chain (full only: needs a one-time download)
    # synthetic mutation models
    synth_bytes: int
    synth_versions: int
    # rebuilds after a cache bust
    base_bytes: int
    apt_bytes: int
    pip_bytes: int
    rebuilds: int
    app_layer: bool        # COPY app as its own layer (else the app lands with pip install)
    # several images from different bases
    images: int
    # large files edited in place
    sqlite_bytes: int
    disk_bytes: int
    big_versions: int
    # many small files
    small_files: int
    small_versions: int
    # scaling
    scale_base_bytes: int
    scales: tuple[int, ...]
    scale_checkouts: bool  # restore each size's last version too
    layer_counts: tuple[int, ...]   # a separate long chain, restored at these lengths
    layers_bytes: int
    # core primitives
    core_bytes: int

    SIZE_FIELDS = ("env_bytes", "app_bytes", "synth_bytes", "base_bytes", "apt_bytes",
                   "pip_bytes", "sqlite_bytes", "disk_bytes", "scale_base_bytes",
                   "layers_bytes", "core_bytes", "small_files")

    def scaled(self, factor: float) -> Profile:
        if factor == 1:
            return self
        changes = {f: max(1, int(getattr(self, f) * factor)) for f in self.SIZE_FIELDS}
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Quick: every scenario but many small files, small trees, two runs of each re-snapshot
# and last checkout; how restores scale with chain length comes from the 6-version
# mutations chain instead of a separate long chain; scaling at two sizes (1x, 16x) and
# the core primitives on 64 MiB, to stay under 3 minutes (it took 344 s with three
# sizes and 128 MiB on a 2-core machine at load 11: 108 s of CPU).
QUICK = Profile(
    name="quick", scenarios=("chain", "rebuild", "images", "bigfiles", "mutations"),
    repeat=2, middle_repeat=1, chain_repeat=1,
    env_bytes=6 * MiB, env_packages=12, app_bytes=MiB // 2, env_versions=4, wheels=False,
    synth_bytes=4 * MiB, synth_versions=5,
    base_bytes=2 * MiB, apt_bytes=MiB // 2, pip_bytes=4 * MiB, rebuilds=4, app_layer=False,
    images=4,
    sqlite_bytes=3 * MiB, disk_bytes=6 * MiB, big_versions=3,
    small_files=3000, small_versions=3,
    scale_base_bytes=MiB // 2, scales=(1, 16), scale_checkouts=False,
    layer_counts=(), layers_bytes=1 * MiB,
    core_bytes=64 * MiB,
)

FULL = Profile(
    name="full", scenarios=("chain-wheels", "chain", "rebuild", "images", "bigfiles",
                            "mutations", "smallfiles"),
    repeat=5, middle_repeat=5, chain_repeat=1,
    env_bytes=360 * MiB, env_packages=30, app_bytes=8 * MiB, env_versions=6, wheels=True,
    synth_bytes=256 * MiB, synth_versions=10,
    base_bytes=120 * MiB, apt_bytes=40 * MiB, pip_bytes=300 * MiB, rebuilds=8,
    app_layer=True,
    images=6,
    sqlite_bytes=1024 * MiB, disk_bytes=3072 * MiB, big_versions=4,
    small_files=100_000, small_versions=4,
    scale_base_bytes=64 * MiB, scales=(1, 4, 16), scale_checkouts=True,
    layer_counts=(1, 8, 32, 64), layers_bytes=16 * MiB,
    core_bytes=1024 * MiB,
)

PROFILES = {"quick": QUICK, "full": FULL}
