"""`pylayers containerd-snapshotter`, called as containerd's proxy client calls it: a
real server process on a unix socket, a gRPC client stub, a real store. containerd's
semantics and error codes, namespaces, labels, restarts, and a clean server log."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (pip install '.[test]')")
pytest.importorskip("google.protobuf", reason="protobuf is not installed")

from pylayers.containerd import snapshots_pb2 as pb  # noqa: E402
from pylayers.containerd import snapshots_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="unix sockets, Linux mounts")

NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def pylayers_cmd(store: Path, *args: str) -> list[str]:
    """Run with cwd outside the source tree (`-m` would import the unbuilt sources)."""
    return [sys.executable, "-m", "pylayers", "--store", str(store), *args]


def run(store: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(pylayers_cmd(store, *args), capture_output=True, text=True,
                          cwd=store.parent, timeout=timeout)


class Server:
    """A `pylayers containerd-snapshotter` process; `stop()` sends SIGTERM and returns
    its exit status; `log` is what it wrote to stderr. Every one started is killed at
    the end of its test if it still runs (a failed assert must not leave it behind)."""

    started: list[Server] = []

    def __init__(self, store: Path, sock: Path, *extra: str) -> None:
        self.store, self.sock = store, sock
        self.log_path = sock.with_suffix(".log")
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            pylayers_cmd(store, "containerd-snapshotter", "--address", str(sock), *extra),
            stdout=self.log_file, stderr=self.log_file, cwd=store.parent)
        Server.started.append(self)
        deadline = time.monotonic() + 30
        while not self.answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.log}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the server did not start: {self.log}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def answers(self) -> bool:
        """Whether something listens on the socket (a stale one refuses)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the server did not stop on a signal") from None
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture(autouse=True)
def no_server_left_behind():
    yield
    while Server.started:
        srv = Server.started.pop()
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "store", tmp_path / "snap.sock")
    yield srv
    rc = srv.stop()
    assert rc == 0, srv.log
    assert "Traceback" not in srv.log, srv.log
    assert not srv.sock.exists()


def md(ns: str | None) -> tuple:
    return (("containerd-namespace", ns),) if ns is not None else ()


class Client:
    """The stub's calls with keyword arguments, in one namespace."""

    def __init__(self, stub, ns: str | None = "default") -> None:
        self.stub, self.md = stub, md(ns)

    def prepare(self, key, parent="", labels=None):
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(
            key=key, parent=parent, labels=labels or {}), metadata=self.md).mounts)

    def view(self, key, parent="", labels=None):
        return list(self.stub.View(pb.ViewSnapshotRequest(
            key=key, parent=parent, labels=labels or {}), metadata=self.md).mounts)

    def mounts(self, key):
        return list(self.stub.Mounts(pb.MountsRequest(key=key), metadata=self.md).mounts)

    def commit(self, name, key, labels=None):
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}),
                         metadata=self.md)

    def remove(self, key):
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key), metadata=self.md)

    def stat(self, key):
        return self.stub.Stat(pb.StatSnapshotRequest(key=key), metadata=self.md).info

    def update(self, name, labels, paths=None):
        req = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=labels))
        if paths is not None:
            req.update_mask.paths.extend(paths)
        return self.stub.Update(req, metadata=self.md).info

    def list(self, *filters):
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)),
                                          metadata=self.md) for i in r.info]

    def names(self, *filters):
        return sorted(i.name for i in self.list(*filters))

    def usage(self, key):
        return self.stub.Usage(pb.UsageRequest(key=key), metadata=self.md)

    def cleanup(self):
        self.stub.Cleanup(pb.CleanupRequest(), metadata=self.md)


def code_of(call, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    assert err.value.details(), "an error carries a message"
    assert "\n" not in err.value.details()
    return err.value.code()


def upper_dir(mounts) -> Path:
    """The writable directory of an active snapshot's mounts."""
    (m,) = mounts
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):])


def lower_dirs(mounts) -> list[Path]:
    (m,) = mounts
    if m.type == "bind":
        return [Path(m.source)]
    opt = next(o for o in m.options if o.startswith("lowerdir="))
    return [Path(p) for p in opt[len("lowerdir="):].split(":")]


def committed(c: Client, name: str, files: dict[str, bytes], parent: str = "") -> None:
    key = f"extract-{name}"
    up = upper_dir(c.prepare(key, parent))
    for path, data in files.items():
        (up / path).parent.mkdir(parents=True, exist_ok=True)
        (up / path).write_bytes(data)
    c.commit(name, key)


# -- the calls ----------------------------------------------------------------------------


def test_prepare_commit_stat_list_usage(server):
    c = Client(server.stub)
    mounts = c.prepare("extract-1 sha256:aa", labels={"containerd.io/snapshot.ref": "aa"})
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rbind", "rw"])]
    up = upper_dir(mounts)
    (up / "etc").mkdir()
    (up / "etc" / "motd").write_bytes(b"hello\n")
    assert c.stat("extract-1 sha256:aa").kind == pb.ACTIVE
    assert c.usage("extract-1 sha256:aa").size == 6
    c.commit("sha256:aa", "extract-1 sha256:aa", labels={"l": "v"})
    code = code_of(c.stat, "extract-1 sha256:aa")
    assert code == NOT_FOUND
    info = c.stat("sha256:aa")
    assert (info.name, info.parent, info.kind) == ("sha256:aa", "", pb.COMMITTED)
    assert dict(info.labels) == {"containerd.io/snapshot.ref": "aa", "l": "v"}
    assert info.created_at.seconds > 1_600_000_000
    usage = c.usage("sha256:aa")
    assert (usage.size, usage.inodes) == (6, 3)  # /, /etc, /etc/motd

    mounts = c.prepare("run", "sha256:aa")
    assert mounts[0].type == "overlay"
    (lower,) = lower_dirs(mounts)
    assert (lower / "etc" / "motd").read_bytes() == b"hello\n"
    assert c.mounts("run") == mounts
    assert c.stat("run").parent == "sha256:aa"
    view = c.view("v", "sha256:aa")
    assert view[0].type == "bind" and "ro" in view[0].options  # one layer: a bind mount
    assert {(i.name, i.parent, i.kind) for i in c.list()} == {
        ("sha256:aa", "", pb.COMMITTED), ("run", "sha256:aa", pb.ACTIVE),
        ("v", "sha256:aa", pb.VIEW)}
    c.remove("v")
    c.remove("run")
    c.remove("sha256:aa")
    assert c.list() == []
    c.cleanup()


def test_error_kinds(server):
    c = Client(server.stub)
    for call, args in [(c.stat, ("nope",)), (c.mounts, ("nope",)), (c.remove, ("nope",)),
                       (c.usage, ("nope",)), (c.commit, ("x", "nope")),
                       (c.update, ("nope", {"a": "b"}))]:
        assert code_of(call, *args) == NOT_FOUND, call
    assert code_of(c.prepare, "k", "no-such-parent") == NOT_FOUND
    assert code_of(c.view, "k", "no-such-parent") == NOT_FOUND
    assert code_of(c.prepare, "") == INVALID_ARGUMENT

    committed(c, "base", {"f": b"1"})
    c.prepare("active", "base")
    c.view("view", "base")
    assert code_of(c.prepare, "active") == ALREADY_EXISTS
    assert code_of(c.prepare, "base") == ALREADY_EXISTS  # kinds share one key space
    assert code_of(c.commit, "view-c", "view") == FAILED_PRECONDITION
    assert code_of(c.commit, "base", "active") == ALREADY_EXISTS
    assert code_of(c.prepare, "k", "active") == INVALID_ARGUMENT  # not committed
    assert code_of(c.mounts, "base") == FAILED_PRECONDITION
    assert code_of(c.remove, "base") == FAILED_PRECONDITION  # the parent of two
    assert code_of(c.update, "base", {}, ["kind"]) == INVALID_ARGUMENT
    assert code_of(c.update, "base", {"x": "y" * 5000}) == INVALID_ARGUMENT
    assert code_of(c.list, 'name=="unclosed') == INVALID_ARGUMENT
    # nothing half-made: the failed calls left what was there
    assert c.names() == ["active", "base", "view"]
    assert c.stat("view").kind == pb.VIEW
    c.remove("active")
    c.remove("view")
    c.remove("base")
    assert "NOT_FOUND: snapshot 'nope' does not exist" in server.log  # containerd's key


def test_namespaces_keep_keys_apart(server):
    a, b, none = Client(server.stub, "ns-a"), Client(server.stub, "ns.b"), \
        Client(server.stub, None)
    committed(a, "layer", {"f": b"a"})
    committed(b, "layer", {"f": b"b"})
    assert a.names() == ["layer"] and b.names() == ["layer"]
    assert none.names() == []  # no namespace: containerd's `default`
    assert Client(server.stub, "default").names() == []
    assert code_of(a.prepare, "x", "missing") == NOT_FOUND
    assert code_of(none.stat, "layer") == NOT_FOUND
    a.prepare("child", "layer")
    b.remove("layer")  # b's own, without a child
    assert b.names() == []
    assert code_of(a.remove, "layer") == FAILED_PRECONDITION  # a's has a child
    (lower,) = lower_dirs(a.mounts("child"))
    assert (lower / "f").read_bytes() == b"a"
    assert code_of(Client(server.stub, "bad/ns").list) == INVALID_ARGUMENT
    assert code_of(Client(server.stub, "a" * 77).stat, "k") == INVALID_ARGUMENT


def test_update_labels_as_containerd(server):
    c = Client(server.stub)
    c.prepare("k", labels={"a": "1", "b": "2"})
    assert dict(c.update("k", {"a": "10", "z": "9"}, ["labels.a"]).labels) == \
        {"a": "10", "b": "2"}
    assert dict(c.update("k", {}, ["labels.b"]).labels) == {"a": "10"}
    assert dict(c.update("k", {"c": "3"}, ["labels"]).labels) == {"c": "3"}
    assert dict(c.update("k", {"d": "4"}).labels) == {"d": "4"}  # no mask: all
    assert dict(c.stat("k").labels) == {"d": "4"}
    before = c.stat("k")
    assert before.updated_at.ToNanoseconds() >= before.created_at.ToNanoseconds()


def test_list_filters(server):
    c = Client(server.stub)
    committed(c, "base", {"f": b"1"})
    c.prepare("a1", "base", labels={"role": "x", "containerd.io/gc.root": "t"})
    c.view("v1", "base")
    assert c.names("kind==committed") == ["base"]
    assert c.names("kind==active", "kind==view") == ["a1", "v1"]
    assert c.names("parent==base,kind!=view") == ["a1"]
    assert c.names('labels."containerd.io/gc.root"') == ["a1"]
    assert c.names("labels.role==x") == ["a1"]
    assert c.names("name~=^a") == ["a1"]


def test_commit_translates_whiteouts_and_opaque_dirs(server):
    """What containerd's tar applier writes into an overlay upper directory (a whiteout
    as a 0/0 character device, an opaque directory as trusted.overlay.opaque=y) is
    stored as the layer's removals."""
    if os.geteuid() != 0:
        pytest.skip("whiteouts are character devices: making one needs root")
    c = Client(server.stub)
    committed(c, "l1", {"gone": b"x", "dir/old": b"y", "keep": b"k"})
    mounts = c.prepare("extract-2", "l1")
    if mounts[0].type != "overlay":
        pytest.skip(f"the server's driver gives {mounts[0].type} mounts, not overlay")
    up = upper_dir(mounts)
    os.mknod(up / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (up / "dir").mkdir()
    os.setxattr(up / "dir", "trusted.overlay.opaque", b"y")
    (up / "dir" / "new").write_bytes(b"n")
    c.commit("l2", "extract-2")
    (lower2, lower1) = lower_dirs(c.view("see", "l2"))
    c.remove("see")
    view = c.prepare("see2", "l2")
    assert len(lower_dirs(view)) == 2
    # the store's tree of l2, through pylayers itself
    out = run(server.store, "snapshots")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "default/l2" in ln]
    assert lines, out.stdout
    from pylayers.layers.repo import Layers
    from pylayers.mounts import Snapshotter
    from pylayers.store import Store
    with Store.open(server.store, create=False) as store:
        layers = Layers(store)
        info = Snapshotter(layers).stat("default/l2")
        paths = {e.path for e in layers.tree(bytes.fromhex(info.layer))}
    assert b"gone" not in paths and b"dir/old" not in paths
    assert {b"keep", b"dir", b"dir/new"} <= paths


def test_restart_loses_nothing_and_gc_keeps_containerd_snapshots(tmp_path):
    store, sock = tmp_path / "store", tmp_path / "s.sock"
    srv = Server(store, sock)
    c = Client(srv.stub, "k8s.io")
    committed(c, "base", {"bin/sh": b"#!" + b"x" * 10000})
    up = upper_dir(c.prepare("ctr", "base"))
    (up / "written").write_bytes(b"by the container")
    assert srv.stop() == 0
    assert not sock.exists()
    # between two servers: pylayers' own gc must not collect containerd's snapshots
    out = run(store, "gc")
    assert out.returncode == 0, out.stderr
    srv = Server(store, sock)
    try:
        c = Client(srv.stub, "k8s.io")
        assert c.names() == ["base", "ctr"]
        assert dict(c.stat("base").labels) == {}  # the gc root label is pylayers' own
        assert (upper_dir(c.mounts("ctr")) / "written").read_bytes() == b"by the container"
        c.commit("top", "ctr")
        assert c.stat("top").parent == "base"
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log


def test_sigint_stops_too_and_stale_socket_is_replaced(tmp_path):
    store, sock = tmp_path / "store", tmp_path / "s.sock"
    srv = Server(store, sock)
    # a second server on the same live socket: refused, one line
    out = run(store, "containerd-snapshotter", "--address", str(sock), timeout=60)
    from pylayers.errors import AlreadyExists
    assert out.returncode == AlreadyExists.exit_code
    assert "another server is listening" in out.stderr and "Traceback" not in out.stderr
    srv.proc.kill()  # no chance to clean up: the socket stays
    srv.proc.wait()
    srv.channel.close()
    assert sock.exists()
    srv = Server(store, sock)  # takes over the stale socket
    assert Client(srv.stub).names() == []
    assert srv.stop(signal.SIGINT) == 0
    assert not sock.exists()
    not_sock = tmp_path / "file"
    not_sock.write_text("x")
    out = run(store, "containerd-snapshotter", "--address", str(not_sock))
    from pylayers.errors import FailedPrecondition
    assert out.returncode == FailedPrecondition.exit_code and "is not a socket" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_client_gone_mid_call_and_concurrent_clients(server):
    """Two clients at once, and one that gives up on a call (a deadline shorter than the
    commit): every snapshot ends whole, and the server keeps serving."""
    import threading

    c1, c2 = Client(server.stub, "one"), Client(server.stub, "two")
    errors = []

    def work(c: Client, tag: str) -> None:
        try:
            for i in range(5):
                committed(c, f"{tag}{i}", {"f": tag.encode() * 1000},
                          parent=f"{tag}{i - 1}" if i else "")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c, t)) for c, t in ((c1, "a"), (c2, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert c1.names() == [f"a{i}" for i in range(5)]
    assert c2.names() == [f"b{i}" for i in range(5)]

    up = upper_dir(c1.prepare("big", "a4"))
    (up / "big").write_bytes(os.urandom(1 << 20) * 32)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Commit(pb.CommitSnapshotRequest(name="bigc", key="big"),
                           metadata=md("one"), timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the call went on, or never started: calls are served one at a time, so the next
    # sees one whole state, either way
    names = c1.names()
    assert ("bigc" in names) != ("big" in names), names
    assert c1.stat("bigc" if "bigc" in names else "big").kind in (pb.COMMITTED, pb.ACTIVE)
    assert c2.names() == [f"b{i}" for i in range(5)]


def test_cleanup_removes_orphaned_directories_only(server):
    """A directory under STORE/snapshots that no record names (a process killed between
    its steps) goes at Cleanup; live snapshots' directories stay."""
    c = Client(server.stub)
    committed(c, "base", {"f": b"1"})
    up = upper_dir(c.prepare("live", "base"))
    (up / "mine").write_bytes(b"kept")
    orphan = server.store / "snapshots" / "0123456789abcdef"
    (orphan / "fs" / "sub").mkdir(parents=True)
    (orphan / "fs" / "sub" / "file").write_bytes(b"left behind")
    not_ours = server.store / "snapshots" / "README"
    not_ours.mkdir()
    c.cleanup()
    assert not orphan.exists()
    assert not_ours.exists()  # not a snapshot directory's name: left alone
    assert (up / "mine").read_bytes() == b"kept"
    assert c.names() == ["base", "live"]
    assert "removed 1 orphaned snapshot directories" in server.log
