"""Effects on the process world: kill a tree, freeze-and-kill a fork bomb, adopt into a job.

Identity is always `ProcKey(pid, starttime)`. Every signal goes through a pidfd opened
*before* the starttime re-check, so a pid reused after the check can never receive it.
A vanished process is data (`gone`), not an error. The decision about *what* to act on is
made elsewhere (classify/policy); this module only keeps a last-line guard against pid
1/2, kernel threads and pruned's own ancestry.
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import select
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pruned.jobs.slurm import parse_slurm_cgroup_path
from pruned.model import ProcKey

PF_KTHREAD = 0x00200000  # include/linux/sched.h: task is a kernel thread
FREEZE_WAIT = 1.0  # seconds to wait for a quarantine cgroup to report frozen
KILL_WAIT = 2.0  # seconds to wait for SIGKILLed processes to exit before calling them survivors
HARD_FACTOR = 3  # freeze_and_kill keeps trying up to this many times its timeout
_CHAIN_LIMIT = 4096  # ppid hops before we give up (a loop in a racy /proc read)

# Per-process results (strings so they print and audit as they are).
DONE = "done"  # exited after our signal (or moved, for adopt)
GONE = "gone"  # gone, or its pid reused, before we acted
FAILED = "failed"  # still alive after SIGKILL, or the signal/write was refused
WOULD = "would"  # dry run: would have acted
SKIPPED = "skipped"  # left alone on purpose (another uid than the tree's)


# ---------------------------------------------------------------- /proc reading


@dataclass(frozen=True, slots=True)
class _Stat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    starttime: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X", "x")


def _parse_stat(pid: int, text: str) -> _Stat:
    """Parse /proc/PID/stat from the last ')' (comm may hold spaces and parentheses)."""
    f = text[text.rindex(")") + 2 :].split()
    return _Stat(pid, f[0], int(f[1]), int(f[2]), int(f[3]), int(f[6]), int(f[19]))


def _read_stat(pid: int, proc_root: str) -> _Stat | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as fh:
            return _parse_stat(pid, fh.read().decode("utf-8", "replace"))
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def _read_uid(pid: int, proc_root: str) -> int | None:
    """Real uid from /proc/PID/status (the dir owner is the effective uid)."""
    try:
        with open(f"{proc_root}/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    return None


def _scan(proc_root: str) -> dict[int, _Stat]:
    """One pass over /proc: stat of every live pid (vanished ones are simply absent)."""
    table: dict[int, _Stat] = {}
    for name in os.listdir(proc_root):
        if name.isdigit():
            st = _read_stat(int(name), proc_root)
            if st is not None:
                table[st.pid] = st
    return table


def _alive_key(key: ProcKey, proc_root: str) -> _Stat | None:
    st = _read_stat(key.pid, proc_root)
    if st is None or st.starttime != key.starttime or st.zombie:
        return None
    return st


# ---------------------------------------------------------------- guard


def protected_pids(proc_root: str = "/proc") -> frozenset[int]:
    """Pids no action may touch: 0, 1, 2, pruned itself and every ancestor of it."""
    out = {0, 1, 2}
    pid = os.getpid()
    for _ in range(_CHAIN_LIMIT):
        out.add(pid)
        st = _read_stat(pid, proc_root)
        if st is None or st.ppid <= 0:
            break
        pid = st.ppid
    return frozenset(out)


def guard(keys: Iterable[ProcKey], proc_root: str = "/proc") -> None:
    """Raise ValueError if any key is pid <= 2, pruned or an ancestor of it, or a kernel thread."""
    protected = protected_pids(proc_root)
    for key in keys:
        if key.pid <= 2:
            raise ValueError(f"refusing to act on pid {key.pid}: pid <= 2")
        if key.pid in protected:
            raise ValueError(f"refusing to act on pid {key.pid}: pruned itself or its ancestor")
        st = _read_stat(key.pid, proc_root)
        if st is not None and st.starttime == key.starttime and st.flags & PF_KTHREAD:
            raise ValueError(f"refusing to act on pid {key.pid}: kernel thread")


# ---------------------------------------------------------------- pidfds


def _raise_nofile() -> None:
    """Lift the soft fd limit to the hard one: a fork bomb needs one pidfd per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_verified(key: ProcKey, proc_root: str = "/proc") -> int | None:
    """A pidfd for key's process, or None if it is gone, a zombie or its pid was reused.

    The pidfd is opened first and starttime checked after: if the check passes, the fd
    pins that very process and a later reuse of the pid cannot redirect its signals.
    """
    try:
        fd = os.pidfd_open(key.pid)
    except ProcessLookupError:
        return None  # other errors (EMFILE...) are not "gone": the caller must hear of them
    if _alive_key(key, proc_root) is None:
        os.close(fd)
        return None
    return fd


def _send(fd: int, sig: int) -> str | None:
    """Signal through a pidfd; None on success, else the reason ('gone' or the error)."""
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return GONE
    except OSError as e:
        return f"{signal.Signals(sig).name}: {os.strerror(e.errno or 0)}"
    return None


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ProcStep:
    """What happened to one process: result, the signals sent, when it exited."""

    key: ProcKey
    result: str  # done / gone / failed / would / skipped
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
        }
        tree = self.signalled or self.would
        if tree:
            f["PRUNED_TREE"] = " ".join(str(k.pid) for k in tree[:50])
        return f


# ---------------------------------------------------------------- tree membership


class _Tree:
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
        self._root_jobs: set[str] | None = None  # job ids of the root's cgroups, read once

    def add(self, key: ProcKey, late: bool = False) -> int | None:
        """Open a verified pidfd for key and make it a member; None if gone or skipped."""
        if key in self.seen:
            return self.fds.get(key)
        self.seen.add(key)
        self.leaders.setdefault(key.pid, key.starttime)
        try:
            fd = open_verified(key, self.proc_root)
        except OSError as e:
            self.failed.append((key, f"pidfd_open: {os.strerror(e.errno or 0)}"))
            return None
        if fd is None:
            self.gone.append(key)
            return None
        if self.uid is not None and _read_uid(key.pid, self.proc_root) != self.uid:
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
        if late:
            self.late.append(key)
        return fd

    def _jobs_of(self, pid: int) -> set[str]:
        out = set()
        for line in cgroup_lines(pid, self.proc_root):
            sp = parse_slurm_cgroup_path(line)
            if sp is not None:
                out.add(sp.job_id)
        return out

    def _in_other_job(self, pid: int) -> bool:
        if self._root_jobs is None:
            self._root_jobs = self._jobs_of(self.root.pid)
        return bool(self._jobs_of(pid) - self._root_jobs)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _candidates(
    trees: Sequence[_Tree], table: dict[int, _Stat], protected: frozenset[int]
) -> list[tuple[_Tree, ProcKey]]:
    """Processes in `table` that belong to one of `trees` and are not members yet.

    One pass for all trees (a sweep kills many): each ppid chain is walked once, memoised.
    """
    live: dict[int, tuple[int, _Tree]] = {}
    leaders: dict[int, list[tuple[int, _Tree]]] = {}
    seen: set[ProcKey] = set()
    for tree in trees:
        live.update({k.pid: (k.starttime, tree) for k in tree.fds})
        for pid, start in tree.leaders.items():
            leaders.setdefault(pid, []).append((start, tree))
        seen |= tree.seen
    memo: dict[int, _Tree | None] = {}

    def via_parent(pid: int) -> _Tree | None:
        path = []
        hit: _Tree | None = None
        for _ in range(_CHAIN_LIMIT):
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

    def via_session(st: _Stat) -> _Tree | None:
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
                if tree.uid is not None and _read_uid(st.pid, tree.proc_root) == tree.uid:
                    return tree
        return None

    out = []
    for pid, st in table.items():
        if pid in protected or st.zombie or st.flags & PF_KTHREAD:
            continue
        key = ProcKey(pid, st.starttime)
        if key in seen:
            continue
        tree = via_parent(st.ppid) or via_session(st)
        if tree is not None:
            out.append((tree, key))
    return out


def _expand(
    trees: Sequence[_Tree],
    proc_root: str,
    protected: frozenset[int],
    on_new: Sequence[int] = (),
    deadline: float | None = None,
    rounds: int = 50,
) -> None:
    """Re-walk /proc until a pass finds no new member; send `on_new` signals to each new one."""
    for _ in range(rounds):
        table = _scan(proc_root)
        found = 0
        for tree, key in _candidates(trees, table, protected):
            fd = tree.add(key, late=True)
            if fd is None:
                continue
            found += 1
            for sig in on_new:
                _send(fd, sig)
        if not found or (deadline is not None and time.monotonic() > deadline):
            return


# ---------------------------------------------------------------- kill


@dataclass
class _Track:
    """Mutable per-process bookkeeping during one kill."""

    signals: list[str] = field(default_factory=list)
    exited: float | None = None
    failed: str = ""


def _wait_exits(
    fds: dict[ProcKey, int], track: dict[ProcKey, _Track], until: float, t0: float
) -> None:
    """poll() the pidfds of live processes until all have exited or `until` passes."""
    poller = select.poll()
    by_fd = {}
    for key, fd in fds.items():
        if track[key].exited is None:
            poller.register(fd, select.POLLIN)
            by_fd[fd] = key
    while by_fd:
        left = until - time.monotonic()
        if left <= 0:
            return
        for fd, _ev in poller.poll(max(1, int(left * 1000))):
            key = by_fd.pop(fd, None)
            if key is not None:
                track[key].exited = time.monotonic() - t0
                poller.unregister(fd)


def kill_tree(
    root: ProcKey,
    descendants: Sequence[ProcKey],
    *,
    grace: float,
    dry_run: bool,
    freeze: bool = True,
    uid: int | None = None,
    proc_root: str = "/proc",
) -> KillResult:
    """Kill root and its descendants (and children forked since): SIGTERM, grace, SIGKILL."""
    return kill_many(
        [(root, descendants)],
        grace=grace,
        dry_run=dry_run,
        freeze=freeze,
        uid=uid,
        proc_root=proc_root,
    )[0]


def kill_many(
    trees: Sequence[tuple[ProcKey, Sequence[ProcKey]]],
    *,
    grace: float,
    dry_run: bool,
    freeze: bool = True,
    uid: int | None = None,
    proc_root: str = "/proc",
) -> list[KillResult]:
    """Kill several trees at once: SIGTERM to all first, then one shared grace wait.

    With `freeze`, every member is SIGSTOPped before it is signalled and the tree is
    re-walked until a pass finds nothing new, so a process cannot fork a child we miss
    between the walk and the signal; SIGCONT follows so SIGTERM handlers can run.
    With `uid`, members of any other real uid are left alone (reported as skipped).
    Raises ValueError (before acting at all) if any key is protected by the guard.
    """
    guard([k for root, desc in trees for k in (root, *desc)], proc_root)
    _raise_nofile()
    protected = protected_pids(proc_root)
    t0 = time.monotonic()
    tr = [_Tree(root, uid, proc_root) for root, _ in trees]
    try:
        for tree, (root, desc) in zip(tr, trees, strict=True):
            for key in (root, *desc):
                tree.add(key)
        if dry_run:
            _expand(tr, proc_root, protected, rounds=3)
            return [_result(t, {}, t0, grace, dry_run=True, froze="none") for t in tr]
        track: dict[ProcKey, _Track] = {}
        all_fds: dict[ProcKey, int] = {}

        def signal_all(sig: int, only_live: bool = True) -> None:
            name = signal.Signals(sig).name
            for tree in tr:
                for key, fd in tree.fds.items():
                    t = track.setdefault(key, _Track())
                    all_fds[key] = fd
                    if only_live and t.exited is not None:
                        continue
                    err = _send(fd, sig)
                    if err is None:
                        t.signals.append(name)
                    elif err == GONE:
                        t.exited = t.exited if t.exited is not None else time.monotonic() - t0
                    else:
                        t.failed = err

        stop = (signal.SIGSTOP,) if freeze else ()
        froze = "sigstop" if freeze else "none"
        if freeze:
            signal_all(signal.SIGSTOP)
        _expand(tr, proc_root, protected, on_new=stop)
        signal_all(signal.SIGTERM)
        if freeze:
            signal_all(signal.SIGCONT)
        _wait_exits(all_fds, track, time.monotonic() + grace, t0)
        in_grace = {k for k, t in track.items() if t.exited is not None}
        if any(t.exited is None for t in track.values()):
            # Stop what is left and catch what it forked during the grace, then kill all.
            if freeze:
                signal_all(signal.SIGSTOP)
            _expand(tr, proc_root, protected, on_new=stop)
            signal_all(signal.SIGKILL)
        # Children forked between the last walk and SIGKILL: walk again until nothing new.
        deadline = time.monotonic() + KILL_WAIT
        _expand(tr, proc_root, protected, on_new=(signal.SIGKILL,), deadline=deadline)
        signal_all(signal.SIGKILL)  # no-op for the exited; covers the late ones' bookkeeping
        _wait_exits(all_fds, track, deadline, t0)
        return [
            _result(t, track, t0, grace, dry_run=False, froze=froze, in_grace=in_grace) for t in tr
        ]
    finally:
        for tree in tr:
            tree.close()


def _result(
    tree: _Tree,
    track: dict[ProcKey, _Track],
    t0: float,
    grace: float,
    *,
    dry_run: bool,
    froze: str,
    in_grace: set[ProcKey] | frozenset = frozenset(),
    errors: Sequence[str] = (),
) -> KillResult:
    steps: list[ProcStep] = [
        ProcStep(k, GONE, detail="gone or pid reused before any signal") for k in tree.gone
    ]
    steps += [ProcStep(k, SKIPPED, detail=f"real uid is not {tree.uid}") for k in tree.skipped]
    steps += [ProcStep(k, FAILED, detail=why) for k, why in tree.failed]
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
            steps.append(ProcStep(key, WOULD))
            continue
        t = track.get(key, _Track())
        if not t.signals:
            gone_before.append(key)
            steps.append(ProcStep(key, GONE, detail="exited before any signal"))
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
            steps.append(ProcStep(key, FAILED, tuple(t.signals), None, why))
        else:
            steps.append(ProcStep(key, DONE, tuple(t.signals), round(t.exited, 4)))
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


# ---------------------------------------------------------------- freeze and kill


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_pids(path: str) -> set[int]:
    try:
        with open(path) as fh:
            return {int(x) for x in fh.read().split()}
    except (FileNotFoundError, ValueError):
        return set()


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def quarantine_method(cgroup_root: str = "/sys/fs/cgroup") -> str:
    """Which freezer this node offers: 'freezer-v1', 'cgroup.freeze' (v2) or 'sigstop'."""
    if os.path.exists(f"{cgroup_root}/freezer/cgroup.procs"):
        return "freezer-v1"
    for v2 in (f"{cgroup_root}/unified", cgroup_root):
        if os.path.exists(f"{v2}/cgroup.controllers"):
            return "cgroup.freeze"
    return "sigstop"


class _Quarantine:
    """A fresh freezer cgroup (v1 freezer or v2 cgroup.freeze) that the tree is moved into."""

    def __init__(self, method: str, cgroup_root: str) -> None:
        self.v1 = method == "freezer-v1"
        base = (
            f"{cgroup_root}/freezer"
            if self.v1
            else (
                f"{cgroup_root}/unified"
                if os.path.exists(f"{cgroup_root}/unified/cgroup.controllers")
                else cgroup_root
            )
        )
        self.base = base
        self.dir = f"{base}/pruned_quarantine_{os.getpid()}_{secrets.token_hex(4)}"
        os.mkdir(self.dir, 0o700)
        self.label = f"{method}:{self.dir}"

    def procs(self) -> set[int]:
        return _read_pids(f"{self.dir}/cgroup.procs")

    def move(self, pid: int, into: bool = True) -> bool:
        try:
            _write(f"{self.dir if into else self.base}/cgroup.procs", str(pid))
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EINVAL, errno.ENOENT):
                return False
            raise
        return True

    def freeze(self, frozen: bool, deadline: float) -> bool:
        if self.v1:
            _write(f"{self.dir}/freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            _write(f"{self.dir}/cgroup.freeze", "1" if frozen else "0")
        while time.monotonic() < deadline:
            if self.v1:
                done = _read_text(f"{self.dir}/freezer.state").strip() == (
                    "FROZEN" if frozen else "THAWED"
                )
            else:
                done = f"frozen {int(frozen)}" in _read_text(f"{self.dir}/cgroup.events")
            if done:
                return True
            time.sleep(0.005)
        return False

    def kill_all(self) -> None:
        """v2 only: cgroup.kill (5.14+) also kills children still in the middle of fork."""
        if not self.v1 and os.path.exists(f"{self.dir}/cgroup.kill"):
            _write(f"{self.dir}/cgroup.kill", "1")

    def remove(self, deadline: float) -> bool:
        while True:
            try:
                os.rmdir(self.dir)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)


def freeze_and_kill(
    root: ProcKey,
    descendants: Sequence[ProcKey],
    *,
    uid: int,
    dry_run: bool,
    timeout: float = 5.0,
    method: str = "auto",
    cgroup_root: str = "/sys/fs/cgroup",
    proc_root: str = "/proc",
) -> KillResult:
    """Fork-bomb path: freeze the whole tree, SIGKILL everything in it, thaw, wait.

    Only processes of real uid `uid` are ever moved or signalled. Preferred: move the tree
    into a fresh quarantine cgroup (children forked after the move are born inside), loop
    until a pass moves nothing new, freeze, kill, thaw, wait until it is empty, rmdir.
    Anything in the quarantine that is not verifiably the tree's is moved back out before
    the kill (a pid reused mid-move). Fallback ('sigstop'): SIGSTOP passes until one finds
    nothing new, then SIGKILL all, then SIGCONT. The caller must not pass processes of a
    running job: moving them would take them out of the job's cgroup.
    """
    guard((root, *descendants), proc_root)
    _raise_nofile()
    protected = protected_pids(proc_root)
    t0 = time.monotonic()
    deadline = t0 + timeout
    if method == "auto":
        method = quarantine_method(cgroup_root)
    tree = _Tree(root, uid, proc_root)
    track: dict[ProcKey, _Track] = {}
    errors: list[str] = []
    try:
        for key in (root, *descendants):
            tree.add(key)
        if dry_run:
            _expand([tree], proc_root, protected, rounds=3)
            return _result(tree, {}, t0, 0.0, dry_run=True, froze=method)
        # `timeout` is the target; a tree that outlives a round gets another, up to 3x.
        hard = t0 + HARD_FACTOR * timeout
        q = None if method == "sigstop" else _Quarantine(method, cgroup_root)
        try:
            for _ in range(100):
                rd = max(deadline, time.monotonic() + 1.0)
                if q is None:
                    _sigstop_round(tree, track, t0, rd, protected, proc_root)
                else:
                    _quarantine_kill(tree, q, track, t0, rd, protected, proc_root, errors)
                left = [k for k in tree.fds if _alive_key(k, proc_root) is not None]
                left += [k for _, k in _candidates([tree], _scan(proc_root), protected)]
                if not left:
                    break
                if time.monotonic() > hard:
                    errors.append(
                        f"{len(left)} process(es) of the tree still alive after "
                        f"{time.monotonic() - t0:.1f}s"
                    )
                    break
        finally:
            if q is not None:
                q.freeze(False, time.monotonic() + 0.5)
                if not q.remove(max(deadline, time.monotonic() + 0.5)):
                    errors.append(f"could not remove {q.dir}: holds {sorted(q.procs())[:10]}")
        froze = "sigstop" if q is None else q.label
        return _result(tree, track, t0, 0.0, dry_run=False, froze=froze, errors=errors)
    finally:
        tree.close()


def _sigstop_round(
    tree: _Tree,
    track: dict[ProcKey, _Track],
    t0: float,
    deadline: float,
    protected: frozenset[int],
    proc_root: str,
) -> None:
    """SIGSTOP passes until one finds nothing new, then SIGKILL all, then SIGCONT all."""
    for fd in tree.fds.values():
        _send(fd, signal.SIGSTOP)
    _expand([tree], proc_root, protected, on_new=(signal.SIGSTOP,), deadline=deadline, rounds=1000)
    for sig in (signal.SIGKILL, signal.SIGCONT):  # all stopped: kill them all, then wake them
        for key, fd in tree.fds.items():
            t = track.setdefault(key, _Track())
            err = _send(fd, sig)
            if err is None:
                t.signals.append(signal.Signals(sig).name)
            elif err != GONE:
                t.failed = err
    _wait_exits(tree.fds, track, max(deadline, time.monotonic() + 0.2), t0)


def _belongs(
    pid: int,
    tree: _Tree,
    table: dict[int, _Stat],
    inside: set[int],
    cands: set[ProcKey],
    protected: frozenset[int],
) -> bool:
    """Is a quarantined pid verifiably the tree's (a member, or born of one, and our uid)?"""
    st = table.get(pid)
    if st is None or pid in protected or st.flags & PF_KTHREAD:
        return False
    if _read_uid(pid, tree.proc_root) != tree.uid:
        return False
    if ProcKey(pid, st.starttime) in tree.fds:
        return True
    # A child forked inside the quarantine after its parent was moved: parent is inside.
    if st.ppid in inside:
        return True
    return ProcKey(pid, st.starttime) in cands


def _quarantine_kill(
    tree: _Tree,
    q: _Quarantine,
    track: dict[ProcKey, _Track],
    t0: float,
    deadline: float,
    protected: frozenset[int],
    proc_root: str,
    errors: list[str],
) -> None:
    def move_members() -> int:
        inside = q.procs()
        moved = 0
        for key in list(tree.fds):
            if key.pid in inside:
                continue
            if _alive_key(key, proc_root) is None:  # pidfd pins it; re-check right before
                continue
            if q.move(key.pid):
                moved += 1
            after = _read_stat(key.pid, proc_root)
            if after is not None and after.starttime != key.starttime:
                # Reused between the check and the write: give the stranger back.
                q.move(key.pid, into=False)
                errors.append(f"pid {key.pid} was reused during the move; moved back out")
        return moved

    # Move until a full pass (walk + move) finds nothing new outside.
    for _ in range(1000):
        _expand([tree], proc_root, protected, deadline=deadline, rounds=1)
        if not move_members() or time.monotonic() > deadline:
            break
    # Bounded: a v2 cgroup may never report "frozen 1" while tasks churn in fork/exit;
    # SIGKILL and cgroup.kill work on a freezing cgroup anyway.
    froze = q.freeze(True, min(deadline, time.monotonic() + FREEZE_WAIT))
    # Frozen: nothing inside forks. Catch stragglers outside (they freeze on attach).
    for _ in range(100):
        _expand([tree], proc_root, protected, deadline=deadline, rounds=1)
        if not move_members() or time.monotonic() > deadline:
            break
    table = _scan(proc_root)
    inside = q.procs()
    cands = {k for _, k in _candidates([tree], table, protected)}
    for pid in sorted(inside):
        if not _belongs(pid, tree, table, inside, cands, protected):
            q.move(pid, into=False)
            errors.append(f"pid {pid} in the quarantine is not the tree's; moved back out")
            continue
        st = table[pid]
        tree.add(ProcKey(pid, st.starttime), late=True)
    # Kill everything we own, frozen or not (a pending SIGKILL fires on thaw).
    for key, fd in tree.fds.items():
        t = track.setdefault(key, _Track())
        err = _send(fd, signal.SIGKILL)
        if err is None:
            t.signals.append("SIGKILL")
        elif err == GONE:
            t.exited = time.monotonic() - t0
        else:
            t.failed = err
    q.kill_all()
    q.freeze(False, deadline)
    _wait_exits(tree.fds, track, max(deadline, time.monotonic() + 0.5), t0)
    if not froze and q.procs():
        errors.append("quarantine did not freeze; processes left in it after SIGKILL")
    while q.procs() and time.monotonic() < deadline:
        time.sleep(0.01)


# ---------------------------------------------------------------- adopt


@dataclass(frozen=True, slots=True)
class AdoptStep:
    """One write of one pid into one cgroup.procs."""

    key: ProcKey
    cgroup: str  # the directory written to
    result: str  # done / gone / failed / would
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AdoptResult:
    root: ProcKey
    moved: tuple[ProcKey, ...]  # in every extern dir
    gone: tuple[ProcKey, ...]  # gone or reused before the first write
    failed: tuple[ProcKey, ...]
    reused: tuple[str, ...]  # exact account of every pid found reused right after a write
    steps: tuple[AdoptStep, ...]
    elapsed: float
    dry_run: bool = False
    would: tuple[ProcKey, ...] = ()
    found_late: tuple[ProcKey, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed and not self.reused and (bool(self.moved) or self.dry_run)

    def describe(self) -> str:
        """One line for an audit MESSAGE."""
        dirs = sorted({s.cgroup for s in self.steps})
        if self.dry_run:
            return f"would move {len(self.would)} process(es) into {', '.join(dirs) or '-'}"
        parts = [f"moved {len(self.moved)} process(es) into {', '.join(dirs) or '-'}"]
        if self.gone:
            parts.append(f"{len(self.gone)} gone before the move")
        if self.failed:
            parts.append(
                "FAILED: "
                + "; ".join(
                    f"{s.key.pid} {s.cgroup}: {s.detail}" for s in self.steps if s.result == FAILED
                )[:300]
            )
        parts.extend(self.reused)
        parts.append(f"{self.elapsed:.3f}s")
        return "; ".join(parts)

    def audit_fields(self) -> dict[str, str]:
        f = {
            "PRUNED_COUNT": str(len(self.moved) or len(self.would)),
            "PRUNED_ELAPSED_MS": str(round(self.elapsed * 1000)),
            "PRUNED_CGROUPS": " ".join(sorted({s.cgroup for s in self.steps})),
        }
        tree = self.moved or self.would
        if tree:
            f["PRUNED_TREE"] = " ".join(str(k.pid) for k in tree[:50])
        return f


def adopt(
    key: ProcKey,
    descendants: Sequence[ProcKey],
    extern_dirs: Sequence[str],
    *,
    dry_run: bool,
    uid: int | None = None,
    proc_root: str = "/proc",
) -> AdoptResult:
    """Move key's tree into every extern cgroup dir, re-checking starttime around each write.

    A starttime mismatch before a write means gone: nothing is written. A mismatch right
    after a write means the pid was reused in between and a stranger was moved: reported
    in `reused` with the pid, the cgroup and both start times.
    """
    guard((key, *descendants), proc_root)
    if not extern_dirs:
        raise ValueError("adopt needs at least one extern cgroup directory")
    protected = protected_pids(proc_root)
    t0 = time.monotonic()
    # With `uid`, the re-walk never takes in another user's process (a `sudo -i` inside the
    # stray's tmux must not be moved into this user's job).
    tree = _Tree(key, uid, proc_root)
    steps: list[AdoptStep] = []
    reused: list[str] = []
    moved: list[ProcKey] = []
    failed: list[ProcKey] = []
    gone: list[ProcKey] = []
    try:
        for k in (key, *descendants):
            tree.add(k)
        _expand([tree], proc_root, protected, rounds=3)
        if dry_run:
            steps = [AdoptStep(k, d, WOULD) for k in tree.fds for d in extern_dirs]
            return AdoptResult(
                root=key,
                moved=(),
                gone=tuple(tree.gone),
                failed=(),
                reused=(),
                steps=tuple(steps),
                elapsed=time.monotonic() - t0,
                dry_run=True,
                would=tuple(tree.fds),
                found_late=tuple(tree.late),
            )
        done: set[ProcKey] = set()
        for _ in range(10):  # children forked during the move are walked in the next round
            for k in [k for k in tree.fds if k not in done]:
                done.add(k)
                r = _adopt_one(k, extern_dirs, proc_root, steps, reused)
                {DONE: moved, GONE: gone, FAILED: failed}[r].append(k)
            before = len(tree.fds)
            _expand([tree], proc_root, protected, rounds=1)
            if len(tree.fds) == before:
                break
        gone = list(tree.gone) + gone
        failed += [k for k, _ in tree.failed]
        return AdoptResult(
            root=key,
            moved=tuple(moved),
            gone=tuple(gone),
            failed=tuple(failed),
            reused=tuple(reused),
            steps=tuple(steps),
            elapsed=time.monotonic() - t0,
            dry_run=False,
            found_late=tuple(tree.late),
        )
    finally:
        tree.close()


def _adopt_one(
    key: ProcKey, dirs: Sequence[str], proc_root: str, steps: list[AdoptStep], reused: list[str]
) -> str:
    """Write key.pid into each dir's cgroup.procs with a starttime check before and after."""
    result = DONE
    for d in dirs:
        if _alive_key(key, proc_root) is None:
            steps.append(AdoptStep(key, d, GONE, "gone or pid reused before the write"))
            return GONE if result == DONE and d == dirs[0] else FAILED
        try:
            _write(f"{d}/cgroup.procs", str(key.pid))
        except OSError as e:
            if e.errno == errno.ESRCH:
                steps.append(AdoptStep(key, d, GONE, "exited during the write"))
                return GONE if d == dirs[0] else FAILED
            steps.append(AdoptStep(key, d, FAILED, f"write refused: {os.strerror(e.errno or 0)}"))
            result = FAILED
            continue
        after = _read_stat(key.pid, proc_root)
        if after is not None and after.starttime != key.starttime:
            msg = (
                f"pid {key.pid} was reused between the check and the write: a process "
                f"started at tick {after.starttime} (not {key.starttime}) was moved into {d}"
            )
            reused.append(msg)
            steps.append(AdoptStep(key, d, FAILED, msg))
            return FAILED
        if after is None or after.zombie:
            steps.append(AdoptStep(key, d, GONE, "exited right after the write"))
            return GONE if d == dirs[0] else FAILED
        steps.append(AdoptStep(key, d, DONE))
    return result


def cgroup_lines(pid: int, proc_root: str = "/proc") -> list[str]:
    """Raw /proc/PID/cgroup lines ([] if gone): for checking where a process sits."""
    return _read_text(f"{proc_root}/{pid}/cgroup").splitlines()
