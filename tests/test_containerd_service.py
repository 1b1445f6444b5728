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


def test_commit_with_a_parent_as_containerd_2_2(server):
    """containerd 2.2's CommitSnapshotRequest.parent: the snapshot's own parent is
    accepted, another is InvalidArgument, a rebase of a parentless one Unimplemented
    (pylayers does not declare the "rebase" capability); nothing changes on refusal."""
    c = Client(server.stub)
    committed(c, "base", {"f": b"1"})
    committed(c, "other", {"g": b"2"})
    c.prepare("child", "base")
    c.prepare("orphan")

    def commit(name, key, parent):
        server.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, parent=parent),
                           metadata=md("default"))

    assert code_of(commit, "c1", "child", "other") == INVALID_ARGUMENT
    assert code_of(commit, "c2", "orphan", "base") == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(commit, "c3", "missing", "base") == NOT_FOUND
    assert c.names() == ["base", "child", "orphan", "other"]
    commit("c1", "child", "base")
    assert (c.stat("c1").parent, c.stat("c1").kind) == ("base", pb.COMMITTED)
    assert "UNIMPLEMENTED: cannot rebase snapshot 'orphan'" in server.log


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_delivered_to_any_thread_stops_it(tmp_path, sig):
    """The kernel delivers a process's signal to any of its threads: sent to one of
    gRPC's threads (tgkill), SIGTERM or SIGINT still stops the server promptly."""
    import ctypes

    srv = Server(tmp_path / "store", tmp_path / "s.sock")
    Client(srv.stub).prepare("k")  # the worker threads exist
    pid = srv.proc.pid
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, "the server has no threads but its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234 if os.uname().machine == "x86_64" else None
    if sys_tgkill is None:
        pytest.skip("tgkill's syscall number is only known here for x86_64")
    srv.channel.close()
    assert libc.syscall(sys_tgkill, pid, tids[-1], int(sig)) == 0, ctypes.get_errno()
    try:
        assert srv.proc.wait(15) == 0, srv.log
    except subprocess.TimeoutExpired:
        raise AssertionError("a signal to a non-main thread did not stop the server") \
            from None
    assert not srv.sock.exists()
    assert "Traceback" not in srv.log


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


# -- clients that go away, clients that race ----------------------------------------------


def fsck_clean(store: Path) -> None:
    out = run(store, "fsck")
    assert out.returncode == 0, out.stdout + out.stderr


def big_active(c: Client, key: str, mib: int, parent: str = "") -> bytes:
    """An active snapshot holding one file of `mib` MiB of random bytes; its bytes."""
    up = upper_dir(c.prepare(key, parent))
    data = os.urandom(mib << 20)  # nothing to dedup: the commit stores every byte
    (up / "big").write_bytes(data)
    return data


def whole_or_absent(c: Client, active: str, name: str, data: bytes) -> str:
    """After a call on `active` whose client went away: the snapshot is either still
    the active one or wholly committed as `name` (its bytes all there), never both nor
    neither; returns which."""
    names = c.names()
    assert (active in names) != (name in names), names
    if active in names:
        assert c.stat(active).kind == pb.ACTIVE
        assert (upper_dir(c.mounts(active)) / "big").read_bytes() == data
        return "active"
    assert c.stat(name).kind == pb.COMMITTED
    (lower,) = lower_dirs(c.view("check-" + name, name))
    assert (lower / "big").read_bytes() == data
    c.remove("check-" + name)
    return "committed"


CLIENT = """
import sys, grpc
from pylayers.containerd import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
stub = pb_grpc.SnapshotsStub(grpc.insecure_channel("unix:" + sys.argv[1]))
md = (("containerd-namespace", "default"),)
print("calling", flush=True)
if sys.argv[2] == "commit":
    stub.Commit(pb.CommitSnapshotRequest(name=sys.argv[4], key=sys.argv[3]), metadata=md)
else:
    stub.Prepare(pb.PrepareSnapshotRequest(key=sys.argv[3], parent=sys.argv[4]), metadata=md)
print("done", flush=True)
"""


def killed_client(server: Server, *args: str, delay: float) -> bool:
    """A client process making one call, SIGKILLed `delay` seconds after it starts the
    call; whether the call was still in flight then (the process still waiting for its
    answer)."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(server.sock), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=server.store.parent)
    assert proc.stdout.readline().strip() == b"calling", proc.stderr.read()
    time.sleep(delay)
    in_flight = proc.poll() is None
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return in_flight


DELAYS = (0.3, 0.1, 0.03, 0.01, 0.001)  # shorter each try, until the kill is mid-call


def test_client_killed_mid_commit_of_a_large_snapshot(server):
    """containerd killed during a Commit of a large snapshot: the server finishes the
    commit or never starts it, leaves one whole snapshot, and keeps serving. (The
    kill comes sooner on each try until the call is still in flight when it lands.)"""
    c = Client(server.stub)
    mid_call = False
    for i, delay in enumerate(DELAYS):
        data = big_active(c, f"extract-big{i}", 192)
        mid_call = killed_client(server, "commit", f"extract-big{i}", f"big{i}",
                                 delay=delay)
        assert whole_or_absent(c, f"extract-big{i}", f"big{i}", data) in (
            "active", "committed")
        if mid_call:
            break
    assert mid_call, "every call ended before its client was killed"
    committed(c, "after", {"f": b"still serving"})
    assert c.stat("after").kind == pb.COMMITTED
    fsck_clean(server.store)


def test_client_cancels_mid_prepare_and_closes_its_channel(server):
    """A real gRPC client cancelling a Prepare on a large parent (whose lower directory
    the call builds) and closing its channel: the key is then whole or absent, and
    the server answers the next client."""
    c = Client(server.stub)
    data = big_active(c, "extract-big", 128)
    c.commit("big", "extract-big")
    channel = grpc.insecure_channel(f"unix:{server.sock}")
    stub = pb_grpc.SnapshotsStub(channel)
    fut = stub.Prepare.future(pb.PrepareSnapshotRequest(key="run", parent="big"),
                              metadata=md("default"))
    time.sleep(0.05)
    cancelled = fut.cancel()
    channel.close()
    if cancelled:
        with pytest.raises(grpc.FutureCancelledError):
            fut.result()
    names = c.names()
    if "run" in names:  # the server finished the call: a whole snapshot
        (lower,) = lower_dirs(c.mounts("run"))
        assert (lower / "big").read_bytes() == data
        c.remove("run")
    assert c.names() == ["big"]
    c.prepare("run2", "big")  # still serving
    # a client process killed mid-Prepare on another large parent (a new parent each
    # try: a parent's lower directory is built once)
    mid_call = False
    for i, delay in enumerate(DELAYS):
        data2 = big_active(c, f"extract-p{i}", 128)
        c.commit(f"p{i}", f"extract-p{i}")
        mid_call = killed_client(server, "prepare", f"run-p{i}", f"p{i}", delay=delay)
        if f"run-p{i}" in c.names():  # the server finished it: whole
            (lower,) = lower_dirs(c.mounts(f"run-p{i}"))
            assert (lower / "big").read_bytes() == data2
        if mid_call:
            break
    assert mid_call, "every call ended before its client was killed"
    c.cleanup()
    fsck_clean(server.store)


def test_two_clients_race_on_the_same_namespace_and_keys(server):
    """Two clients (two channels, as two containerd processes) doing prepare, commit
    and remove on the same keys of one namespace at once: each call succeeds or gets
    containerd's error kind, and what is left adds up."""
    import threading

    setup = Client(server.stub, "shared")
    committed(setup, "base", {"f": b"base"})
    allowed = {"prepare": {"OK", "ALREADY_EXISTS"},
               "commit": {"OK", "NOT_FOUND", "ALREADY_EXISTS"},
               "remove": {"OK", "NOT_FOUND"}}
    tally: dict[str, dict[str, int]] = {op: {} for op in allowed}
    lock = threading.Lock()
    failures: list[BaseException] = []
    rounds = 25

    def client() -> None:
        channel = grpc.insecure_channel(f"unix:{server.sock}")
        c = Client(pb_grpc.SnapshotsStub(channel), "shared")
        try:
            for i in range(rounds):
                for op, call, args in (("prepare", c.prepare, (f"k{i}", "base")),
                                       ("commit", c.commit, (f"c{i}", f"k{i}")),
                                       ("remove", c.remove, (f"c{i}",))):
                    try:
                        call(*args)
                        code = "OK"
                    except grpc.RpcError as err:
                        code = err.code().name
                        assert "\n" not in err.details()
                    with lock:
                        tally[op][code] = tally[op].get(code, 0) + 1
        except BaseException as e:  # reported below
            failures.append(e)
        finally:
            channel.close()

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures
    for op, codes in tally.items():
        assert set(codes) <= allowed[op], tally
        assert sum(codes.values()) == 2 * rounds
    infos = {i.name: i for i in setup.list()}
    active = {n for n, i in infos.items() if i.kind == pb.ACTIVE}
    done = {n for n, i in infos.items() if i.kind == pb.COMMITTED} - {"base"}
    ok = {op: codes.get("OK", 0) for op, codes in tally.items()}
    assert ok["prepare"] >= rounds  # every key was prepared at least once
    assert ok["prepare"] - ok["commit"] == len(active), (tally, sorted(infos))
    assert ok["commit"] - ok["remove"] == len(done), (tally, sorted(infos))
    assert all(infos[n].parent == "base" for n in active | done)
    for n in active:
        setup.remove(n)
    for n in done:
        setup.remove(n)
    assert setup.names() == ["base"]
    fsck_clean(server.store)
