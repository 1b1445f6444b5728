"""Bytes over the wire for a series of image versions: standard layers against
chunk-level transfer (docs/format.md, "Chunk artifacts"), side by side in one run,
through real registries (Debian's docker-registry on 127.0.0.1, two of them, so the
standard push never mounts what the chunked push sent and the reverse).

The series: a Python environment built by pip from real wheels (bench/pyenv_wheels.py,
six versions, a few packages upgraded each), as a Dockerfile builds it: every version
is an image of two layers, `RUN pip install` (the whole environment, rebuilt) and
`COPY app` (a small app, a few files edited per version). For each version:

- push to the standard registry (`--no-chunks`) and to the chunked one (the same image
  plus its chunk artifact): bytes sent;
- pull into a store that pulled every earlier version, the standard way and through the
  chunk artifact: bytes received, checked to give the pusher's very layers;
- the *changed fraction*: bytes of files that are new or changed since the version
  before, over the version's file bytes; the goal (issue 11): pulling the next tag
  transfers at most the changed fraction plus 5% of a full (standard) pull.

Run (the wheels once: python -m bench.pyenv_wheels fetch):

    python -m bench.registry_transfer [--versions N] [--out DIR] [--work DIR]

Writes registry-transfer.json and .md into --out (default bench/out). pylayers runs as
the installed `python -m pylayers` in child processes, as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import pyenv_wheels

REPO = Path(__file__).resolve().parent.parent
GOAL_SLACK = 0.05  # the "+ 5% of a full pull"


class Registry:
    """A docker-registry process on 127.0.0.1 with its own storage."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.host = f"127.0.0.1:{port}"
        config = root / "config.yml"
        config.write_text("\n".join([
            "version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {root / 'storage'}",
            "http:", f"  addr: {self.host}", ""]))
        self.log = open(root / "registry.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["docker-registry", "serve", os.fspath(config)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("docker-registry did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def cli(store: Path, *args: str) -> str:
    """The installed pylayers CLI (run outside the source tree); its stdout."""
    proc = subprocess.run([sys.executable, "-m", "pylayers", "--store", os.fspath(store),
                           *args], cwd="/", capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pylayers {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def file_digests(root: Path) -> dict[str, tuple[int, str]]:
    """Each regular file's (size, sha1), by path relative to `root`."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (os.fstat(f.fileno()).st_size,
                                                 hashlib.file_digest(f, "sha1").hexdigest())
    return out


def changed_fraction(old: dict, new: dict) -> float:
    total = sum(size for size, _ in new.values())
    changed = sum(size for path, (size, h) in new.items()
                  if old.get(path, (None, None))[1] != h)
    return changed / total if total else 0.0


def write_app(app: Path, version: int) -> None:
    """A small app: 200 text files; each version edits three and adds one."""
    rng = random.Random(7)
    words = [f"name{i}" for i in range(500)] + ["def", "return", "class", "import", "self"]
    if version == 0:
        for i in range(200):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(200, 3000)))
            (app / f"mod{i:03d}.py").parent.mkdir(parents=True, exist_ok=True)
            (app / f"mod{i:03d}.py").write_text(text)
        return
    rng = random.Random(100 + version)
    for i in rng.sample(range(200), 3):
        p = app / f"mod{i:03d}.py"
        p.write_text(p.read_text() + f"\n# edit {version}\n")
    (app / f"new{version}.py").write_text(" ".join(rng.choice(words) for _ in range(2000)))


def run(work: Path, cache: Path, versions: int) -> dict:
    std_reg = Registry(work / "registry-std")
    chunk_reg = Registry(work / "registry-chunks")
    try:
        return _series(work, cache, versions, std_reg.host, chunk_reg.host)
    finally:
        std_reg.stop()
        chunk_reg.stop()


def _series(work: Path, cache: Path, versions: int, std: str, chunked: str) -> dict:
    pusher, std_puller, chunk_puller = work / "pusher", work / "pull-std", work / "pull-chunks"
    root = work / "image"
    site = root / "usr/lib/python3.11/site-packages"
    app_src = work / "app-src"
    rows = []
    prev: dict = {}
    for v in range(versions):
        pyenv_wheels.install_version(cache, site, v)
        write_app(app_src, v)
        shutil.rmtree(root / "app", ignore_errors=True)
        env_layer = cli(pusher, "snapshot", os.fspath(root)).split()[-1]
        shutil.copytree(app_src, root / "app")
        top = cli(pusher, "snapshot", os.fspath(root), "--parent", env_layer).split()[-1]
        files = file_digests(root)
        row: dict = {"version": v, "files_bytes": sum(s for s, _ in files.values()),
                     "changed_fraction": changed_fraction(prev, files)}
        prev = files
        tag = f"app:v{v}"
        t0 = time.monotonic()
        p_std = json.loads(cli(pusher, "push", "--insecure", "--no-chunks", "--json", top,
                               f"{std}/{tag}"))
        t1 = time.monotonic()
        p_chunk = json.loads(cli(pusher, "push", "--insecure", "--chunks", "--json", top,
                                 f"{chunked}/{tag}"))
        t2 = time.monotonic()
        g_std = json.loads(cli(std_puller, "pull", "--insecure", "--no-chunks", "--json",
                               f"{std}/{tag}"))
        t3 = time.monotonic()
        g_chunk = json.loads(cli(chunk_puller, "pull", "--insecure", "--json",
                                 f"{chunked}/{tag}"))
        t4 = time.monotonic()
        if g_chunk["chunk_transfer"] is None or g_chunk["id"] != top:
            raise SystemExit(f"v{v}: the chunked pull did not give the pusher's layers")
        full = _full_pull_bytes(std, tag)
        row.update({
            "image_bytes": full,
            "push_std": p_std["bytes_sent"], "push_chunks": p_chunk["bytes_sent"],
            "push_artifact": p_chunk["chunk_artifact"]["bytes_sent"],
            "pull_std": g_std["bytes_received"], "pull_chunks": g_chunk["bytes_received"],
            "chunks_fetched": g_chunk["chunk_transfer"]["chunks_fetched"],
            "seconds": {"push_std": round(t1 - t0, 1), "push_chunks": round(t2 - t1, 1),
                        "pull_std": round(t3 - t2, 1), "pull_chunks": round(t4 - t3, 1)},
        })
        row["goal_bytes"] = int((row["changed_fraction"] + GOAL_SLACK) * full)
        row["goal_met"] = v == 0 or row["pull_chunks"] <= row["goal_bytes"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    last = f"app:v{versions - 1}"
    again = json.loads(cli(pusher, "push", "--insecure", "--chunks", "--json", top,
                           f"{chunked}/{last}"))
    return {"series": "pyenv-wheels rebuilt (RUN pip install + COPY app)", "rows": rows,
            "repush_bytes_sent": again["blob_bytes_sent"],
            "repush_artifact_blobs_sent": again["chunk_artifact"]["blobs_sent"]}


def _full_pull_bytes(host: str, tag: str) -> int:
    """Manifest, config and layer blob bytes of the image: what a pull into an empty
    store receives the standard way."""
    import urllib.request

    name, _, ref = tag.partition(":")
    req = urllib.request.Request(f"http://{host}/v2/{name}/manifests/{ref}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
    doc = json.loads(data)
    return len(data) + doc["config"]["size"] + sum(d["size"] for d in doc["layers"])


def report(res: dict) -> str:
    mib = 1 << 20
    lines = [f"# Registry transfer: standard layers vs chunk-level ({res['series']})", "",
             "Bytes over HTTP (bodies), MiB. *pull*: into a store holding every earlier "
             "version. *goal*: (changed fraction + 5%) x full pull (issue 11).", "",
             "| version | changed | full pull | push std | push chunks (artifact) | "
             "pull std | pull chunks | goal | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| v{r['version']} | {100 * r['changed_fraction']:.1f}% | "
            f"{r['image_bytes'] / mib:.1f} | {r['push_std'] / mib:.1f} | "
            f"{r['push_chunks'] / mib:.1f} ({r['push_artifact'] / mib:.1f}) | "
            f"{r['pull_std'] / mib:.1f} | {r['pull_chunks'] / mib:.2f} | "
            f"{r['goal_bytes'] / mib:.1f} | {'yes' if r['goal_met'] else 'NO'} |")
    rows = res["rows"][1:]
    if rows:
        std = sum(r["pull_std"] for r in rows)
        ch = sum(r["pull_chunks"] for r in rows)
        lines += ["", f"Pulls of the next tag (v1 onwards): standard {std / mib:.1f} MiB, "
                  f"chunk-level {ch / mib:.1f} MiB ({ch / std:.1%} of standard)."]
    lines += [f"Re-push of the last version: {res['repush_bytes_sent']} blob bytes sent, "
              f"{res['repush_artifact_blobs_sent']} artifact blobs sent.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.registry_transfer",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=len(pyenv_wheels.VERSIONS))
    ap.add_argument("--cache", type=Path, default=pyenv_wheels.DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if shutil.which("docker-registry") is None:
        sys.exit("docker-registry is not installed (Debian: docker-registry)")
    if not pyenv_wheels.have_all(args.cache):
        sys.exit(f"{args.cache}: wheels missing (python -m bench.pyenv_wheels fetch)")
    versions = max(1, min(args.versions, len(pyenv_wheels.VERSIONS)))
    work = Path(tempfile.mkdtemp(prefix="pylayers-bench-registry-", dir=args.work))
    try:
        res = run(work, args.cache, versions)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry-transfer.json").write_text(json.dumps(res, indent=1) + "\n")
    text = report(res)
    (args.out / "registry-transfer.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
