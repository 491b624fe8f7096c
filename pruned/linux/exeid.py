"""Is a process's executable the host's file at the path /proc/PID/exe names?

readlink(/proc/PID/exe) gives a path as seen in the process's own mount namespace: a user who
bind-mounts their binary over /opt/site/bin/agent inside `unshare -rm` shows that path. stat()
through the magic link reaches the inode actually running; the host's file is what the path
resolves to in pruned's (the initial) mount namespace. Same device and inode: the host's file.

The link itself is the process's to set once it is in a user namespace of its own:
prctl(PR_SET_MM, PR_SET_MM_MAP) with an exe_fd needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN
only in the caller's user namespace, which `unshare -U` gives any user. A process in such a
namespace can point /proc/PID/exe at the host's whitelisted file (same device and inode) while
it runs code of its own (tests/fixtures/exespoof.c does), and cannot leave the namespace
again. So only a process in pruned's own user namespace is believed.
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


def _own_ns(kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None


def exe_is_host_file(
    pid: int, exe: str, ids: frozenset[tuple[int, int]], proc_root: str = "/proc"
) -> bool:
    """Whether pid runs the host's file at `exe` (one of the whitelisted paths), and is in
    pruned's user namespace (the module's docstring says why).

    A binary replaced on disk (`... (deleted)`, a package upgrade) has no path to compare
    with any more: it is accepted only in pruned's own mount namespace, where only root
    could have put it at that path in the first place.
    """
    base = f"{proc_root}/{int(pid)}"
    try:
        if os.readlink(f"{base}/ns/user") != _own_ns("user"):
            return False  # it may have set its exe link itself (PR_SET_MM_MAP)
        if exe.endswith(DELETED):
            return os.readlink(f"{base}/ns/mnt") == _own_ns("mnt")
        st = os.stat(f"{base}/exe")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in ids
