"""The last-line guard every action passes first: never pid 0/1/2, pruned, its ancestors or
a kernel thread.

The decision about *what* to act on is made elsewhere (classify/policy); this is only the
rail that holds if that decision is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pruned.act.tree import CHAIN_LIMIT
from pruned.linux.procfs import StatFields, read_stat
from pruned.model import ProcKey


class Refused(Exception):
    """The guard refused an action (raised before anything was done)."""


def protected_pids(proc_root: str = "/proc") -> frozenset[int]:
    """Pids no action may touch: 0, 1, 2, pruned itself and every ancestor of it."""
    out = {0, 1, 2}
    pid = os.getpid()
    for _ in range(CHAIN_LIMIT):
        out.add(pid)
        st = read_stat(pid, proc_root)
        if st is None or st.ppid <= 0:
            break
        pid = st.ppid
    return frozenset(out)


def guard(keys: Iterable[ProcKey], proc_root: str = "/proc") -> None:
    """Raise Refused if any key is pid <= 2, pruned or an ancestor of it, or a kernel thread."""
    keys = list(keys)
    guard_pids(keys, protected_pids(proc_root))
    for key in keys:
        refuse_kthread(key, read_stat(key.pid, proc_root))


def guard_pids(keys: Iterable[ProcKey], protected: frozenset[int]) -> None:
    """guard without the kernel-thread check: pid <= 2, pruned or an ancestor of it."""
    for key in keys:
        if key.pid <= 2:
            raise Refused(f"refusing to act on pid {key.pid}: pid <= 2")
        if key.pid in protected:
            raise Refused(f"refusing to act on pid {key.pid}: pruned itself or its ancestor")


def refuse_kthread(key: ProcKey, st: StatFields | None) -> None:
    """The kernel-thread half of guard, on a stat already read for key."""
    if st is not None and st.starttime == key.starttime and st.kthread:
        raise Refused(f"refusing to act on pid {key.pid}: kernel thread")
