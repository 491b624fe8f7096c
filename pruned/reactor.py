"""The event path: re-judge just the processes the kernel told us about.

The proc connector's watcher thread must never block (a fork storm would overflow its
socket), so it only queues pids here; one worker thread reads those processes and their
ancestors from /proc, classifies them with the same pure rules as a sweep, and acts through
the same rails, pidfd kill and audit. Processes younger than min_age are re-checked when
they come of age. The periodic sweep stays the safety net for anything missed.

Under load most new processes need no full read: before judging, each wakeup reads the
queued pids with the sweep's own cheap record (pruned.linux.procfs.read_some: stat and its
owner, status only when /proc/PID is root-owned) and sets aside those the sweep itself
would leave alone on that record: kernel threads and zombies, system uids, uids outside
`--uid`, and processes below a genuine batch daemon by the chain of records the event path
already holds (pruned.ancestry). Only the rest (the candidate strays, a few per second) is
read in full and judged by the same classify/decide as before. See `_triage`.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from functools import lru_cache

from pruned import log
from pruned.act.adopt import AdoptFailures
from pruned.act.audit import error_text, event_record, outcome_fallback_record
from pruned.act.guard import protected_pids
from pruned.ancestry import Ancestry
from pruned.jobs.slurmpath import membership_from_cgroups
from pruned.lineage import LineageMemory
from pruned.linux import procfs
from pruned.model import (
    Action,
    HeldBy,
    JobView,
    Observation,
    Policy,
    Proc,
    Result,
    Snapshot,
    SweepPlan,
)
from pruned.rules.classify import classify
from pruned.rules.decide import apply_brake, decide, held
from pruned.rules.trust import is_kernel, is_system_uid
from pruned.sweep import (
    SweepReport,
    audit_sweep,
    execute,
    known_exes,
    new_sweep_id,
    pin_host_exes,
)

MAX_ANCESTRY = 256
_boot_time = lru_cache(maxsize=4)(procfs.boot_time)  # constant while the machine is up


def mini_snapshot(pids: Iterable[int], proc_root: str = "/proc") -> Snapshot:
    """Full reads of pids and all their ancestors: enough to classify the pids themselves."""
    procs: dict[int, Proc] = {}
    todo = [p for p in pids if p > 0]
    vanished = 0
    budget = MAX_ANCESTRY * max(1, len(todo))
    while todo and budget > 0:
        budget -= 1
        pid = todo.pop()
        if pid in procs:
            continue
        p = procfs.read_proc(pid, proc_root)
        if p is None:
            vanished += 1
            continue
        procs[pid] = p
        if p.ppid > 0 and p.ppid not in procs:
            todo.append(p.ppid)
    return Snapshot(
        procs=procs,
        taken_at=time.time(),
        boot_time=_boot_time(proc_root),
        clk_tck=os.sysconf("SC_CLK_TCK"),
        vanished=vanished,
    )


def add_child(children: dict[int, tuple[int, ...] | set[int]], ppid: int, pid: int) -> None:
    """Note pid as a child of ppid in the reactor's map (a seeded tuple becomes a set)."""
    kids = children.get(ppid)
    if kids is None:
        children[ppid] = {pid}
    elif isinstance(kids, tuple):
        if pid not in kids:
            children[ppid] = {*kids, pid}
    else:
        kids.add(pid)


def drop_child(children: dict[int, tuple[int, ...] | set[int]], ppid: int, pid: int) -> None:
    """Forget pid as a child of ppid (an emptied entry goes)."""
    kids = children.get(ppid)
    if kids is None or pid not in kids:
        return
    if isinstance(kids, tuple):  # once: later drops are O(1) on the set
        kids = children[ppid] = set(kids)
    kids.discard(pid)
    if not kids:
        del children[ppid]


class Reactor:
    """Queue of pids from the event watcher, judged and acted on by one worker thread."""

    def __init__(
        self,
        get_context: Callable[[], tuple[Policy, object, object]],
        get_jobs: Callable[[bool], JobView],
        lock: threading.Lock,
        *,
        uids: Collection[int] | None = None,
        proc_root: str = "/proc",
        on_report: Callable[[SweepReport], None] | None = None,
        lineage: LineageMemory | None = None,
        adopt_failures: AdoptFailures | None = None,
    ) -> None:
        self.get_context = get_context  # -> (policy, facts, sink)
        self.get_jobs = get_jobs  # get_jobs(fresh) -> JobView
        self.lock = lock  # shared with the sweeps: never act twice at once
        self.uids = uids
        self.proc_root = proc_root
        self.on_report = on_report
        # Shared with the full sweeps: what was judged stray (a re-forker's session outlives
        # each of its processes) and which adoptions the kernel refused.
        self.lineage = lineage
        self.adopt_failures = adopt_failures
        self.q: queue.SimpleQueue[tuple[set[int], set[int], dict[int, int]] | None] = (
            queue.SimpleQueue())
        # parent -> its children: a tuple as seeded (a fifth of a set's size, ~8 MB less at
        # 100,000 processes), a set once an event batch added to it (add_child).
        self.children: dict[int, tuple[int, ...] | set[int]] = {}
        self.recheck: list[tuple[float, int]] = []  # (monotonic due time, pid)
        self._thread: threading.Thread | None = None
        # Set here, not in start()/_run(): seed() may come first, and stop() before the
        # thread got to run (a flag reset in _run would then never stop it).
        self._seed: dict[int, tuple[int, ...] | set[int]] | None = None
        # pruned and its ancestors, read once per full sweep rather than once per event batch
        # (six /proc/PID/stat reads of busy processes, ~20% of a batch's cost in a fork storm).
        # Ancestors only ever die, so the cached set can only be a superset: never less safe.
        self._protected: frozenset[int] | None = None
        self._stopping = False
        self.handled = 0
        # Set by the daemon after each full sweep: why the event path must not act (the
        # sweep was report-only or tripped the brake), or None. And the uids the event path
        # killed since: together its batches stay within one sweep's brake (max_uids).
        self.hold: str | None = None
        self.killed_uids: frozenset[int] = frozenset()
        self.ancestry = Ancestry()  # worker thread only
        self._seed_snap: Snapshot | None = None
        self._lost = False
        self._dfd: int | None = None  # proc_root, opened by the worker
        self.triaged = 0  # pids read by _triage
        self.judged = 0  # of which left to the full path (handle)

    # called from the watcher thread: never blocks
    def on_pids(
        self, changed: set[int], exited: set[int], parents: dict[int, int] | None = None
    ) -> None:
        """`parents`: child -> the pid that forked it (EventWatcher(parents=True))."""
        self.q.put((changed, exited, parents or {}))

    def seed(self, snap: Snapshot) -> None:
        """Parent -> children from a full snapshot, to find orphans when a parent exits."""
        lists: dict[int, list[int]] = {}
        for p in snap.procs.values():
            lists.setdefault(p.ppid, []).append(p.pid)
        children: dict[int, tuple[int, ...] | set[int]] = {k: tuple(v) for k, v in lists.items()}
        del lists
        # Publish first, then the marker: the worker swaps it in when it meets the marker,
        # no lock needed (the other order could let the worker see the marker first).
        self._seed_snap = snap
        self._seed = children
        self.killed_uids = frozenset()
        self.q.put(None)

    def lost(self) -> None:
        """Events were lost (watcher thread): what the worker holds between events may be
        stale, so it forgets it at its next wakeup (the resync sweep re-judges the rest)."""
        self._lost = True
        self.q.put(None)

    def start(self) -> Reactor:
        self._thread = threading.Thread(target=self._run, name="pruned-reactor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self.q.put(None)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        # Named for top -H, ps -L and the benches (Python does not name OS threads).
        comm = f"/proc/self/task/{threading.get_native_id()}/comm"
        with contextlib.suppress(OSError), open(comm, "w") as f:
            f.write("pruned-reactor")
        try:
            self._loop()
        finally:
            if self._dfd is not None:
                os.close(self._dfd)
                self._dfd = None

    def _loop(self) -> None:
        while not self._stopping:
            timeout = None
            if self.recheck:
                timeout = max(0.0, self.recheck[0][0] - time.monotonic())
            try:
                item = self.q.get(timeout=timeout)
            except queue.Empty:
                item = (set(), set(), {})
            if self._stopping:
                break
            pids: set[int] = set()
            exited: set[int] = set()
            parents: dict[int, int] = {}
            items = [item]
            while True:  # merge whatever else queued up meanwhile
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            for it in items:
                if it is None:
                    self._marker()
                    continue
                pids |= it[0]
                exited |= it[1]
                parents.update(it[2])
            # Exits first (also those of pids queued in this very batch: never read a pid
            # that already exited, and let go of its record before any walk uses it).
            self._forget_exited(exited)
            for pid in exited:
                pids.update(self.children.pop(pid, ()))
                pids.discard(pid)
            now = time.monotonic()
            while self.recheck and self.recheck[0][0] <= now:
                pids.add(heapq.heappop(self.recheck)[1])
            if pids:
                try:
                    todo = self._triage(pids)
                    if todo:
                        self.handle(todo, parents)
                except Exception as e:  # keep the worker alive; the sweep is the safety net
                    self._batch_failed(pids, e)
            if exited and self.lineage is not None:
                # After the batch was judged: a child forked by one of these was linked to it.
                self.lineage.forget(exited)

    def _marker(self) -> None:
        """A queue marker: a new full snapshot (seed) or lost events (lost)."""
        if self._lost:
            self._lost = False
            self.ancestry.clear()
        if self._seed is None:
            return
        children, snap = self._seed, self._seed_snap
        # Let go of the snapshot (a whole table); a seed() racing this only skips a prune.
        self._seed, self._seed_snap = None, None
        self._protected = None
        if snap is not None:
            self.ancestry.prune(snap)
            # What the worker read after the snapshot began is not in its parent map: keep
            # it, or an orphan of a parent that exits later would never be re-judged.
            since = snap.taken_at
            for pid, e in self.ancestry.entries.items():
                if e.seen >= since:
                    add_child(children, e.proc.ppid, pid)
        self.children = children

    def _forget_exited(self, exited: set[int]) -> None:
        """Drop exited pids from the records and from their parent's set of children."""
        if not exited:
            return
        entries, children = self.ancestry.entries, self.children
        for pid in exited:
            e = entries.get(pid)
            if e is not None:
                drop_child(children, e.proc.ppid, pid)
        self.ancestry.drop(exited)

    def _triage(self, pids: set[int]) -> set[int]:
        """The pids that need the full path; the others are what the sweep itself leaves
        alone, judged on the very record a sweep reads (procfs.read_some).

        Set aside, each exactly as classify/decide would on the sweep's record:
        - kernel threads, pid 1, zombies (rails: never acted on);
        - system uids: the /proc owner of a dumpable process, status's real uid when
          /proc/PID is root-owned (setuid or non-dumpable), as in every sweep;
        - uids outside `--uid` (decide holds them: out of scope);
        - a process with a genuine batch daemon above it by the records of its ancestors
          (batch.daemon_lineage or a stronger batch rule: class batch whatever its cgroup).
        Kept for the full path, whatever the above says: a process whose session or process
        group the lineage memory holds (its verdict may end that lineage, as in a sweep).
        Cost: one open/fstat/read/close per pid, no per-pid work for the ancestors.
        """
        if self._dfd is None:
            self._dfd = os.open(self.proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        policy, facts, _sink = self.get_context()
        daemons = known_exes(policy).daemons
        procs = procfs.read_some(self._dfd, [str(p) for p in pids], False)[0]
        self.ancestry.drop(pids.difference(procs))  # gone or garbled: its exit event follows
        self.ancestry.put(procs, time.time())
        children = self.children
        for p in procs.values():
            add_child(children, p.ppid, p.pid)
        groups = self.lineage.group_ids() if self.lineage is not None else frozenset()
        ranges = facts.system_ranges  # type: ignore[attr-defined]
        uids = self.uids
        daemon_above = self.ancestry.daemon_above
        memo: dict[tuple[int, int], bool | None] = {}
        todo: set[int] = set()
        for pid, p in procs.items():
            if groups and (p.sid in groups or p.pgid in groups):
                todo.add(pid)
                continue
            if is_kernel(p) or p.zombie or is_system_uid(p.uid, ranges):
                continue  # system or a rail
            if uids is not None and p.uid not in uids:
                continue  # out of scope
            if not daemon_above(p, daemons, memo):
                todo.add(pid)  # True: batch, set aside
        self.triaged += len(procs)
        self.judged += len(todo)
        return todo

    def _batch_failed(self, pids: set[int], e: Exception) -> None:
        """A bug outside any one process's handling (execute and audit_sweep skip a failing
        process themselves): log it with where it came from, and put it on the audit record."""
        log.bug(f"event batch of {len(pids)} pids failed", e)
        some = " ".join(str(p) for p in sorted(pids)[:20])
        try:
            sink = self.get_context()[2]
            sink.emit(event_record("internal_error", f"event batch of {len(pids)} processes "
                                   f"failed, left to the next sweep: {error_text(e)}",
                                   reason=error_text(e), pids=some))  # fmt: skip
        except Exception as e2:
            log.bug("event batch failure not recorded", e2)

    def handle(self, pids: set[int], parents: dict[int, int] | None = None) -> SweepReport | None:
        """Classify and act on exactly these pids (ancestors are read, never acted on).

        `parents`: child -> forking pid from this batch's fork events (lineage of a child
        whose parent exited before it was read)."""
        policy, facts, sink = self.get_context()
        exes = known_exes(policy)  # resolved by the last full sweep, not once per batch
        snap = mini_snapshot(pids, self.proc_root)
        if self.lineage is not None:
            # The lineage rule needs each session and process-group leader that exists (a
            # leader missing from the picture counts as gone): read the ones not read yet.
            leaders = {x for p in snap.procs.values() for x in (p.sid, p.pgid)
                       if x > 1 and x not in snap.procs}  # fmt: skip
            if leaders:
                more = mini_snapshot(leaders, self.proc_root)
                snap = replace(snap, procs={**more.procs, **snap.procs})
        snap = pin_host_exes(snap, exes, self.proc_root)
        for p in snap.procs.values():
            add_child(self.children, p.ppid, p.pid)
        # Fresh full reads after every event so far: the ancestors' records for _triage.
        self.ancestry.put(snap.procs, time.time())
        targets = {pid for pid in pids if pid in snap.procs}
        if not targets:
            return None
        member = membership_from_cgroups(snap.procs.values())
        # A job this view has not seen running may have just started: read the tree again
        # rather than call its first processes strays.
        jobs = self.get_jobs(False)
        if any(m.understood and not ((j := jobs.job(m.job_id)) and j.running)
               for m in member.values()):
            jobs = self.get_jobs(True)
        # A cgroup in Slurm's tree that the grammar does not know: its process is not judged
        # a stray (classify), and this batch is report-only, as a sweep would be.
        doubt = tuple(f"cgroup {m.cgroup} is in Slurm's tree but not a layout pruned knows"
                      for pid, m in member.items() if not m.understood and pid in targets)
        view = replace(jobs, membership=member, problems=(*jobs.problems, *doubt))
        verdicts = classify(snap, view, policy, facts, exes)
        if self._protected is None:
            self._protected = protected_pids(self.proc_root)
        with self.lock:
            marks = (self.lineage.observe(snap, verdicts, full=False, parents=parents)
                     if self.lineage is not None else None)
            failed = self.adopt_failures.view() if self.adopt_failures is not None else None
            full = decide(snap, verdicts, view, policy, protected=self._protected,
                          uids=self.uids, exes=exes, lineage=marks, adopt_failed=failed)
            mine = tuple(d for d in full.decisions if d.proc.pid in targets)
            hold = self.hold
            if hold:  # the last full sweep was report-only or braked: so is the event path
                mine = tuple(
                    held(d, f"event path held: {hold}", HeldBy.REPORT_ONLY)
                    if d.action is not Action.IGNORE and d.held is None
                    else d
                    for d in mine
                )
            plan = SweepPlan(mine, full.report_only, None)
            plan = apply_brake(plan, policy, already=self.killed_uids)
            for d in mine:
                if d.held_by is HeldBy.YOUNG:
                    age = snap.age(d.proc)
                    if marks and (m := marks.get(d.proc.pid)) is not None:
                        age = max(age, snap.taken_at - m.since)  # its lineage comes of age first
                    due = time.monotonic() + max(0.05, policy.min_age - age) + 0.05
                    heapq.heappush(self.recheck, (due, d.proc.pid))
            if not plan.reported():
                return None
            dry = policy.dry_run
            t0 = time.monotonic()
            outcomes = execute(plan, snap, view, policy, dry_run=dry, proc_root=self.proc_root,
                               failures=self.adopt_failures, already=self.killed_uids)
            if not dry:
                # the plan's kills, and any adopt_failure kill execute added
                self.killed_uids |= {d.proc.uid for d in plan.actionable()
                                     if d.action is Action.KILL}
                self.killed_uids |= {o.decision.proc.uid for o in outcomes
                                     if o.decision.action is Action.KILL
                                     and o.result is Result.DONE}  # fmt: skip
            sid = "event-" + new_sweep_id()
            try:
                obs = Observation(snap, view, {k: verdicts[k] for k in targets}, plan, exes)
                report = SweepReport(sid, time.time(), time.monotonic() - t0, dry, obs, outcomes)
            except Exception as e:  # what was done is recorded before the error ends the batch
                for o in outcomes:
                    sink.emit(outcome_fallback_record(o, sid, dry, e))
                raise
            audit_sweep(report, sink)
        self.handled += len(outcomes)
        if self.on_report is not None:
            self.on_report(report)
        return report
