"""Steady-state sweeps: re-read only the processes the kernel said changed since the last one.

A full snapshot opens /proc/PID/stat of every process (~10 µs each even with no parsing).
With the proc connector running (pruned.linux.connector), the daemon knows which processes
had an event since the last sweep, and a sweep can keep the record of every other one.

What can change about a process without a new pid, and how this cache sees it:
- exec (new exe, new comm, a setuid binary's uids): the exec event marks it.
- setuid/setreuid/setresuid/setfsuid: the uid event; setsid: the sid event.
- pid reuse: an exit event for the old process and a fork event for the new one.
- its parent (reparenting when the parent exits, to init or a subreaper): no event of its
  own, so the exit of a pid marks every cached child of it. A child re-read before the
  kernel got to reparent it (the exit event comes first) still names a dead or zombie
  parent; it stays marked until its parent is a live process.
- becoming a zombie: only by exiting (the leader's exit event).
- its cgroup: no event; nothing here stores cgroups. A sweep reads job membership from the
  job cgroups themselves every time (sweep.observe), after the snapshot.
- comm by prctl(PR_SET_NAME), pgid by setpgid, the run state (R/S/D/T): no event the watcher
  passes on, and never a fact a decision rests on (pruned.rules.trust): the audit text may
  show the previous comm or state until the next full read.
Besides, every sweep re-reads every root-owned process (status read: real uid 0, setuid,
non-dumpable; a few hundred at most) and every new pid, whatever the events said: the trust
the classifier gives rests on those, and they are cheap.

The cache is used only while events flowed without loss since before the full read that built
it: `attach()` (watcher listening), `lost()` (ENOBUFS, a sequence gap) and `detach()` force
the next sweep to read everything, and so does `full_every` seconds since the last full read
(policy `schedule.full_sweep`), the safety net for anything the reasoning above missed.
Anything a sweep acts on is re-read in full just before (sweep.reverify) either way.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from pruned.linux import procfs
from pruned.model import Proc, Snapshot


@dataclass(frozen=True, slots=True)
class SweepRead:
    """How the last snapshot was read: for the sweep summary, metrics and the bench."""

    full: bool
    why: str  # why it was full ("first sweep", "events lost", ...), or "" when incremental
    reread: int  # processes read from /proc (all of them for a full read)
    kept: int  # cached records reused as they were


class ProcCache:
    """The last snapshot's records plus the pids the event watcher marked since.

    Thread-safe: `mark`, `lost`, `attach` and `detach` come from the watcher and the daemon's
    main thread; `snapshot` from the sweep thread (one at a time).
    """

    def __init__(self, full_every: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.full_every = full_every
        self._clock = clock
        self._lock = threading.Lock()
        self._procs: dict[int, Proc] | None = None  # raw records, before pin_host_exes
        self._key: tuple[str, bool] | None = None  # (proc_root, exe_all) they were read with
        self._full_at = 0.0
        self._listening = False
        self._broken = "first sweep"  # non-empty: the next read must be full, and why
        self._changed: set[int] = set()
        self._exited: set[int] = set()
        self._carry: set[int] = set()  # re-read again next time (parent not settled yet)
        self._rooted: set[int] = set()  # root-owned or unverified: re-read every sweep
        self._fresh: set[int] | None = None  # re-read by the last snapshot; None: all were
        self._memos: dict[str, dict] = {}
        self.last: SweepRead | None = None

    # ------------------------------------------------------------ the watcher's side

    def attach(self) -> None:
        """The event watcher is listening now: the next full read may found a cache."""
        with self._lock:
            self._listening = True
            self._broken = "events started"

    def detach(self) -> None:
        """No more events: every sweep reads everything, and nothing is kept."""
        with self._lock:
            self._listening = False
            self._broken = "events off"
            self._procs = None
            self._fresh = None
            self._memos = {}
            self._changed, self._exited = set(), set()

    def lost(self, reason: str) -> None:
        """Events were lost: the next sweep reads everything."""
        with self._lock:
            self._broken = f"events lost ({reason})"
            self._fresh = None
            self._memos = {}

    def mark(self, changed: Iterable[int], exited: Iterable[int]) -> None:
        """One batch from the watcher: pids with fork/exec/uid/sid events, pids that exited."""
        with self._lock:
            self._changed.update(changed)
            self._exited.update(exited)

    def unchanged(self, pid: int) -> bool:
        """pid's record in the last snapshot was kept from the one before, unchanged by
        anything the events report (False after a full read, and for pids it did not list)."""
        fresh = self._fresh
        procs = self._procs
        return fresh is not None and procs is not None and pid in procs and pid not in fresh

    def listed(self) -> Collection[int] | None:
        """The pids of the last snapshot while the cache holds it (None otherwise)."""
        procs = self._procs
        return None if procs is None else procs.keys()

    def memo(self, name: str) -> dict:
        """A store for a reader that, like this cache, re-checks only unchanged() is False
        (the Slurm source's walk for root slurmstepds): emptied whenever the cache is not
        trusted (every full read, a loss, a detach), so it never outlives the reasoning."""
        return self._memos.setdefault(name, {})

    def marked(self) -> set[int]:
        """The pids marked (changed or exited) since the last sweep began."""
        with self._lock:
            return self._changed | self._exited

    # ------------------------------------------------------------ the sweep's side

    def snapshot(self, proc_root: str = "/proc", *, exe_all: bool = False) -> Snapshot:
        """The process table: the cached records of unchanged processes plus fresh reads of
        the rest, or a full read (procfs.snapshot) when the cache cannot be trusted."""
        key = (proc_root, exe_all)
        with self._lock:
            now = self._clock()
            why = self._broken if self._listening else "events off"
            if not why and self._procs is None:
                why = "no cache"
            if not why and self._key != key:
                why = "policy changed"
            if not why and now - self._full_at >= self.full_every:
                why = "full_sweep interval"
            # Marks from here on are for the next sweep: swap them out under the lock.
            changed, exited = self._changed, self._exited
            self._changed, self._exited = set(), set()
            old = self._procs
            if why:
                self._broken = ""
                self._procs = None  # do not hold two tables while the full one is read
                self._fresh = None
                self._memos = {}
                old = None
                if self._listening:
                    self._full_at = now
        if why:
            snap = procfs.snapshot(proc_root, exe_all=exe_all)
            procs = snap.procs  # a dict nobody changes (frozen Snapshot): shared, not copied
            assert isinstance(procs, dict)
            n = len(procs)
            if self._listening:
                self._store(key, procs, self._unsettled(procs, procs, exited),
                            self._rooted_of(procs, procs), None)
            self.last = SweepRead(True, why, n, 0)
            return snap
        assert old is not None
        snap, reread = self._incremental(proc_root, exe_all, old, changed, exited)
        self.last = SweepRead(False, "", reread, len(snap.procs) - reread)
        return snap

    def _store(self, key: tuple[str, bool], procs: dict[int, Proc], carry: set[int],
               rooted: set[int], fresh: set[int] | None) -> None:
        with self._lock:
            if not self._listening or self._broken:
                self._fresh = None
                self._memos = {}
                return  # a loss or a detach during this read: nothing to build on
            self._procs = procs
            self._fresh = fresh
            self._key = key
            self._carry = carry
            self._rooted = rooted

    @staticmethod
    def _rooted_of(procs: dict[int, Proc], pids: Iterable[int]) -> set[int]:
        """Those of `pids` re-read every sweep: root-owned user-space processes and the
        unverified ones (uid 0 from the owner, status unreadable)."""
        out = set()
        for pid in pids:
            p = procs[pid]
            if not p.kthread and (p.uid == 0 or p.uid_exact):
                out.add(pid)
        return out

    @staticmethod
    def _unsettled(procs: dict[int, Proc], pids: Iterable[int], exited: set[int]) -> set[int]:
        """Those of `pids` whose parent is not a live process in `procs` (or just exited):
        the kernel may not have reparented them yet when they were read. (A cached record
        whose parent is gone is re-read anyway: the parent's exit marked it.)"""
        out: set[int] = set()
        get = procs.get
        for pid in pids:
            pp = procs[pid].ppid
            if pp <= 0:
                continue
            parent = get(pp)
            if parent is None or parent.zombie or pp in exited:
                out.add(pid)
        return out

    def _incremental(
        self, proc_root: str, exe_all: bool, old: dict[int, Proc],
        changed: set[int], exited: set[int],
    ) -> tuple[Snapshot, int]:
        taken_at = time.time()
        todo = changed | exited | self._carry | self._rooted
        if exited:  # their children were reparented, with no event of their own
            todo.update(pid for pid, p in old.items() if p.ppid in exited)
        dfd = os.open(proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as in procfs.snapshot: no collections rescanning the cache mid-walk
        try:
            procs: dict[int, Proc] = {}
            names: list[str] = []
            get = old.get
            for name in os.listdir(dfd):
                if not name.isdigit():
                    continue
                pid = int(name)
                p = get(pid)
                if p is None or pid in todo:
                    names.append(name)  # new, or changed: read it
                else:
                    procs[p.pid] = p  # keyed by the record's own int, not a new copy
            fresh, root_owned, vanished, garbled, denied, hidden = procfs.read_some(
                dfd, names, exe_all)  # fmt: skip
            # A process that became (or stopped being) root-owned changes whose exe the exe
            # pass reads: its cached children are read again too.
            flipped = {pid for pid, p in fresh.items()
                       if (pid in root_owned) != ((q := get(pid)) is not None
                                                  and procfs.is_root_owned(q))}  # fmt: skip
            if flipped:
                more = [str(pid) for pid, p in procs.items() if p.ppid in flipped]
                for pid in map(int, more):
                    del procs[pid]
                f2, r2, v2, g2, d2, h2 = procfs.read_some(dfd, more, exe_all)
                fresh.update(f2)
                root_owned |= r2
                vanished, garbled, denied, hidden = (vanished + v2, garbled + g2,
                                                     denied + d2, hidden + h2)  # fmt: skip
            procs.update(fresh)
            # The exe pass asks "is the parent root-owned": the cached ones count too.
            all_root = root_owned | {pid for pid in self._rooted
                                     if (p := procs.get(pid)) is not None
                                     and procfs.is_root_owned(p)}  # fmt: skip
            denied += procfs.exe_pass(dfd, procs, all_root, exe_all, fresh)
            unsettled = self._unsettled(procs, fresh, exited)
            rooted = {pid for pid in self._rooted if pid in procs and pid not in fresh}
            rooted |= self._rooted_of(procs, fresh)
        finally:
            os.close(dfd)
            if gc_was_enabled:
                gc.enable()
        self._store((proc_root, exe_all), procs, unsettled, rooted, set(fresh))
        snap = Snapshot(
            procs=procs,
            taken_at=taken_at,
            boot_time=procfs.boot_time(proc_root),
            clk_tck=os.sysconf("SC_CLK_TCK"),
            vanished=vanished,
            unreadable=procfs.unreadable_notes(garbled, hidden, denied),
        )
        return snap, len(fresh)
