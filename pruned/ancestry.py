"""The event path's memory of live processes between events, by (pid, starttime).

A burst of new processes mostly shares a few ancestors (a job's shell, slurmstepd, init):
reading those again for every child is what made the event path cost ~55 µs per process.
This holds the record of each process the event path read (the sweep's cheap record, or a
full read), and each record's link to its parent as the parent's (pid, starttime) at the
time it was read, so a chain can be walked without /proc I/O.

Why a record stays true until its next event: the proc connector reports every exec, uid
and sid change (the event path re-reads the process) and every exit (the record is
dropped). A parent change (reparenting) happens only when the parent exits, and then the
child's link names a (pid, starttime) that is gone: the walk stops there and says
"unknown", never follows a reused pid (a new process with the parent's pid has another
starttime). Cgroup membership is not in these records: nothing here decides by cgroup.

It is not seeded from the sweep's snapshot: a snapshot predates the events the worker
already applied (an exit or exec between the walk and the seed would be undone), and a
record read on first use costs what checking a seeded one would. A full sweep prunes it
to what the snapshot still shows (lost exit events cannot leak records); lost events clear it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from pruned.model import Proc, Snapshot
from pruned.rules.trust import is_root_daemon

MAX_RECORDS = 200_000  # ~40 MB worst case; a full table this big is cleared and re-learnt
MAX_HOPS = 256


class Entry(NamedTuple):
    proc: Proc
    parent_start: int | None  # the parent's starttime when read; None: parent not known then
    seen: float  # wall time it was read (a sweep keeps what it could not have seen)


class Ancestry:
    """pid -> the last record the event path read of it, linked to its parent."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max_records = max_records
        self.entries: dict[int, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, procs: Mapping[int, Proc], now: float) -> None:
        """Records read just now (all events up to this batch applied). Parents first, so a
        parent read in the same batch is the one each child links to."""
        entries = self.entries
        if len(entries) + len(procs) > self.max_records:
            entries.clear()
        late: list[int] = []
        for pid, p in procs.items():
            parent = entries.get(p.ppid)
            if p.ppid in procs and (parent is None or parent.proc is not procs[p.ppid]):
                late.append(pid)  # its parent is in this batch, not yet put
            entries[pid] = Entry(p, parent.proc.starttime if parent is not None else None, now)
        for pid in late:
            p = procs[pid]
            entries[pid] = Entry(p, entries[p.ppid].proc.starttime, now)

    def link(self, p: Proc) -> int | None:
        """The starttime of p's parent as known now (p read just now), or None."""
        parent = self.entries.get(p.ppid)
        return parent.proc.starttime if parent is not None else None

    def drop(self, pids: Iterable[int]) -> None:
        """Exited (or about to be re-read): the pid may name another process from now on."""
        pop = self.entries.pop
        for pid in pids:
            pop(pid, None)

    def clear(self) -> None:
        self.entries.clear()

    def prune(self, snap: Snapshot) -> None:
        """Keep the records a full snapshot still shows (same pid and starttime) and those
        read after it started; the rest exited without an event we saw."""
        procs = snap.procs
        since = snap.taken_at
        self.entries = {
            pid: e for pid, e in self.entries.items()
            if e.seen >= since or ((s := procs.get(pid)) is not None
                                   and s.starttime == e.proc.starttime)
        }  # fmt: skip

    def daemon_above(
        self, p: Proc, daemons: frozenset[str],
        memo: dict[tuple[int, int], bool | None] | None = None,
    ) -> bool | None:
        """Whether a genuine batch daemon is a strict ancestor of p (just read) by the records:
        True, False (the chain reaches pid 0 without one), or None (a link is unknown or
        names a process that is gone: only a fresh read can tell).

        `memo`: (pid, starttime) -> the answer for that ancestor and everything above it,
        for one batch (the records do not change within it): a burst's children share
        their parent, so each chain is walked once."""
        entries = self.entries
        pid, start = p.ppid, self.link(p)
        path: list[tuple[int, int]] = []
        found: bool | None = None
        for _ in range(MAX_HOPS):
            if pid <= 0:
                found = False
                break
            if start is None:
                break
            key = (pid, start)
            if memo is not None and key in memo:
                found = memo[key]
                break
            e = entries.get(pid)
            if e is None or e.proc.starttime != start:
                break
            path.append(key)
            if is_root_daemon(e.proc, daemons):
                found = True
                break
            pid, start = e.proc.ppid, e.parent_start
        if memo is not None:
            for key in path:
                memo[key] = found
        return found
