"""Kill trees of processes: SIGTERM, one shared grace wait, SIGKILL, re-walks in between.

Identity is always `ProcKey(pid, starttime)`. Every signal goes through a pidfd opened
*before* the starttime re-check (pruned.linux.pidfd), so a pid reused after the check can
never receive it. A vanished process is data (`gone`), not an error. The decision about
*what* to act on is made elsewhere (classify/policy); every entry point passes the
last-line guard (pruned.act.guard) first.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from pruned import log
from pruned.act.cgkill import Confined, Fallback, kill_confined
from pruned.act.contain import contain as contain_tree
from pruned.act.contain import end_game
from pruned.act.guard import guard_pids, protected_pids, refuse_kthread
from pruned.act.track import FORK_STORM, Track, track_exits, wait_grace
from pruned.act.tree import Tree, expand
from pruned.linux.cgroupfs import Quarantine, quarantine_method
from pruned.linux.pidfd import raise_nofile, send_signal
from pruned.linux.procfs import read_stat
from pruned.model import ProcKey, Result

KILL_WAIT = 2.0  # seconds to wait for SIGKILLed processes to exit before calling them survivors

REMIND_EVERY = 3600.0  # seconds between reminders about a process that outlived SIGKILL


# ---------------------------------------------------------------- survivors


def held_by_kernel(key: ProcKey, proc_root: str = "/proc") -> str | None:
    """The state letter when `key` sleeps uninterruptibly (D) or is a zombie being reaped
    (Z): SIGKILL is pending there and takes effect only when the kernel lets go (a wait on
    a hung NFS server or FUSE daemon can last forever). None when it is gone, reused, or
    in any other state."""
    st = read_stat(key.pid, proc_root)
    if st is None or st.starttime != key.starttime:
        return None
    return st.state if st.state in ("D", "Z") else None


def read_wchan(pid: int, proc_root: str = "/proc") -> str:
    """The kernel function pid sleeps in ("" when unknown): names the hung subsystem."""
    try:
        with open(f"{proc_root}/{pid}/wchan", "rb") as f:
            w = f.read(256).decode(errors="replace").strip()
    except OSError:
        return ""
    return "" if w == "0" else w


@dataclass
class Survivors:
    """Processes that outlived SIGKILL, by identity (pid, starttime), across sweeps.

    A process in D state keeps its pending SIGKILL and dies when the kernel lets it go; until
    then signalling, freezing and reporting it again every sweep only costs each sweep the
    kill grace and the freeze rounds (enough, with a few of them, to stall sweeps past the
    watchdog). So the first sweep reports it, later sweeps leave it alone and remind once
    every `remind_every` seconds while it lives. A pid reused by a new process is another
    key: that one is judged afresh.
    """

    remind_every: float = REMIND_EVERY
    clock: Callable[[], float] = time.monotonic
    last_report: dict[ProcKey, float] = field(default_factory=dict)

    def remember(self, key: ProcKey) -> None:
        self.last_report[key] = self.clock()

    def __contains__(self, key: object) -> bool:
        return key in self.last_report

    def reminder_due(self, key: ProcKey) -> bool:
        """True (and the reminder counted as sent) when the last report is old enough."""
        now = self.clock()
        if now - self.last_report.get(key, now) >= self.remind_every:
            self.last_report[key] = now
            return True
        return False

    def retain(self, live: Collection[ProcKey]) -> None:
        """Forget the ones that are gone (they finally died, or the pid is another's)."""
        for key in [k for k in self.last_report if k not in live]:
            del self.last_report[key]


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ProcStep:
    """What happened to one process: result, the signals sent, when it exited."""

    key: ProcKey
    # DONE: exited after our signal. GONE: gone, or its pid reused, before we acted.
    # FAILED: still alive after SIGKILL, or the signal was refused. WOULD: dry run.
    # SKIPPED: left alone on purpose (another uid than the tree's, or in another job).
    result: Result
    signals: tuple[str, ...] = ()  # in the order sent, e.g. ("SIGSTOP", "SIGTERM", "SIGKILL")
    exited_after: float | None = None  # seconds from the first SIGTERM/SIGKILL to its exit
    detail: str = ""


@dataclass(frozen=True, slots=True)
class KillResult:
    """Outcome of one kill: who was signalled, who was already gone, who survived SIGKILL."""

    root: ProcKey
    signalled: tuple[ProcKey, ...]
    gone_before: tuple[ProcKey, ...]
    survivors: tuple[ProcKey, ...]
    froze: str  # "none", "sigstop", "freezer-v1:<dir>", "cgroup.freeze:<dir>"
    elapsed: float
    dry_run: bool = False
    grace: float = 0.0
    exited_in_grace: tuple[ProcKey, ...] = ()  # left on SIGTERM before the grace ran out
    sigkilled: tuple[ProcKey, ...] = ()  # still alive at the end of the grace: got SIGKILL
    found_late: tuple[ProcKey, ...] = ()  # not in the snapshot: found by the re-walk
    would: tuple[ProcKey, ...] = ()  # dry run: what would have been signalled
    skipped: tuple[ProcKey, ...] = ()  # in the tree but of another uid: left alone
    steps: tuple[ProcStep, ...] = ()
    errors: tuple[str, ...] = ()
    contained: str = ""  # "contained in <quarantine>", or why the tree was not
    joined: int = 0  # processes found in the quarantine that joined the tree during the kill

    @property
    def ok(self) -> bool:
        """True when nothing of the tree survived (a dry run is ok when nothing failed)."""
        return not self.survivors and not self.errors

    @property
    def signals(self) -> tuple[str, ...]:
        """Distinct signals sent, in order."""
        seen: dict[str, None] = {}
        for s in self.steps:
            for sig in s.signals:
                if sig not in ("SIGSTOP", "SIGCONT"):
                    seen[sig] = None
        return tuple(seen)

    def describe(self) -> str:
        """One line for an audit MESSAGE: what was sent and how the tree ended."""
        if self.dry_run:
            n = len(self.would)
            return f"would send SIGTERM to {n} process(es), SIGKILL after {self.grace:g}s"
        if not self.signalled:
            return "gone before any signal"
        parts = []
        n = len(self.signalled)
        if "SIGTERM" not in self.signals:
            parts.append(f"SIGKILL to {n}")
        elif self.exited_in_grace and not self.sigkilled:
            parts.append(f"SIGTERM to {n}, exited within grace ({self.grace:g}s)")
        elif self.sigkilled:
            parts.append(
                f"SIGTERM to {n}, {len(self.exited_in_grace)} exited within grace "
                f"({self.grace:g}s), SIGKILL to {len(self.sigkilled)}"
            )
        if self.froze != "none":
            parts.append(f"frozen first ({self.froze})")
        if self.contained:
            parts.append(self.contained)
        if self.joined:
            parts.append(f"{self.joined} joined during the kill")
        if self.found_late:
            parts.append(f"{len(self.found_late)} found by re-walk")
        if self.skipped:
            parts.append(f"{len(self.skipped)} of another uid left alone")
        if self.survivors:
            parts.append("SURVIVED: " + ", ".join(str(k.pid) for k in self.survivors[:10]))
        if self.errors:
            parts.append("errors: " + "; ".join(self.errors[:3]))
        parts.append(f"{self.elapsed:.2f}s")
        return "; ".join(parts)

    def audit_fields(self) -> dict[str, str]:
        """Extra PRUNED_* fields for the audit record of this kill."""
        f = {
            "PRUNED_SIGNAL": ",".join(self.signals) or "none",
            "PRUNED_COUNT": str(len(self.signalled) or len(self.would)),
            "PRUNED_SURVIVORS": str(len(self.survivors)),
            "PRUNED_ELAPSED_MS": str(round(self.elapsed * 1000)),
            "PRUNED_FROZE": self.froze,
            "PRUNED_GRACE": f"{self.grace:g}",
            "PRUNED_JOINED": str(self.joined),
        }
        if self.contained:
            f["PRUNED_CONTAINED"] = self.contained
        tree = self.signalled or self.would
        if tree:
            f["PRUNED_TREE"] = " ".join(str(k.pid) for k in tree[:50])
        return f


# ---------------------------------------------------------------- kill


def kill_tree(
    root: ProcKey,
    descendants: Sequence[ProcKey],
    *,
    grace: float,
    dry_run: bool,
    freeze: bool = True,
    uid: int | None = None,
    proc_root: str = "/proc",
    contain: str = "none",
    cgroup_root: str = "/sys/fs/cgroup",
) -> KillResult:
    """Kill root and its descendants (and children forked since): SIGTERM, grace, SIGKILL."""
    return kill_many(
        [(root, descendants)],
        grace=grace,
        dry_run=dry_run,
        freeze=freeze,
        uid=uid,
        proc_root=proc_root,
        contain=contain,
        cgroup_root=cgroup_root,
    )[0]


def kill_many(
    trees: Sequence[tuple[ProcKey, Sequence[ProcKey]]],
    *,
    grace: float,
    dry_run: bool,
    freeze: bool = True,
    uid: int | None = None,
    proc_root: str = "/proc",
    contain: str = "none",
    cgroup_root: str = "/sys/fs/cgroup",
) -> list[KillResult]:
    """Kill several trees at once: SIGTERM to all first, then one shared grace wait
    (grace 0: SIGKILL only).

    With `contain` ("auto", or a quarantine method) and `uid`, all trees are first confined
    in one frozen quarantine cgroup and killed there without re-walking /proc
    (pruned.act.cgkill). Where that cannot be done (no cgroup, a member in a job's cgroup or
    another user's slice, an unexpected cgroup error) the path below is taken:
    With `freeze`, every member is SIGSTOPped before it is signalled and the tree is
    re-walked until a pass finds nothing new, so a process cannot fork a child we miss
    between the walk and the signal; SIGCONT follows so SIGTERM handlers can run.
    With `contain` ("auto", or a quarantine method; needs `uid`), each tree is moved into a
    quarantine cgroup of its own before the first SIGTERM (pruned.act.contain): what it
    forks while it handles SIGTERM is born inside and dies in the end-game, so a stray that
    spawns a detached child on SIGTERM cannot escape. Where no cgroup can be used the
    re-walks remain, and the result says so. With `uid`, members of any other real uid are
    left alone (reported as skipped). Raises Refused (before acting at all) if any key is
    protected by the guard.
    """
    given = [k for root, desc in trees for k in (root, *desc)]
    protected = protected_pids(proc_root)
    guard_pids(given, protected)
    raise_nofile()
    t0 = time.monotonic()
    tr = [Tree(root, uid, proc_root) for root, _ in trees]
    method = quarantine_method(cgroup_root) if contain == "auto" else contain
    if uid is None:
        method = "none"  # only a tree of one known uid may be moved (contain.belongs)
    quarantines: dict[int, Quarantine] = {}
    shared: list[Quarantine] = []  # the one quarantine of a confined kill (pruned.act.cgkill)
    kept: dict[ProcKey, str] = {}
    joined: dict[int, int] = {}
    errors: dict[int, list[str]] = {i: [] for i in range(len(tr))}
    try:
        for tree, (root, desc) in zip(tr, trees, strict=True):
            for key in (root, *desc):
                tree.add(key)
        for tree, (root, desc) in zip(tr, trees, strict=True):
            for key in (root, *desc):  # the guard's last check, on the stat that verified it
                st = tree.stats.get(key)
                refuse_kthread(key, st if st is not None else read_stat(key.pid, proc_root))
        if dry_run:
            expand(tr, proc_root, protected, rounds=3)
            return [kill_result(t, {}, t0, grace, dry_run=True, froze="none") for t in tr]
        track: dict[ProcKey, Track] = {}
        if method in ("freezer-v1", "cgroup.freeze"):
            try:
                shared.append(Quarantine(method, cgroup_root))
                done = kill_confined(tr, shared[0], grace=grace, protected=protected, t0=t0,
                                     track=track, cgroup_root=cgroup_root)  # fmt: skip
                return confined_results(tr, shared[0], done, track, t0, grace)
            except (Fallback, OSError):
                # Fallback comes before any signal; an unexpected cgroup error later leaves
                # the rest to the re-walking path below (what was sent stays in `track`).
                if shared:
                    shared[0].freeze(False, time.monotonic() + 0.5)
        all_fds: dict[ProcKey, int] = {}

        def signal_all(sig: int, only_live: bool = True) -> None:
            name = signal.Signals(sig).name
            for tree in tr:
                for key, fd in tree.fds.items():
                    t = track.setdefault(key, Track())
                    all_fds[key] = fd
                    if only_live and t.exited is not None:
                        continue
                    err = send_signal(fd, sig)
                    if err is None:
                        t.signals.append(name)
                    elif err == Result.GONE:
                        t.exited = t.exited if t.exited is not None else time.monotonic() - t0
                    else:
                        t.failed = err

        stop = (signal.SIGSTOP,) if freeze else ()
        froze = "sigstop" if freeze else "none"
        if freeze:
            signal_all(signal.SIGSTOP)
        expand(tr, proc_root, protected, on_new=stop)
        if method in ("freezer-v1", "cgroup.freeze"):
            deadline = time.monotonic() + KILL_WAIT
            for i, tree in enumerate(tr):
                try:
                    quarantines[i] = Quarantine(method, cgroup_root)
                except OSError as e:
                    errors[i].append(f"no quarantine cgroup ({e.strerror}): re-walk only")
                    continue
                contain_tree(tree, quarantines[i], protected, deadline, errors[i], kept,
                             walked=i == 0)  # the expand just above, if nothing since
        if grace > 0:  # kill.grace 0s: SIGKILL at once, no SIGTERM that could not be heeded
            signal_all(signal.SIGTERM)
        if freeze:
            signal_all(signal.SIGCONT)
        cut = wait_grace(all_fds, track, grace, t0, quarantines)
        in_grace = {k for k, t in track.items() if t.exited is not None}
        if any(t.exited is None for t in track.values()) or any(
            q.procs() for q in quarantines.values()
        ):
            # Stop what is left and catch what it forked during the grace, then kill all:
            # a quarantine's end-game kills whatever was born inside it.
            if freeze:
                signal_all(signal.SIGSTOP)
            expand(tr, proc_root, protected, on_new=stop)
            deadline = time.monotonic() + KILL_WAIT
            for i, q in quarantines.items():
                joined[i] = end_game(
                    tr[i], q, track, t0, deadline, protected, proc_root, errors[i]
                )
            signal_all(signal.SIGKILL)
        # Children forked between the last walk and SIGKILL: walk again until nothing new.
        deadline = time.monotonic() + KILL_WAIT
        expand(tr, proc_root, protected, on_new=(signal.SIGKILL,), deadline=deadline)
        signal_all(signal.SIGKILL)  # no-op for the exited; covers the late ones' bookkeeping
        track_exits(all_fds, track, deadline, t0)
        out = []
        for i, t in enumerate(tr):
            q = quarantines.get(i)
            how = froze if q is None else f"{froze}+{q.label}"
            r = kill_result(t, track, t0, grace, dry_run=False, froze=how, in_grace=in_grace,
                            errors=errors[i])  # fmt: skip
            stayed = [why for k, why in kept.items() if k in t.seen]
            if q is not None:
                note = f"contained in {q.label}" + (f"; {len(stayed)} left where they were"
                                                     f" ({stayed[0]})" if stayed else "")
            elif method in ("freezer-v1", "cgroup.freeze"):
                note = "not contained: " + "; ".join(errors[i][:1])
            else:
                note = f"not contained ({method}): re-walks only"
            if cut:
                note += f"; grace cut short: over {FORK_STORM} forked into quarantine after SIGTERM"
            r = replace(r, contained=note, joined=joined.get(i, 0))
            out.append(r)
        return out
    finally:
        for q in (*shared, *quarantines.values()):
            q.freeze(False, time.monotonic() + 0.5)
            if not q.remove(time.monotonic() + 1.0):
                log.warning(f"could not remove {q.dir}: it holds {sorted(q.procs())[:10]}")
        for tree in tr:
            tree.close()


def confined_results(
    tr: Sequence[Tree],
    q: Quarantine,
    done: Confined,
    track: dict[ProcKey, Track],
    t0: float,
    grace: float,
) -> list[KillResult]:
    """Each tree's KillResult of a kill confined in the one quarantine `q`."""
    note = f"contained in {q.label}"
    if done.cut:
        note += f"; grace cut short: over {FORK_STORM} forked into quarantine after SIGTERM"
    out = []
    for i, t in enumerate(tr):
        r = kill_result(t, track, t0, grace, dry_run=False, froze=q.label,
                        in_grace=done.in_grace, errors=done.errors if i == 0 else ())  # fmt: skip
        out.append(replace(r, contained=note, joined=done.joined.get(i, 0)))
    return out


def kill_result(
    tree: Tree,
    track: dict[ProcKey, Track],
    t0: float,
    grace: float,
    *,
    dry_run: bool,
    froze: str,
    in_grace: set[ProcKey] | frozenset[ProcKey] = frozenset(),
    errors: Sequence[str] = (),
) -> KillResult:
    """The KillResult of one tree from its members and what `track` recorded for each."""
    steps: list[ProcStep] = [
        ProcStep(k, Result.GONE, detail="gone or pid reused before any signal") for k in tree.gone
    ]
    steps += [
        ProcStep(k, Result.SKIPPED, detail=f"real uid is not {tree.uid}") for k in tree.skipped
    ]
    steps += [ProcStep(k, Result.FAILED, detail=why) for k, why in tree.failed]
    signalled: list[ProcKey] = []
    exited_in_grace: list[ProcKey] = []
    sigkilled: list[ProcKey] = []
    would: list[ProcKey] = []
    survivors = [k for k, _ in tree.failed]  # could not even get a pidfd: not killed
    errs = list(errors) + [f"pid {k.pid}: {why}" for k, why in tree.failed]
    gone_before = list(tree.gone)
    for key in tree.fds:
        if dry_run:
            would.append(key)
            steps.append(ProcStep(key, Result.WOULD))
            continue
        t = track.get(key, Track())
        if not t.signals:
            gone_before.append(key)
            steps.append(ProcStep(key, Result.GONE, detail="exited before any signal"))
            continue
        signalled.append(key)
        if "SIGKILL" in t.signals and key not in in_grace:
            sigkilled.append(key)
        elif key in in_grace:
            exited_in_grace.append(key)
        if t.exited is None:
            survivors.append(key)
            why = t.failed or "still alive after SIGKILL"
            errs.append(f"pid {key.pid}: {why}")
            steps.append(ProcStep(key, Result.FAILED, tuple(t.signals), None, why))
        else:
            steps.append(ProcStep(key, Result.DONE, tuple(t.signals), round(t.exited, 4)))
    return KillResult(
        root=tree.root,
        signalled=tuple(signalled),
        gone_before=tuple(gone_before),
        survivors=tuple(survivors),
        froze=froze,
        elapsed=time.monotonic() - t0,
        dry_run=dry_run,
        grace=grace,
        exited_in_grace=tuple(exited_in_grace),
        sigkilled=tuple(sigkilled),
        found_late=tuple(tree.late),
        would=tuple(would),
        skipped=tuple(tree.skipped),
        steps=tuple(steps),
        errors=tuple(errs),
    )
