"""Where a thread of ours (or a child's) is blocked in the kernel: the syscall and its path.

/proc/self/task/TID/syscall (proc(5)) shows a blocked thread's syscall number and
arguments; /proc/self/task/TID/wchan the kernel function it sleeps in
(`request_wait_answer` for FUSE, `rpc_wait_bit_killable` for NFS). For the *at() calls
the file walk makes, argument 0 is a directory fd whose path readlink(/proc/self/fd/N)
gives without touching the filesystem (the kernel prints the dentry), and argument 1 a
pointer into our own memory, read through /proc/self/mem so that a bad pointer is an
EIO, never a crash. Nothing here can block on the hung filesystem itself.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

# syscall number -> (name, argument 0 is a dir fd, argument 1 is a path pointer)
_X86_64 = {257: "openat", 262: "newfstatat", 332: "statx", 263: "unlinkat", 217: "getdents64",
           5: "fstat", 4: "stat", 6: "lstat", 2: "open", 84: "rmdir", 87: "unlink", 3: "close"}
_AARCH64 = {56: "openat", 79: "newfstatat", 291: "statx", 35: "unlinkat", 61: "getdents64",
            80: "fstat", 57: "close"}
_AT_CALLS = {"openat", "newfstatat", "statx", "unlinkat"}  # (dirfd, path, ...)
_FD_CALLS = {"getdents64", "fstat", "close"}  # (fd, ...)
_PATH_CALLS = {"stat", "lstat", "open", "rmdir", "unlink"}  # (path, ...)
_AT_FDCWD = 0xFFFFFF9C  # -100 as the kernel prints a 32-bit int argument


@dataclass(frozen=True, slots=True)
class Blocked:
    """A snapshot of one blocked thread: syscall name, kernel wait function, best path."""

    syscall: str
    wchan: str
    path: str | None

    def describe(self) -> str:
        where = f" on {self.path}" if self.path else ""
        return f"in {self.syscall}(){where}, waiting in {self.wchan or 'the kernel'}"


def _read(path: str, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode(errors="replace").strip()
    except OSError:
        return ""


def _fd_path(fd: int, pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _c_string(addr: int, pid: str, limit: int = 4096) -> str | None:
    """A NUL-terminated string at `addr` in pid's memory, page by page (no crash on a bad
    pointer: /proc/PID/mem returns EIO for unmapped memory)."""
    out = b""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        while len(out) < limit:
            chunk = 4096 - (addr + len(out)) % 4096
            data = os.pread(fd, chunk, addr + len(out))
            if not data:
                break
            nul = data.find(b"\0")
            if nul >= 0:
                return (out + data[:nul]).decode(errors="replace")
            out += data
    except (OSError, OverflowError, ValueError):
        return None
    finally:
        os.close(fd)
    return None


def parse_syscall(text: str, machine: str) -> tuple[str, list[int]] | None:
    """(syscall name, arguments) from a /proc/TID/syscall line, or None when the thread is
    running, not in a syscall, or the number is not one the file walk makes. Pure."""
    fields = text.split()
    if not fields or not fields[0].lstrip("-").isdigit():
        return None  # "running", or empty
    table = _AARCH64 if machine in ("aarch64", "arm64") else _X86_64
    name = table.get(int(fields[0]))
    if name is None:
        return None
    try:
        args = [int(a, 16) for a in fields[1:7]]
    except ValueError:
        return None
    return name, args


def blocked_in(tid: int, pid: int | None = None) -> Blocked | None:
    """Where thread `tid` of process `pid` (default: this one; a child of ours, say) is
    blocked, or None when it is not in a syscall."""
    who = "self" if pid is None else str(pid)
    base = f"/proc/{who}/task/{tid}"
    raw = _read(f"{base}/syscall")
    wchan = _read(f"{base}/wchan", 256)
    wchan = "" if wchan == "0" else wchan
    parsed = parse_syscall(raw, platform.machine())
    if parsed is None:
        num = raw.split()[0] if raw else ""
        if not num.isdigit():
            return None
        return Blocked(f"syscall {num}", wchan, None)
    name, args = parsed
    path: str | None = None
    if name in _AT_CALLS and len(args) >= 2:
        base_dir = None if (args[0] & 0xFFFFFFFF) == _AT_FDCWD else _fd_path(args[0], who)
        leaf = _c_string(args[1], who)
        if base_dir and leaf:
            path = leaf if leaf.startswith("/") else f"{base_dir.rstrip('/')}/{leaf}"
        else:
            path = leaf or base_dir
    elif name in _FD_CALLS and args:
        path = _fd_path(args[0], who)
    elif name in _PATH_CALLS and args:
        path = _c_string(args[0], who)
    return Blocked(name, wchan, path)
