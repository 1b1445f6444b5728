"""The chunker's C core under AddressSanitizer/UBSan and valgrind, through a small C
driver (tests/native/fastcdc_driver.c) that chunks many inputs whole, in random splits
and with one or two cut slots per call, and checks they agree."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chunker_reference import reference_cut_points  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCES = [str(REPO / "csrc" / "fastcdc.c"), str(REPO / "tests" / "native" / "fastcdc_driver.c")]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the driver")


def build(tmp_path: Path, *flags: str) -> Path:
    exe = tmp_path / "fastcdc_driver"
    subprocess.run(["gcc", *flags, "-g", "-I", str(REPO / "csrc"), *SOURCES, "-o", str(exe)],
                   check=True)
    return exe


def test_chunker_under_asan_and_ubsan(tmp_path: Path) -> None:
    exe = build(tmp_path, "-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=all")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    # and the driver's cut points are the reference's
    data = random.Random(9).randbytes(200_000) + bytes(5000)
    f = tmp_path / "input"
    f.write_bytes(data)
    res = subprocess.run([str(exe), str(f)], capture_output=True, text=True, env=env,
                         check=True)
    assert [int(x) for x in res.stdout.split()] == reference_cut_points(data, 64, 256, 1024)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_chunker_under_valgrind(tmp_path: Path) -> None:
    exe = build(tmp_path, "-O2")
    res = subprocess.run(["valgrind", "--error-exitcode=3", "--leak-check=full",
                          "--errors-for-leak-kinds=definite,indirect", "-q", str(exe)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
