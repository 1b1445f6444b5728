"""The README's builder example, run as written: a miss that is explained, a step built in
a real mounted snapshot, a hit on the next run and after a touch, and a miss naming the
changed file after an edit. Needs root (the example mounts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pylayers import Layers, Store

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the example mounts: needs root")


def example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- builder example -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README lost its builder example"
    return m.group(1)


def run(tmp_path: Path) -> tuple[str, str]:
    script = tmp_path / "build.py"
    script.write_text(example())
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("layer "), proc.stdout
    return lines[-1].split()[1], "\n".join(lines[:-1])


def test_readme_builder_example_mounts_through_the_library() -> None:
    """The example mounts and unmounts with pylayers.mounts, not by running mount(8)."""
    code = example()
    assert "mount_all(mounts, target)" in code and "unmount(target)" in code
    assert "subprocess" not in code and ".command(" not in code


def test_readme_builder_example(tmp_path: Path) -> None:
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "os-release").write_text("ID=test\n")
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("print('hi')\n")
    (app / "data.txt").write_text("data\n")

    first, said = run(tmp_path)
    assert said.startswith("miss:")
    with Store.open(tmp_path / "store") as store:
        layers = Layers(store)
        tree = {e.path: e for e in layers.tree(bytes.fromhex(first))}
        assert b"app/main.py" in tree and b"etc/os-release" in tree
        assert layers.read_file(tree[b"app/main.py"]) == b"print('hi')\n"

    again, said = run(tmp_path)
    assert (again, said) == (first, "")  # a hit: nothing built, nothing to explain

    os.utime(app / "main.py", ns=(1, 1))
    touched, said = run(tmp_path)
    assert (touched, said) == (first, "")  # mtime is not part of the key

    (app / "data.txt").write_text("DATA\n")
    edited, said = run(tmp_path)
    assert edited != first
    assert said.startswith("miss:") and "data.txt" in said, said
