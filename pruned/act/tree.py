"""Tree membership: the re-walk that finds the processes a tree forked after the snapshot.

A tree is its verified pidfds plus the rules to find late members (see `Tree`); `expand`
re-walks /proc until a pass finds nothing new, so children forked between the snapshot and
the signal are signalled too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from pruned.jobs.slurmpath import job_ids_in
from pruned.linux.pidfd import open_verified_stat, pidfd_info, send_signal
from pruned.linux.procfs import StatFields, read_cgroup_lines, read_real_uid, read_stats
from pruned.model import ProcKey

CHAIN_LIMIT = 4096  # ppid hops before we give up (a loop in a racy /proc read)


class Tree:
    """The processes of one tree: verified pidfds plus the rules to find late members.

    A process belongs to the tree if it is a given key, if its ppid chain reaches a live
    member, or if it sits in a session/process group led by a member (sessions are
    inherited, so everything in a member-led session descends from that member, even after
    a double fork reparented it). A session whose leader is gone is followed only when the
    tree's uid is known, and only for that uid's processes started after the leader.
    """

    def __init__(self, root: ProcKey, uid: int | None, proc_root: str) -> None:
        self.root = root
        self.uid = uid
        self.proc_root = proc_root
        self.fds: dict[ProcKey, int] = {}
        self.gone: list[ProcKey] = []
        self.late: list[ProcKey] = []
        self.skipped: list[ProcKey] = []
        self.failed: list[tuple[ProcKey, str]] = []
        self.leaders: dict[int, int] = {}  # pid -> starttime of every key ever in the tree
        self.seen: set[ProcKey] = set()
        self.stats: dict[ProcKey, StatFields] = {}  # each member's stat as verified
        self.cgroupids: dict[ProcKey, int] = {}  # v2 cgroup ids, where the pidfd told them
        self._root_jobs: set[str] | None = None  # job ids of the root's cgroups, read once

    def add(self, key: ProcKey, late: bool = False) -> int | None:
        """Open a verified pidfd for key and make it a member; None if gone or skipped."""
        if key in self.seen:
            return self.fds.get(key)
        self.seen.add(key)
        self.leaders.setdefault(key.pid, key.starttime)
        try:
            got = open_verified_stat(key, self.proc_root)
        except OSError as e:
            self.failed.append((key, f"pidfd_open: {os.strerror(e.errno or 0)}"))
            return None
        if got is None:
            self.gone.append(key)
            return None
        fd, st = got
        # From the pidfd where the kernel offers it: the process it pins, for a fraction of
        # the cost of /proc/PID/status (a kill of a thousand read it a thousand times).
        try:
            info = pidfd_info(fd) if self.proc_root == "/proc" else None
        except ProcessLookupError:
            os.close(fd)
            self.gone.append(key)
            return None
        if self.uid is not None:
            ruid = read_real_uid(key.pid, self.proc_root) if info is None else info.ruid
            if ruid != self.uid:
                os.close(fd)
                self.skipped.append(key)
                return None
        if late and self._in_other_job(key.pid):
            # Found by the re-walk, never classified: a process inside a job cgroup the root
            # is not in belongs to that job (pruned never judged it a stray). Leave it.
            os.close(fd)
            self.skipped.append(key)
            return None
        self.fds[key] = fd
        self.stats[key] = st
        if info is not None and info.cgroupid is not None:
            self.cgroupids[key] = info.cgroupid
        if late:
            self.late.append(key)
        return fd

    def _jobs_of(self, pid: int) -> set[str]:
        return job_ids_in(read_cgroup_lines(pid, self.proc_root))

    def _in_other_job(self, pid: int) -> bool:
        if self._root_jobs is None:
            self._root_jobs = self._jobs_of(self.root.pid)
        return bool(self._jobs_of(pid) - self._root_jobs)

    def close(self) -> None:
        """Close every member's pidfd."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.stats.clear()
        self.cgroupids.clear()


def candidates(
    trees: Sequence[Tree], table: dict[int, StatFields], protected: frozenset[int]
) -> list[tuple[Tree, ProcKey]]:
    """Processes in `table` that belong to one of `trees` and are not members yet.

    One pass for all trees (a sweep kills many): each ppid chain is walked once, memoised.
    """
    live: dict[int, tuple[int, Tree]] = {}
    leaders: dict[int, list[tuple[int, Tree]]] = {}
    seen: set[ProcKey] = set()
    for tree in trees:
        live.update({k.pid: (k.starttime, tree) for k in tree.fds})
        for pid, start in tree.leaders.items():
            leaders.setdefault(pid, []).append((start, tree))
        seen |= tree.seen
    memo: dict[int, Tree | None] = {}

    def via_parent(pid: int) -> Tree | None:
        path = []
        hit: Tree | None = None
        for _ in range(CHAIN_LIMIT):
            st = table.get(pid)
            if st is None or pid in protected:
                break
            if pid in memo:
                hit = memo[pid]
                break
            owner = live.get(pid)
            if owner is not None and owner[0] == st.starttime:
                hit = owner[1]
                break
            path.append(pid)
            pid = st.ppid
        for p in path:
            memo[p] = hit
        return hit

    def via_session(pid: int, st: StatFields) -> Tree | None:
        for lead in (st.session, st.pgrp):
            for start, tree in leaders.get(lead, ()):
                if st.starttime < start:
                    continue
                leader = table.get(lead)
                if leader is not None and leader.starttime == start and not leader.zombie:
                    return tree
                if leader is not None and leader.starttime != start:
                    continue  # the leader's pid now names another process: not our session
                # Leader gone: follow only the tree's own uid.
                if tree.uid is not None and read_real_uid(pid, tree.proc_root) == tree.uid:
                    return tree
        return None

    out = []
    for pid, st in table.items():
        if pid in protected or st.zombie or st.kthread:
            continue
        key = ProcKey(pid, st.starttime)
        if key in seen:
            continue
        tree = via_parent(st.ppid) or via_session(pid, st)
        if tree is not None:
            out.append((tree, key))
    return out


def expand(
    trees: Sequence[Tree],
    proc_root: str,
    protected: frozenset[int],
    on_new: Sequence[int] = (),
    deadline: float | None = None,
    rounds: int = 50,
) -> None:
    """Re-walk /proc until a pass finds no new member; send `on_new` signals to each new one."""
    # Trees of known uids only ever take members of those uids (Tree.add): the walk need
    # not read the stat of other users' processes (read_stats `owners`).
    uids = {t.uid for t in trees}
    owners = None if None in uids else uids
    for _ in range(rounds):
        table = read_stats(proc_root, owners)
        found = 0
        for tree, key in candidates(trees, table, protected):
            fd = tree.add(key, late=True)
            if fd is None:
                continue
            found += 1
            for sig in on_new:
                send_signal(fd, sig)
        if not found or (deadline is not None and time.monotonic() > deadline):
            return
