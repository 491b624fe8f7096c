"""Is a process's executable the host's file at the path /proc/PID/exe names?

readlink(/proc/PID/exe) gives a path as seen in the process's own mount namespace: a user who
bind-mounts their binary over /opt/site/bin/agent inside `unshare -rm` shows that path. stat()
through the magic link reaches the inode actually running; the host's file is what the path
resolves to in pruned's (the initial) mount namespace. Same device and inode: the host's file.
"""

from __future__ import annotations

import os

DELETED = " (deleted)"


def host_ids(paths: tuple[str, ...]) -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of each existing path, in pruned's mount namespace."""
    out = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return frozenset(out)


def _own_mnt_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return None


def exe_is_host_file(
    pid: int, exe: str, ids: frozenset[tuple[int, int]], proc_root: str = "/proc"
) -> bool:
    """Whether pid runs the host's file at `exe` (one of the whitelisted paths).

    A binary replaced on disk (`... (deleted)`, a package upgrade) has no path to compare
    with any more: it is accepted only in pruned's own mount namespace, where only root
    could have put it at that path in the first place.
    """
    try:
        if exe.endswith(DELETED):
            return os.readlink(f"{proc_root}/{int(pid)}/ns/mnt") == _own_mnt_ns()
        st = os.stat(f"{proc_root}/{int(pid)}/exe")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in ids
