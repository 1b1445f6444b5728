#!/usr/bin/env python3
"""Run a command as on a machine without some tools and without user namespaces,
without uninstalling anything (the machine may be shared):

    python3 .ci/without.py [--tools setfacl,getfacl,...] [--no-userns] -- pytest

--tools: PATH is rebuilt as directories of symlinks to every entry of each PATH
directory except the named tools (so `shutil.which` and `subprocess` do not find them).
--no-userns: a seccomp filter, inherited by every child, makes unshare(2) and clone(2)
with CLONE_NEWUSER fail with EPERM and clone3(2) with ENOSYS (glibc falls back to
clone), as Docker's default profile does: `unshare -U` fails as where the kernel
refuses user namespaces. Nothing outside this process tree is affected.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile

DEFAULT_TOOLS = "setfacl,getfacl,chacl,setfattr,getfattr,attr,b3sum"

# seccomp/BPF constants (linux/filter.h, linux/seccomp.h, asm/unistd_64.h)
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
AUDIT_ARCH_X86_64, NR_CLONE, NR_UNSHARE, NR_CLONE3 = 0xC000003E, 56, 272, 435
CLONE_NEWUSER, EPERM, ENOSYS = 0x10000000, 1, 38
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def hide_tools(tools: set[str]) -> str:
    """A directory holding, for each PATH directory in order (named 0, 1, ...), a
    farm of symlinks to its entries minus `tools`."""
    farm = tempfile.mkdtemp(prefix="without-tools-")
    os.chmod(farm, 0o755)  # tests run some commands as another uid
    for i, d in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not os.path.isdir(d):
            continue
        mirror = os.path.join(farm, str(i))
        os.mkdir(mirror)
        for name in os.listdir(d):
            if name not in tools:
                os.symlink(os.path.join(d, name), os.path.join(mirror, name))
    return farm


def forbid_user_namespaces() -> None:
    if platform.machine() != "x86_64":
        sys.exit("--no-userns: the filter is written for x86_64 only")

    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    prog = b"".join([
        ins(LD_W_ABS, 0, 0, 4),                   # 0: A = arch
        ins(JEQ_K, 0, 6, AUDIT_ARCH_X86_64),      # 1: other arch -> 8 allow
        ins(LD_W_ABS, 0, 0, 0),                   # 2: A = syscall number
        ins(JEQ_K, 2, 0, NR_UNSHARE),             # 3: -> 6
        ins(JEQ_K, 1, 0, NR_CLONE),               # 4: -> 6
        ins(JEQ_K, 4, 2, NR_CLONE3),              # 5: -> 10 enosys, else 8 allow
        ins(LD_W_ABS, 0, 0, 16),                  # 6: A = low word of flags (args[0])
        ins(JSET_K, 1, 0, CLONE_NEWUSER),         # 7: -> 9 eperm, else 8 allow
        ins(RET_K, 0, 0, RET_ALLOW),              # 8
        ins(RET_K, 0, 0, RET_ERRNO | EPERM),      # 9
        ins(RET_K, 0, 0, RET_ERRNO | ENOSYS),     # 10
    ])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if os.geteuid() != 0 and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        sys.exit(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0):
        sys.exit(f"prctl(SECCOMP): {os.strerror(ctypes.get_errno())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", default=DEFAULT_TOOLS,
                    help=f"comma-separated tools to hide (default {DEFAULT_TOOLS}; '' none)")
    ap.add_argument("--no-userns", action="store_true", help="forbid new user namespaces")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command")
    tools = {t for t in args.tools.split(",") if t}
    farm = hide_tools(tools) if tools else None
    if farm:
        os.environ["PATH"] = os.pathsep.join(
            os.path.join(farm, d) for d in sorted(os.listdir(farm), key=int))
    try:
        if args.no_userns:
            forbid_user_namespaces()
        code = subprocess.run(cmd).returncode
    finally:
        if farm:
            shutil.rmtree(farm)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
