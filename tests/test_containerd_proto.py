"""Our interface files for containerd's snapshot API: the committed generated modules
are what the documented command generates, and the messages match containerd's own
.proto files (Debian's golang-github-containerd-containerd-dev, where installed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pylayers" / "containerd"
GENERATED = ["mount_pb2.py", "snapshots_pb2.py", "snapshots_pb2_grpc.py"]
CONTAINERD_API = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")


def regeneration_command() -> list[str]:
    """The command in snapshots.proto's header, as arguments."""
    text = (PKG / "snapshots.proto").read_text()
    m = re.search(r"//\s+(python -m grpc_tools\.protoc (?:[^\n]*\\\n//)*[^\n]*)", text)
    assert m, "snapshots.proto no longer says how to regenerate"
    cmd = re.sub(r"\\\n//\s*", " ", m[1])
    return cmd.split()


def test_regenerating_gives_the_committed_modules(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed "
                        "(pip install '.[test]')")
    cmd = regeneration_command()
    assert cmd[:3] == ["python", "-m", "grpc_tools.protoc"]
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("--python_out=.", f"--python_out={out}")
             .replace("--grpc_python_out=.", f"--grpc_python_out={out}") for a in cmd[3:]]
    res = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in GENERATED:
        fresh = (out / "pylayers" / "containerd" / name).read_bytes()
        assert fresh == (PKG / name).read_bytes(), f"{name} differs: regenerate it " \
            "with the command in pylayers/containerd/snapshots.proto"


_FIELD = re.compile(r"^\s*(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)", re.M)


def proto_messages(text: str) -> dict[str, set[tuple[str, str, int]]]:
    """{message: {(type, name, number)}} and {enum: {("enum", value, number)}} of a
    .proto file (top-level declarations; comments and options dropped)."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"\[[^\]]*\]", "", text)  # field options (gogoproto)
    out = {}
    for m in re.finditer(r"^(message|enum)\s+(\w+)\s*\{(.*?)^\}", text, re.M | re.S):
        body = m[3]
        if m[1] == "enum":
            out[m[2]] = {("enum", n, int(v)) for n, v in
                         re.findall(r"^\s*(\w+)\s*=\s*(\d+)", body, re.M)}
            continue
        fields = set()
        for f in _FIELD.finditer(body):
            if f[2] in ("option",):
                continue
            typ = re.sub(r"\s+", "", f[2]).split(".")[-1]
            fields.add(((f[1] or "").strip() + " " + typ, f[3], int(f[4])))
        out[m[2]] = fields
    return out


def services(text: str) -> set[tuple[str, str, str]]:
    return {(n, re.sub(r"\s+", " ", a).split(".")[-1], re.sub(r"\s+", " ", r).split(".")[-1])
            for n, a, r in re.findall(r"rpc\s+(\w+)\s*\(([^)]*)\)\s*returns\s*\(([^)]*)\)",
                                      text)}


@pytest.mark.parametrize("ours, theirs", [
    ("snapshots.proto", "services/snapshots/v1/snapshots.proto"),
    ("mount.proto", "types/mount.proto"),
])
def test_messages_match_containerd(ours, theirs):
    path = CONTAINERD_API / theirs
    if not path.exists():
        pytest.skip(f"containerd's API sources are not installed ({path}; Debian: "
                    "golang-github-containerd-containerd-dev)")
    mine, upstream = (PKG / ours).read_text(), path.read_text()
    assert re.search(r"^package\s+([\w.]+);", mine, re.M)[1] == \
        re.search(r"^package\s+([\w.]+);", upstream, re.M)[1]
    assert proto_messages(mine) == proto_messages(upstream)
    assert services(mine) == services(upstream)


def test_generated_descriptor_wire_names():
    """What goes on the wire: the gRPC method paths containerd's client calls."""
    pytest.importorskip("google.protobuf", reason="protobuf is not installed")
    from pylayers.containerd import snapshots_pb2

    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(m.name for m in svc.methods) == sorted(
        ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List",
         "Usage", "Cleanup"])
    assert svc.methods_by_name["List"].server_streaming
    mount = snapshots_pb2.PrepareSnapshotResponse.DESCRIPTOR.fields_by_name["mounts"]
    assert mount.message_type.full_name == "containerd.types.Mount"
