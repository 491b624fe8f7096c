"""Read the process table from /proc: one fast pass for a sweep, one full read per process.

`snapshot()` is the hot path. Per process it costs one open/fstat/read/close of
/proc/PID/stat; /proc/PID/status and /proc/PID/exe are read only where the cheap answer is
not enough (root-owned processes, children of root-owned processes). `read_proc()` reads
everything about one process through one /proc/PID directory fd, for `explain` and for the
action layer's re-check just before it acts.
"""

from __future__ import annotations

import gc
import os
import time
from typing import NamedTuple

from pruned.model import Proc, Snapshot

# include/linux/sched.h: set for every kernel thread (kthreadd and its children). Only the
# flag is trusted, never "pid 2 or ppid 2": inside a PID namespace pid 2 is an ordinary process.
PF_KTHREAD = 0x00200000

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STAT_READ = 1024  # /proc/PID/stat is ~300 bytes; comm is at most 64 bytes (kernel threads)
_STATUS_READ = 4096  # "Uid:" is the 9th line; the rest of status is not needed
_STATES = {c.encode(): c for c in "RSDZTtXxIKWPN"}  # interned one-letter states
_GONE = (FileNotFoundError, ProcessLookupError)  # ENOENT / ESRCH: the process exited


class StatFields(NamedTuple):
    """The fields pruned uses from /proc/PID/stat."""

    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    starttime: int  # field 22: clock ticks after boot

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def _split_stat(data: bytes) -> tuple[bytes, str, int, int, int, int, int]:
    """(comm, state, ppid, pgrp, session, flags, starttime) of raw stat bytes, or ValueError."""
    # comm is any bytes but NUL (prctl PR_SET_NAME): spaces, '(', ')' and newlines included,
    # and the kernel does not escape it here. Only the LAST ')' ends it (as psutil and procps do).
    lpar = data.find(b"(")
    rpar = data.rfind(b")")
    if lpar < 0 or rpar < lpar:
        raise ValueError(f"garbled stat: no '(comm)' in {data[:80]!r}")
    f = data[rpar + 2 :].split(None, 20)
    if len(f) < 21:
        raise ValueError(f"truncated stat: {len(f)} fields after comm, need at least 20")
    try:
        return (
            data[lpar + 1 : rpar],
            f[0].decode("ascii"),
            int(f[1]),
            int(f[2]),
            int(f[3]),
            int(f[6]),
            int(f[19]),
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"garbled stat fields: {e}") from None


def _decode_comm(raw: bytes) -> str:
    # backslashreplace: a comm of invalid UTF-8 still prints and journals, and stays recognisable.
    return raw.decode("utf-8", "backslashreplace")


def parse_stat(text: str) -> StatFields:
    """The StatFields of one /proc/PID/stat text; ValueError if it is truncated or garbled."""
    comm, state, ppid, pgrp, session, flags, starttime = _split_stat(
        text.encode("utf-8", "surrogateescape")
    )
    return StatFields(
        comm.decode("utf-8", "surrogateescape"), state, ppid, pgrp, session, flags, starttime
    )


def _uids_from_status(data: bytes) -> tuple[int, int]:
    # "Uid:\treal\teffective\tsaved\tfs". Name: comes first but is escaped by the kernel
    # (a comm holding "\nUid:" prints as "\\nUid:"), so the first line-start match is genuine.
    i = data.find(b"\nUid:")
    if i < 0:
        raise ValueError("no Uid: line in status")
    end = data.find(b"\n", i + 5)
    line = data[i + 5 : end if end >= 0 else len(data)]
    parts = line.split()
    if len(parts) < 2:
        raise ValueError(f"garbled Uid: line {line!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"garbled Uid: line {line!r}") from None


def parse_status_uids(text: str) -> tuple[int, int]:
    """(real uid, effective uid) from /proc/PID/status text; ValueError if there is no Uid: line."""
    return _uids_from_status(b"\n" + text.encode("utf-8", "surrogateescape"))


def parse_cgroup(text: str) -> tuple[str, ...]:
    """The raw "hierarchy-id:controllers:path" lines of /proc/PID/cgroup (v1 and v2 "0::/path")."""
    return tuple(line for line in text.splitlines() if line.count(":") >= 2)


def boot_time(proc_root: str = "/proc") -> float:
    """Boot time in epoch seconds: the btime line of /proc/stat."""
    with open(os.path.join(proc_root, "stat"), "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise ValueError(f"no btime line in {proc_root}/stat")


def _read_at(name: str, dfd: int, size: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_status_uids(name: str, dfd: int) -> tuple[int, int]:
    data = _read_at(name, dfd, _STATUS_READ)
    return _uids_from_status(data)


def snapshot(proc_root: str = "/proc", *, exe_all: bool = False) -> Snapshot:
    """The whole process table in one pass over proc_root (see the module docstring for costs)."""
    taken_at = time.time()
    btime = boot_time(proc_root)
    dfd = os.open(proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # The walk allocates one acyclic Proc per process; with the collector on, tens of thousands
    # of allocations trigger collections that rescan every live object (the last snapshot too).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        procs, vanished, garbled, denied, hidden = _walk(dfd, exe_all)
    finally:
        os.close(dfd)
        if gc_was_enabled:
            gc.enable()
    unreadable: list[str] = []
    if garbled:
        unreadable.append(f"stat of {garbled} processes garbled: skipped")
    if hidden:
        unreadable.append(f"stat or status of {hidden} processes not readable (hidepid=?)")
    if denied:
        hint = "permission denied" if os.geteuid() == 0 else "run as root"
        unreadable.append(f"exe of {denied} processes not readable: {hint}")
    return Snapshot(
        procs=procs,
        taken_at=taken_at,
        boot_time=btime,
        clk_tck=_CLK_TCK,
        vanished=vanished,
        unreadable=tuple(unreadable),
    )


def _walk(dfd: int, exe_all: bool) -> tuple[dict[int, Proc], int, int, int, int]:
    """First pass: stat (+ status and exe for root-owned); second pass: exe of root's children."""
    # Local bindings: this loop runs once per process, and global/attribute lookups show up.
    _open, _fstat, _read, _close, _readlink = os.open, os.fstat, os.read, os.close, os.readlink
    rdonly = os.O_RDONLY | os.O_CLOEXEC
    kflag = PF_KTHREAD
    states = _STATES
    procs: dict[int, Proc] = {}
    root_owned: set[int] = set()
    vanished = garbled = denied = hidden = 0

    for name in os.listdir(dfd):
        if not name.isdigit():
            continue
        try:
            fd = _open(name + "/stat", rdonly, dir_fd=dfd)
        except _GONE:
            vanished += 1
            continue
        except OSError:  # EACCES: /proc mounted with hidepid=, and we are not root
            hidden += 1
            continue
        try:
            # The owner of a file in /proc/PID is the effective uid of a dumpable process, and
            # root for a non-dumpable one, a zombie or a kernel thread: root means "read status".
            owner = _fstat(fd).st_uid
            data = _read(fd, _STAT_READ)
        except _GONE:
            vanished += 1
            continue
        finally:
            _close(fd)
        # _split_stat inlined (a call and a tuple per process are measurable here); the tests
        # run the same table of stat texts through parse_stat() and through this loop.
        lpar = data.find(b"(")
        rpar = data.rfind(b")")
        f = data[rpar + 2 :].split(None, 20)
        try:
            if lpar < 0 or rpar < lpar or len(f) < 21:
                raise ValueError
            state = states.get(f[0]) or f[0].decode("ascii")
            ppid, pgrp, session, flags, starttime = (
                int(f[1]), int(f[2]), int(f[3]), int(f[6]), int(f[19])
            )  # fmt: skip
        except ValueError:  # UnicodeDecodeError is a ValueError
            garbled += 1
            continue
        comm = data[lpar + 1 : rpar].decode("utf-8", "backslashreplace")
        pid = int(name)
        if owner and not flags & kflag:
            procs[pid] = Proc(
                pid,
                starttime,
                ppid,
                owner,
                comm,
                state,
                False,
                None,
                False,
                None,
                (),
                pgrp,
                session,
            )
            continue
        if flags & kflag:
            procs[pid] = Proc(
                pid, starttime, ppid, 0, comm, state, True, 0, False, None, (), pgrp, session
            )
            continue
        # Root-owned user-space process: the exact real uid decides, so a setuid-root program
        # or a non-dumpable process of a user never passes as root.
        try:
            uid, euid = _read_status_uids(name + "/status", dfd)
        except _GONE:
            vanished += 1
            continue
        except (OSError, ValueError):
            # Unverified: keep it as uid 0 with uid_exact=False, which nothing treats as a
            # genuine root process and the uid rail keeps from being acted on.
            hidden += 1
            procs[pid] = Proc(
                pid, starttime, ppid, 0, comm, state, False, None, False, None, (), pgrp, session
            )
            continue
        exe = None
        if uid == 0 or euid == 0:
            root_owned.add(pid)
        if not exe_all:  # exe_all reads every exe in the second pass
            try:
                exe = _readlink(name + "/exe", dir_fd=dfd)
            except PermissionError:
                denied += 1
            except OSError:
                pass  # ENOENT: a zombie has no exe (or it just exited; actors re-check)
        procs[pid] = Proc(
            pid, starttime, ppid, uid, comm, state, False, euid, True, exe, (), pgrp, session
        )

    # Second pass: the exe of every process whose parent is root-owned (sshd's user session
    # under "sshd: user [priv]", slurmstepd's tasks, daemons reparented to pid 1), or of all.
    for pid, p in procs.items():
        if p.kthread or p.exe is not None:
            continue
        if not (exe_all or (p.ppid in root_owned and pid not in root_owned)):
            continue
        try:
            exe = _readlink(f"{pid}/exe", dir_fd=dfd)
        except PermissionError:
            denied += 1
            continue
        except OSError:
            continue
        procs[pid] = Proc(pid, p.starttime, p.ppid, p.uid, p.comm, p.state, False,
                          p.euid, p.uid_exact, exe, (), p.pgid, p.sid)  # fmt: skip
    return procs, vanished, garbled, denied, hidden


def read_proc(pid: int, proc_root: str = "/proc") -> Proc | None:
    """Everything about one process (stat, exact uids, exe, cgroup lines); None if it is gone."""
    # Every read goes through one /proc/PID directory fd: once that process exits, reads through
    # it fail with ESRCH/ENOENT even if the pid is reused, so the fields all describe one process.
    try:
        dfd = os.open(f"{proc_root}/{int(pid)}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except _GONE:
        return None
    except NotADirectoryError:
        return None
    try:
        try:
            fields = _split_stat(_read_at("stat", dfd, _STAT_READ))
            uid, euid = _uids_from_status(_read_at("status", dfd, _STATUS_READ))
            cgroups = parse_cgroup(_read_at("cgroup", dfd, 65536).decode("utf-8", "replace"))
        except _GONE:
            return None
        comm, state, ppid, pgrp, session, flags, starttime = fields
        try:
            exe: str | None = os.readlink("exe", dir_fd=dfd)
        except OSError:
            exe = None  # zombie, kernel thread, or not root
        return Proc(pid, starttime, ppid, uid, _decode_comm(comm), state, bool(flags & PF_KTHREAD),
                    euid, True, exe, cgroups, pgrp, session)  # fmt: skip
    finally:
        os.close(dfd)
