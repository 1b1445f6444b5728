"""contrib/pylayers-snapshotter.service, the systemd unit the README names: it runs the
README's command on the README's socket, systemd accepts it, and its command serves
and stops on the unit's KillSignal."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_containerd_e2e import readme_blocks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "contrib" / "pylayers-snapshotter.service"


def unit_settings() -> dict[str, str]:
    out = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def readme_command() -> list[str]:
    (line,) = [ln for lang, text in readme_blocks("containerd") if lang == "sh"
               for ln in text.splitlines() if ln.startswith("pylayers ")]
    return shlex.split(line)


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_unit_runs_the_readme_command_on_the_readme_socket():
    unit = unit_settings()
    argv = shlex.split(unit["ExecStart"])
    assert Path(argv[0]).name == "pylayers"
    assert argv[1:] == readme_command()[1:]
    (toml,) = [t for lang, t in readme_blocks("containerd") if lang == "toml"]
    address = tomllib.loads(toml)["proxy_plugins"]["pylayers"]["address"]
    assert opt(argv, "--address") == address
    # systemd makes the socket's and the store's directories
    assert Path(address).parent == Path("/run") / unit["RuntimeDirectory"]
    assert Path(opt(argv, "--store")) == Path("/var/lib") / unit["StateDirectory"]
    assert unit["KillSignal"] in ("SIGTERM", "SIGINT")
    assert "containerd.service" in unit["Before"]


def test_systemd_accepts_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    script = shutil.which("pylayers", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no pylayers script beside this interpreter")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(shlex.split(unit_settings()["ExecStart"])[0],
                                             script))
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_unit_command_serves_and_stops_on_its_kill_signal(tmp_path):
    """The ExecStart command with the store and socket moved under a temporary
    directory: it serves, and the unit's KillSignal stops it cleanly within
    TimeoutStopSec, removing its socket."""
    unit = unit_settings()
    argv = shlex.split(unit["ExecStart"])
    sock, store = tmp_path / "run" / "snapshotter.sock", tmp_path / "lib"
    argv[argv.index("--address") + 1] = str(sock)
    argv[argv.index("--store") + 1] = str(store)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pylayers", *argv[1:]], stdout=out,
                                stderr=out, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(sock))
                    break
                except OSError:
                    pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(getattr(signal, unit["KillSignal"]))
        assert proc.wait(int(unit["TimeoutStopSec"])) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()
    assert "Traceback" not in log.read_text()
