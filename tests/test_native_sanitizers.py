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
from chunk_reference import cut_points as reference_cut_points  # noqa: E402

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


# --- tests/native/fastcdc_asan_driver.c: a naive C transcription of the contract as the
# oracle, exact-size allocations for every piece and cuts[] array, 0- and 1-byte pieces,
# max_cuts of 1 and 2, per-buffer cut ranges, and cross-checks with chunk_reference.py.

import chunk_reference  # noqa: E402

from pylayers import cut_points  # noqa: E402

ASAN_SOURCES = [str(REPO / "csrc" / "fastcdc.c"),
                str(REPO / "tests" / "native" / "fastcdc_asan_driver.c")]
SANITIZER_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
                     UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")


def build_asan_driver(out: Path, *flags: str) -> Path:
    subprocess.run(["gcc", *flags, "-Wall", "-Wextra", "-Werror", "-I", str(REPO / "csrc"),
                    *ASAN_SOURCES, "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def asan_driver(tmp_path_factory) -> Path:
    return build_asan_driver(tmp_path_factory.mktemp("asan") / "fastcdc_asan",
                             "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                             "-g", "-O1")


def test_asan_driver_selftest_under_address_and_undefined_sanitizers(
        asan_driver: Path) -> None:
    res = subprocess.run([str(asan_driver), "selftest"], capture_output=True, text=True,
                         env=SANITIZER_ENV, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok "), res.stdout
    assert "runtime error" not in res.stderr, res.stderr


def _input(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(size)
    if kind == "pattern":
        return (rng.randbytes(37) * (size // 37 + 1))[:size]
    return rng.randbytes(size)


@pytest.mark.parametrize(("kind", "size", "params"), [
    ("random", 0, (64, 256, 1024)),
    ("random", 1, (64, 256, 1024)),
    ("random", 63, (64, 64, 64)),
    ("random", 1025, (64, 256, 1024)),
    ("random", 200_000, (64, 256, 1024)),
    ("random", 200_000, (100, 300, 1000)),
    ("random", 200_000, (64, 64, 64)),
    ("zeros", 100_000, (64, 256, 1024)),
    ("pattern", 100_000, (64, 128, 4096)),
    ("random", 700_000, (16384, 65536, 262144)),
])
def test_asan_driver_cut_points_match_reference(asan_driver: Path, tmp_path: Path,
                                                kind: str, size: int,
                                                params: tuple[int, int, int]) -> None:
    data = _input(kind, size, seed=size)
    path = tmp_path / "input"
    path.write_bytes(data)
    res = subprocess.run([str(asan_driver), "cuts", str(path), *map(str, params)],
                         capture_output=True, text=True, env=SANITIZER_ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    got = [int(line) for line in res.stdout.split()]
    assert got == chunk_reference.cut_points(data, *params)
    lo, avg, hi = params
    assert got == list(cut_points(data, min_size=lo, avg_size=avg, max_size=hi))


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_asan_driver_selftest_under_valgrind(tmp_path: Path) -> None:
    exe = build_asan_driver(tmp_path / "fastcdc_plain", "-g", "-O1")
    # Fewer random parameter sets and 1 MiB large inputs: valgrind runs ~50x slower.
    res = subprocess.run(["valgrind", "-q", "--error-exitcode=3", "--leak-check=full",
                          str(exe), "selftest", "4", "1"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok "), res.stdout


def _expected_files() -> dict[str, bytes]:
    """What tests/native/writefile_asan_driver.c writes, byte for byte."""
    big = 5 * 65536 + 123
    dense = bytes((i * 7 + 1) & 0xFF for i in range(big))
    holey = dense[:65536] + bytes(3 * 65536) + dense[4 * 65536:]
    return {"dense": dense, "empty": b"", "one": dense[:1], "holey": holey,
            "zeros": bytes(big), "zero-tail": b"\xab" * 4096 + bytes(big - 4096)}


def test_write_file_under_asan_and_ubsan(tmp_path: Path) -> None:
    """pl_write_file (csrc/writefile.c), which a checkout makes most files with: under
    ASan/UBSan, every shape of file comes out byte for byte, all-zero blocks as holes,
    with its mtime (a negative one too), and an existing name is -EEXIST at step 1."""
    exe = tmp_path / "writefile_driver"
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-omit-frame-pointer", "-fno-sanitize-recover=all",
                    "-I", str(REPO / "csrc"), str(REPO / "csrc" / "writefile.c"),
                    str(REPO / "tests" / "native" / "writefile_asan_driver.c"),
                    "-o", str(exe)], check=True)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    res = subprocess.run([str(exe), str(out)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr)
    for name, data in _expected_files().items():
        assert (out / name).read_bytes() == data, name
        assert os.stat(out / name).st_mode & 0o7777 == 0o640, name
    block = os.stat(out).st_blksize
    if block <= 65536:  # holes of whole blocks: 3 of the 64 KiB blocks at least
        assert os.stat(out / "holey").st_blocks * 512 <= len(_expected_files()["holey"]) \
            - 3 * 65536 + block
        assert os.stat(out / "zeros").st_blocks * 512 <= block
    assert os.stat(out / "dense").st_mtime_ns == 1600000000123456789
    assert os.stat(out / "one").st_mtime_ns == -1000000000123
