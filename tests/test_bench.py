"""The benchmark's packaging, without running it: `python -m bench --help` starts with
only the test extra installed, the bench extra declares every package bench imports,
nothing is installed unless asked, and results go to a folder git ignores."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def bench_py(code: str) -> subprocess.CompletedProcess:
    """Python in the repository root (where `python -m bench` runs), importing only
    the bench package: bench itself never imports the unbuilt pylayers sources."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party modules bench imports -> the files importing them,
    including the snippets it runs with `python -c` (import lines inside strings)."""
    found: dict[str, set[str]] = {}
    local = {p.stem for p in BENCH.glob("*.py")} | {"bench", "pylayers"}
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        names = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        names |= set(re.findall(r'^\s*"(?:from|import) (\w+)', text, re.M))
        for name in names - local - set(sys.stdlib_module_names):
            found.setdefault(name, set()).add(path.name)
    return found


def test_help_starts_without_the_bench_extra() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench")
    assert "--install" in proc.stdout and "--out" in proc.stdout


def test_the_bench_extra_declares_every_import() -> None:
    declared = {dist_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["bench"]}
    core = {dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    imported = imported_modules()
    assert {"numpy", "matplotlib", "pyfastcdc"} <= set(imported)  # the scan works
    missing = {m: sorted(f) for m, f in imported.items() if m not in declared | core}
    assert not missing, f"bench imports what the bench extra does not declare: {missing}"
    # and bench/install.py (--install) installs exactly that extra
    pypi = ast.literal_eval(bench_py("from bench import install; print(install.PYPI)").stdout)
    assert {dist_name(d) for d in pypi.values()} == declared
    assert set(pypi) == set(imported) - core


def test_nothing_is_installed_unless_asked() -> None:
    """Without --install, a missing package is a one-line error naming the extra (no
    pip, no apt-get); with the extra installed that run would be the benchmark."""
    missing = bench_py("from bench import install; print(install.missing_modules())")
    assert missing.returncode == 0, missing.stderr
    if missing.stdout.strip() == "[]":
        pytest.skip("the bench extra is installed here: `python -m bench --quick` would run "
                    "the benchmark")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install '.[bench]'" in proc.stderr and "--install" in proc.stderr
    assert "installing" not in proc.stderr


def test_default_output_is_not_tracked() -> None:
    out = bench_py("import bench.__main__ as m; print(m.DEFAULT_OUT)")
    assert out.returncode == 0, out.stderr
    default = Path(out.stdout.strip())
    assert default == BENCH / "out"
    subs = {p.name: re.search(r'"--out", default="([^"]+)"', p.read_text())
            for p in BENCH.glob("bench_*.py")}
    paths = [default / "bench-quick.json"] + [REPO / m[1] for m in subs.values() if m]
    assert len(paths) == 4, subs
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    git = ["git", "-c", "safe.directory=*", "-C", str(REPO), "check-ignore", "-q"]
    for p in paths:
        rel = p.relative_to(REPO)
        res = subprocess.run([*git, str(rel)], capture_output=True, text=True)
        assert res.returncode == 0, f"{rel} would be tracked by git {res.stderr}"
    res = subprocess.run([*git, "bench/results/bench-quick.json"], capture_output=True,
                         text=True)
    assert res.returncode == 1, f"the committed results are ignored {res.stderr}"
