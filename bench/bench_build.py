"""`pylayers build` of a multi-stage project: a cold build, a fully cached rebuild, and a
rebuild after a one-file source edit, with the time and the bytes newly stored per step
(needs root, /bin/busybox and mount+PID namespaces, as the builder does).

The project: a busybox-static base made FROM scratch; a build stage that copies a
vendored dependency tree (rarely changing, --deps-mib), installs it (a tar of it), then
copies the sources (--files small files), builds an artifact from them (a gzip'd tar and
a checksum) and runs a check; a final stage that copies only the installed dependencies
and the artifact. The edit changes one source file's bytes.

With --registry (Debian's docker-registry, started on 127.0.0.1 for the run): the cold
build exports its cache (--cache-to); a fresh store ("a fresh CI machine") builds the
project with --cache-from, and another builds the edited project with the cache from
before the edit: time, steps run, bytes received from the registry, against the cold
build; the one-file edit then exports its cache (the bytes it sends). --noop-layers N
also builds an N-step Dockerfile, exports its cache, and times the export again with
nothing new (its requests and blob bytes sent).

Run: python -m bench.bench_build [--files 2000] [--deps-mib 32] [--registry]
     [--noop-layers 200] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pylayers import Layers, Store
from pylayers.build.builder import Builder, StepEvent

from .bench_snapshot import machine

BUSYBOX = Path("/bin/busybox")

DOCKERFILE = """\
FROM scratch AS base
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]

FROM base AS build
WORKDIR /work
COPY deps/ /work/deps/
RUN mkdir -p /opt && tar -cf /opt/deps.tar deps && rm -rf deps
COPY src/ /work/src/
RUN mkdir -p /out && tar -czf /out/app.tar.gz src && md5sum /out/app.tar.gz > /out/app.md5
RUN md5sum -c /out/app.md5 && test -s /out/app.tar.gz

FROM base
COPY --from=build /opt/deps.tar /opt/deps.tar
COPY --from=build /out/ /app/
CMD ["cat", "/app/app.md5"]
"""

WORDS = ("def class return import self value items index table layer chunk store build "
         "cache key miss hit mount commit parent stage step file path mode owner").split()


def text(rng: random.Random, size: int) -> bytes:
    out = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def make_project(root: Path, files: int, deps_mib: int) -> None:
    rng = random.Random(1234)
    shutil.copy(BUSYBOX, root / "busybox")
    (root / "Dockerfile").write_text(DOCKERFILE)
    deps = root / "deps"
    per = 256 << 10
    for i in range(max(1, (deps_mib << 20) // per)):
        d = deps / f"pkg{i // 16:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i:04d}.bin").write_bytes(rng.randbytes(per))
    src = root / "src"
    for i in range(files):
        d = src / f"module{i // 50:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.py").write_bytes(text(rng, rng.randint(512, 8192)))


def run_build(store_path: Path, ctx: Path, cache_from: tuple[str, ...] = (),
              cache_to: str | None = None) -> dict:
    steps: list[StepEvent] = []
    extra: dict = {}
    with Store.open(store_path) as store:
        before = store.disk_usage()
        t = time.perf_counter()
        builder = Builder(Layers(store), on_event=lambda e: steps.append(e) if e.done else None)
        if cache_from or cache_to:
            from pylayers.build.registrycache import RegistryCache

            remote = RegistryCache(Layers(store), cache_from, cache_to, insecure=True)
            try:
                res = remote.build(builder, ctx)
            finally:
                remote.close()
            extra = {"registry_bytes_received": remote.bytes_received,
                     "layers_pulled": remote.pulled}
            if remote.export_result is not None:
                extra["export"] = remote.export_result.to_json()
        else:
            res = builder.build(ctx)
        total = time.perf_counter() - t
        after = store.disk_usage()
    return {**extra,
        "seconds": round(total, 3),
        "stored_bytes_delta": after - before,
        "new_bytes": sum(s.new_bytes for s in steps),
        "run": res.built, "cached": res.cached,
        "layer": res.layer_id.hex(),
        "steps": [{"stage": s.stage, "step": s.text, "cached": s.cached,
                   "seconds": round(s.seconds, 3), "new_bytes": s.new_bytes}
                  for s in steps if s.layer is not None],
    }


def noop_export(work: Path, layers: int, host: str) -> dict:
    """An N-step Dockerfile built and exported, then exported again with nothing new."""
    from pylayers.build.registrycache import RegistryCache

    ctx = work / "many"
    ctx.mkdir()
    shutil.copy(BUSYBOX, ctx / "busybox")
    (ctx / "Dockerfile").write_text(
        "FROM scratch\nCOPY busybox /bin/busybox\n"
        + "".join(f'RUN ["/bin/busybox", "touch", "/f{i}"]\n' for i in range(layers - 1)))
    ref = f"{host}/bench/many:cache"
    with Store.open(work / "many-store") as store:
        b = Builder(Layers(store))
        t = time.perf_counter()
        b.build(ctx)
        build_s = time.perf_counter() - t
        out = {"layers": layers, "build_seconds": round(build_s, 3)}
        for name in ("first_export", "noop_export"):
            remote = RegistryCache(Layers(store), (), ref, insecure=True)
            try:
                t = time.perf_counter()
                got = remote.export(b.entries)
                out[name] = {"seconds": round(time.perf_counter() - t, 3), **got.to_json()}
            finally:
                remote.close()
    return out


def table(name: str, r: dict) -> str:
    pulled = (f", {r['registry_bytes_received']} bytes from the registry "
              f"({r['layers_pulled']} layers pulled)" if "registry_bytes_received" in r
              else "")
    sent = (f", export sent {r['export']['blob_bytes_sent']} blob bytes "
            f"({r['export']['layers_pushed']} layers)" if "export" in r else "")
    lines = [f"### {name}: {r['seconds']:.2f} s, {r['run']} run, {r['cached']} cached, "
             f"{r['new_bytes']} bytes new, store grew {r['stored_bytes_delta']} bytes"
             + pulled + sent, "",
             "| stage | step | result | seconds | new bytes |", "|---|---|---|---:|---:|"]
    for s in r["steps"]:
        lines.append(f"| {s['stage']} | `{s['step']}` | {'CACHED' if s['cached'] else 'run'} "
                     f"| {s['seconds']:.3f} | {s['new_bytes']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_build",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000, help="source files")
    ap.add_argument("--deps-mib", type=int, default=32, help="vendored dependencies, MiB")
    ap.add_argument("--work", type=Path, help="work directory (default: a new one in $TMPDIR)")
    ap.add_argument("--out", type=Path, help="write the results as JSON (and .md beside)")
    ap.add_argument("--registry", action="store_true",
                    help="also the shared cache rows (needs docker-registry)")
    ap.add_argument("--noop-layers", type=int, default=0,
                    help="with --registry: time a no-op export of an N-layer build")
    args = ap.parse_args()
    if os.geteuid() != 0 or not BUSYBOX.is_file():
        print("bench_build: needs root and /bin/busybox (busybox-static)", file=sys.stderr)
        return 2
    if args.registry and shutil.which("docker-registry") is None:
        print("bench_build: --registry needs docker-registry", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-build-", dir=args.work))
    registry = None
    rows = ["cold", "cached", "one_file_edit"]
    try:
        ctx = work / "project"
        ctx.mkdir()
        make_project(ctx, args.files, args.deps_mib)
        store = work / "store"
        ref = None
        if args.registry:
            from .registry_transfer import Registry

            registry = Registry(work / "registry")
            ref = f"{registry.host}/bench/project:cache"
        results = {"machine": machine(), "files": args.files, "deps_mib": args.deps_mib,
                   "cold": run_build(store, ctx, cache_to=ref),
                   "cached": run_build(store, ctx)}
        if ref is not None:
            results["fresh_machine_cache_from"] = run_build(work / "fresh1", ctx, (ref,))
            rows.append("fresh_machine_cache_from")
        edited = ctx / "src" / "module000" / "file00007.py"
        edited.write_bytes(edited.read_bytes() + b"# edited\n")
        if ref is not None:  # the edit on a fresh machine, the cache from before it
            results["fresh_machine_one_file_edit"] = run_build(work / "fresh2", ctx, (ref,))
            rows.append("fresh_machine_one_file_edit")
        results["one_file_edit"] = run_build(store, ctx, cache_to=ref)
        rows.append(rows.pop(2))
        if ref is not None:
            if args.noop_layers:
                results["noop_export"] = noop_export(work, args.noop_layers, registry.host)
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    md = "\n\n".join(table(k, results[k]) for k in rows)
    if "noop_export" in results:
        n = results["noop_export"]
        md += (f"\n\n### no-op export of a {n['layers']}-layer build\n\n"
               "| export | seconds | requests | blob bytes sent | layers pushed |\n"
               "|---|---:|---:|---:|---:|\n" + "\n".join(
                   f"| {k} | {n[k]['seconds']:.3f} | {n[k]['requests']} | "
                   f"{n[k]['blob_bytes_sent']} | {n[k]['layers_pushed']} |"
                   for k in ("first_export", "noop_export")))
    print(md)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"# pylayers build: {args.files} source files, {args.deps_mib} MiB of "
            f"dependencies\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
