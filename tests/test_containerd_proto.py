"""Our interface files for containerd's snapshot API: the installed package carries the
modules the build generated from them (CMakeLists.txt runs grpcio-tools; nothing
generated is in the repository), and those modules' messages, field numbers and
methods match containerd's own .proto files (Debian's
golang-github-containerd-containerd-dev, where installed) and ours."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("google.protobuf", reason="protobuf is not installed "
                    "(pip install '.[test]')")

from google.protobuf import descriptor_pb2  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "pylayers" / "containerd"
GENERATED = ["mount_pb2.py", "snapshots_pb2.py", "snapshots_pb2_grpc.py"]
CONTAINERD_API = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
# What current containerd's snapshot API has beyond 1.6's (the installed sources are
# 1.6): CommitSnapshotRequest.parent (containerd 2.2, parallel unpack's rebase on commit)
SINCE_1_6 = {"CommitSnapshotRequest": {(" string", "parent", 5)}}


def with_later_fields(messages: dict[str, set]) -> dict[str, set]:
    """containerd 1.6's messages as current containerd has them."""
    return {name: fields | SINCE_1_6.get(name, set()) for name, fields in messages.items()}


def installed(name: str):
    import importlib
    return importlib.import_module(f"pylayers.containerd.{name}")


def test_generated_modules_are_built_not_committed():
    """The build writes them into the installed package (CMakeLists.txt's step, which
    the README's install command runs); the repository holds only the .proto files."""
    for name in GENERATED:
        mod = installed(name[:-3])
        assert Path(mod.__file__).name == name
        assert PKG not in Path(mod.__file__).resolve().parents, \
            f"{name} was imported from the source tree, not the installed package"
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "grpc_tools.protoc" in cmake
    assert all(n in cmake for n in GENERATED)
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot tell what the repository tracks")
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "pylayers/containerd"],
                             capture_output=True, text=True).stdout.split()
    assert "pylayers/containerd/snapshots.proto" in tracked
    assert not [t for t in tracked if "_pb2" in t], tracked


def test_installed_modules_are_generated_from_the_current_proto(tmp_path):
    """The descriptors in the installed modules are those of the .proto files as they
    are now (a changed .proto without a reinstall fails here)."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed "
                        "(pip install '.[test]')")
    out = tmp_path / "set.pb"
    res = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.",
                          f"--descriptor_set_out={out}", "pylayers/containerd/mount.proto",
                          "pylayers/containerd/snapshots.proto"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    fresh = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(
        out.read_bytes()).file}
    for mod in ("mount_pb2", "snapshots_pb2"):
        have = descriptor_pb2.FileDescriptorProto.FromString(
            installed(mod).DESCRIPTOR.serialized_pb)
        want = fresh[have.name]
        msgs = list(want.message_type)
        while msgs:  # protoc adds json names; the generated modules leave them out
            msg = msgs.pop()
            msgs.extend(msg.nested_type)
            for f in msg.field:
                f.ClearField("json_name")
        assert have == want, f"{mod} is stale: reinstall (pip install .)"


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


_SCALAR = {getattr(FieldDescriptor, n): n[len("TYPE_"):].lower()
           for n in dir(FieldDescriptor) if n.startswith("TYPE_")}


def field_type(f) -> str:
    if f.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM):
        t = f.message_type or f.enum_type
        if f.message_type is not None and t.GetOptions().map_entry:
            k, v = (field_type(t.fields_by_name[n]) for n in ("key", "value"))
            return f"map<{k},{v}>"
        return t.name
    return _SCALAR[f.type]


def generated_messages(file) -> dict[str, set[tuple[str, str, int]]]:
    """What proto_messages gives, from a generated module's file descriptor."""
    out: dict[str, set[tuple[str, str, int]]] = {}
    for name, enum in file.enum_types_by_name.items():
        out[name] = {("enum", v.name, v.number) for v in enum.values}
    for name, msg in file.message_types_by_name.items():
        out[name] = {(("repeated" if f.is_repeated and not field_type(f).startswith("map<")
                       else "") + " " + field_type(f), f.name, f.number)
                     for f in msg.fields}
    return out


def generated_services(file) -> set[tuple[str, str, str]]:
    return {(m.name, m.input_type.name,
             ("stream " if m.server_streaming else "") + m.output_type.name)
            for svc in file.services_by_name.values() for m in svc.methods}


PROTOS = [("snapshots_pb2", "snapshots.proto", "services/snapshots/v1/snapshots.proto"),
          ("mount_pb2", "mount.proto", "types/mount.proto")]


@pytest.mark.parametrize("module, ours, theirs", PROTOS)
def test_generated_messages_match_containerd(module, ours, theirs):
    """The generated (installed) messages: names, types, field numbers and methods are
    those of our .proto and of containerd's own."""
    file = installed(module).DESCRIPTOR
    mine = (PKG / ours).read_text()
    assert generated_messages(file) == proto_messages(mine)
    assert generated_services(file) == services(mine)
    assert file.package == re.search(r"^package\s+([\w.]+);", mine, re.M)[1]
    path = CONTAINERD_API / theirs
    if not path.exists():
        pytest.skip(f"containerd's API sources are not installed ({path}; Debian: "
                    "golang-github-containerd-containerd-dev)")
    upstream = path.read_text()
    assert file.package == re.search(r"^package\s+([\w.]+);", upstream, re.M)[1]
    assert generated_messages(file) == with_later_fields(proto_messages(upstream))
    assert generated_services(file) == services(upstream)


def test_generated_descriptor_wire_names():
    """What goes on the wire: the gRPC method paths containerd's client calls."""
    from pylayers.containerd import snapshots_pb2

    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(m.name for m in svc.methods) == sorted(
        ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List",
         "Usage", "Cleanup"])
    assert svc.methods_by_name["List"].server_streaming
    mount = snapshots_pb2.PrepareSnapshotResponse.DESCRIPTOR.fields_by_name["mounts"]
    assert mount.message_type.full_name == "containerd.types.Mount"
