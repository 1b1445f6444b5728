"""The README's registry blocks (after `<!-- registry -->`: push and pull, a build cache
exported and imported, and a build FROM the pushed image), run as tests/test_readme.py
runs the others (in one shell session after the README's earlier blocks, their output
claims checked), with a real registry in place of `localhost:5000`."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import registryutil  # noqa: E402
import test_readme as readme  # noqa: E402

registry = registryutil.registry  # the fixture


def test_readme_registry_block(tmp_path: Path, registry) -> None:
    blocks = [b for b in readme.BLOCKS if b.marker == "registry"]
    assert blocks, "the README has no <!-- registry --> block"
    last = blocks[-1]
    session = [b for b in readme.BLOCKS if b.n <= last.n
               and b.marker not in ("containerd",)
               and b.lang in ("sh", "bash", "shell") and not readme.is_setup(b)]
    session = [dataclasses.replace(b, text=b.text.replace("localhost:5000", registry.host))
               if b.marker == "registry" else b for b in session]
    if any("unshare" in b.text for b in session) and (why := readme.userns_refused()):
        import pytest

        pytest.skip(f"a block up to this one needs a user namespace: {why}")
    readme.make_rootfs(tmp_path)
    outputs = readme.run_sh(session, tmp_path, of={b.n for b in blocks})
    for code, comment, stdout in outputs:
        readme.check_claim(code, comment, stdout, tmp_path, "README.md's registry blocks")
    digests = [out.strip() for code, _c, out in outputs if " push " in code]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0].startswith("sha256:")
    # the build FROM the pushed image (Building images from Dockerfiles)
    cat = [out for code, _c, out in outputs if code.startswith("pylayers cat on-v2")]
    assert cat == ["hello\n"]
    # the shared build cache: a build in an empty store with --cache-from runs no step
    # and gives the --cache-to build's layer id
    ids = [out.split()[-1] for code, _c, out in outputs if "--cache-" in code]
    assert len(ids) == 2 and ids[0] == ids[1]
    cached = [out for code, _c, out in outputs if "--cache-from" in code][0]
    assert "0 steps run" in cached, cached
