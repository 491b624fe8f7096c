"""Trust: what about a process a user cannot fake. PURE.

comm and argv are never evidence (any user sets them with prctl or exec -a), nor is a
binary's path for a user's own process (a user can copy or run any binary). What a user
cannot make is a process whose *real* uid is 0: for those alone, the executable path, or
the same binary name elsewhere, says which daemon it is.
"""

from __future__ import annotations

from collections.abc import Iterable

from pruned.model import UID_RAIL, Proc

# readlink of /proc/PID/exe after the binary was replaced or removed on disk (an upgrade).
DELETED = " (deleted)"


def is_kernel(proc: Proc) -> bool:
    """pid 1, pid 2, a kernel thread, or a child of kthreadd: never judged, never touched."""
    return proc.pid in (1, 2) or proc.kthread or proc.ppid == 2


def is_genuine_root(proc: Proc) -> bool:
    """Real uid 0, read exactly from /proc/PID/status, and alive: nothing a user can fake.

    The effective uid does not matter: a root daemon that lowered it for a moment (slurmstepd
    does, to touch a user's files) is still root, and a setuid-root program started by a
    user keeps the user's real uid.
    """
    return proc.uid == 0 and proc.uid_exact and not proc.zombie


def root_exe_matches(exe: str | None, paths: frozenset[str]) -> bool:
    """Whether a *real-root* process's exe is one of the daemon `paths`.

    Also true for the same binary name anywhere and for a binary replaced on disk
    (`... (deleted)`): a package upgrade or a versioned install (/opt/slurm/<v>/sbin, a moved
    `current` link) must not make every running job look ended while its slurmstepd runs
    on. Only the caller's real-uid-0 check makes this safe: users cannot make root processes.
    """
    if not exe:
        return False
    exe = exe.removesuffix(DELETED)
    return exe in paths or _basename(exe) in {_basename(p) for p in paths}


def _basename(path: str) -> str:
    return path.rpartition("/")[2]


def is_root_daemon(proc: Proc, paths: frozenset[str]) -> bool:
    """A genuine root process running one of the daemon `paths` (see root_exe_matches)."""
    return is_genuine_root(proc) and root_exe_matches(proc.exe, paths)


def exe_in(proc: Proc, paths: Iterable[str]) -> bool:
    """True when proc's executable is exactly one of `paths` (upgraded in place counts)."""
    if proc.exe is None:
        return False
    return proc.exe.removesuffix(DELETED) in paths


def is_whitelisted_exe(proc: Proc, paths: Iterable[str]) -> bool:
    """A whitelisted executable path, and verified to be the host's file there (exe_host):
    a path shown from a mount namespace of the user's own proves nothing."""
    return proc.exe_host and exe_in(proc, paths)


def in_ranges(uid: int, ranges: Iterable[tuple[int, int]]) -> bool:
    """uid lies in one of the inclusive (low, high) ranges."""
    for lo, hi in ranges:  # noqa: SIM110 - a plain loop: runs once per process per sweep
        if lo <= uid <= hi:
            return True
    return False


def is_system_uid(uid: int, ranges: Iterable[tuple[int, int]]) -> bool:
    """Below the hard rail (UID_RAIL) or inside one of the system ranges."""
    return uid < UID_RAIL or in_ranges(uid, ranges)
