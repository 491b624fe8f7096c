"""The kill at kernel cost: every tree of one kill in one frozen quarantine, killed whole.

kill_many's path where a cgroup freezer is offered and the trees' uid is known. The
quarantine (pruned.linux.cgroupfs.Quarantine) is frozen while it is still empty, so each
member freezes as it is moved in: from then on what it forks is born inside, and once the
freezer has reached it, nothing inside forks at all (each kill round takes in what a
member forked on its way to frozen). What a member forked before its move (between the caller's
snapshot and the move) was born in the member's own v2 cgroup, and only root can take it
out of there (or, in a delegated subtree, its owner, within that subtree): the members of
those cgroups, not every /proc/PID/stat on the node, are where the tree's late members
can be. (A child whose parent root moved elsewhere after the fork stays where it was born,
unseen: a process the sweep or the event path judges as a stray of its own.) Once a look
there finds nothing new, the quarantine's cgroup.procs is the whole tree and no /proc
re-walk follows: SIGTERM (pending while frozen), thaw, grace; then
freeze, SIGKILL to all (v2: one `cgroup.kill` write), thaw, wait.

Identity as everywhere: each member is a pidfd verified against its starttime before it
is moved, and the pidfd still naming a live (or zombie) process right after the write
proves the write moved that process and no pid reused by another. Whatever stops this
before the first signal (no cgroup, a member that must stay where it is, an unexpected
write error) raises Fallback: kill_many then takes its re-walking path, which moves the
members on into quarantines of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

from pruned.act.contain import FREEZE_WAIT, belongs, why_lines_stay
from pruned.act.track import Track, track_exits, wait_grace
from pruned.act.tree import Tree, candidates
from pruned.linux.cgroupfs import ProcsWriter, Quarantine, read_procs, v2_mount
from pruned.linux.pidfd import send_signal
from pruned.linux.procfs import StatFields, read_cgroup_lines, read_stat, read_stats
from pruned.model import ProcKey, Result

CONFINE_ROUNDS = 20  # looks for late members before the trees count as still growing outside
KILL_ROUNDS = 3  # freeze-kill-thaw rounds while the quarantine still holds processes
KILL_WAIT = 2.0  # seconds for the SIGKILLed to exit, per round
OWNER_HOPS = 64  # ppid hops when telling which tree a process born inside belongs to


class Fallback(Exception):
    """The trees cannot all be confined: kill them by the re-walking path."""


@dataclass
class Confined:
    """What kill_many needs from a confined kill to build each tree's KillResult."""

    cut: bool = False  # the grace was cut short: a fork storm inside
    in_grace: set[ProcKey] = field(default_factory=set)
    joined: dict[int, int] = field(default_factory=dict)  # tree index -> born inside
    errors: list[str] = field(default_factory=list)


def v2_path(lines: tuple[str, ...]) -> str | None:
    """The v2 cgroup path in /proc/PID/cgroup lines ("0::/a/b" -> "/a/b"), or None."""
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def born_where(v2: str, path: str) -> list[int] | None:
    """Pids of the cgroup `path` (under the v2 mount `v2`) where a member's children are
    born; None when it cannot be read (the caller then walks /proc).

    A root-owned cgroup: only its own cgroup.procs (no one else may move a process out).
    A delegated one (cgroup.procs owned by a user, who may move processes anywhere below
    the delegation's top): every cgroup of the subtree under that top."""
    d = os.path.normpath(f"{v2}/{path}")
    if not d.startswith(v2) or not os.path.isdir(d):
        return None
    try:
        if os.stat(f"{d}/cgroup.procs").st_uid == 0:
            return read_procs(f"{d}/cgroup.procs")
        while d != v2 and os.stat(f"{os.path.dirname(d)}/cgroup.procs").st_uid != 0:
            d = os.path.dirname(d)
        pids: list[int] = []
        for top, _dirs, _files in os.walk(d):  # never follows symlinks
            pids += read_procs(f"{top}/cgroup.procs")
        return pids
    except (OSError, ValueError):
        return None


def owner_tree(
    pid: int, table: dict[int, StatFields], member_pid: dict[int, int]
) -> int:
    """Index of the tree a process born inside belongs to: its nearest member ancestor,
    else the member leading its session or process group, else the first tree."""
    p = pid
    for _ in range(OWNER_HOPS):
        st = table.get(p)
        if st is None:
            break
        if st.ppid in member_pid:
            return member_pid[st.ppid]
        p = st.ppid
    st = table.get(pid)
    if st is not None:
        for lead in (st.session, st.pgrp):
            if lead in member_pid:
                return member_pid[lead]
    return 0


class _Confinement:
    """The moves of one confined kill: members in, late members found, strangers out."""

    def __init__(self, tr: list[Tree], q: Quarantine, protected: frozenset[int],
                 cgroup_root: str, errors: list[str]) -> None:  # fmt: skip
        self.tr = tr
        self.q = q
        self.protected = protected
        self.proc_root = tr[0].proc_root
        self.v2 = v2_mount(cgroup_root)
        self.sources: set[str | None] = set()  # v2 cgroups the members came from
        self.errors = errors
        # Our own cgroup lines name every hierarchy of the node: one "0::" line is v2 only.
        own = read_cgroup_lines(os.getpid(), self.proc_root)
        self.v2_only = self.v2 is not None and bool(own) and all(x.startswith("0::") for x in own)
        self.lines_by_pid: dict[int, tuple[str, ...]] = {}  # v2 only: from cgroup.procs
        self.q_rel = "/" + os.path.basename(q.dir)  # its path in its hierarchy

    def move_in(self, pending: list[tuple[Tree, ProcKey]], writer: ProcsWriter) -> None:
        """Move every pending member in: all reads first, then the writes back to back (a
        cgroup move takes a lock whose fast path lasts only while moves keep coming), then
        the identity check of each move."""
        why_of: dict[tuple[str, ...], str | None] = {}  # a tree's members share their lines
        moving = []
        for tree, key in pending:
            fd = tree.fds.get(key)
            if fd is None:
                continue
            lines = self.lines_of(key.pid)
            if not lines:
                continue  # exited: its pidfd says so to every later look
            if lines not in why_of:
                why_of[lines] = why_lines_stay(lines, tree.uid)
            if why_of[lines] is not None:
                raise Fallback(f"pid {key.pid} stays where it is ({why_of[lines]})")
            self.sources.add(v2_path(lines))
            moving.append((key, fd))
        for key, _fd in moving:
            try:
                writer.move(key.pid)
            except OSError as e:
                raise Fallback(f"moving pid {key.pid}: {os.strerror(e.errno or 0)}") from e
        for key, fd in moving:
            # Alive (or a zombie) now, it was alive at the write: the pid named it then.
            if send_signal(fd, 0) == Result.GONE:
                self.give_back(key)  # it exited: the pid written may be another's by now

    def lines_of(self, pid: int) -> tuple[str, ...]:
        """pid's /proc/PID/cgroup lines. On a v2-only node that is one line, the same for
        every process its cgroup lists: read once per cgroup, with that cgroup's members."""
        lines = self.lines_by_pid.get(pid)
        if lines is not None:
            return lines
        lines = read_cgroup_lines(pid, self.proc_root)
        path = v2_path(lines)
        if self.v2_only and self.v2 is not None and path is not None and len(lines) == 1:
            with contextlib.suppress(OSError, ValueError):
                d = os.path.normpath(f"{self.v2}/{path}")
                if d.startswith(self.v2):
                    for p in read_procs(f"{d}/cgroup.procs"):
                        self.lines_by_pid[p] = lines
        return lines

    def give_back(self, key: ProcKey) -> None:
        """Move a stranger that took a member's pid back out, if the write caught it."""
        st = read_stat(key.pid, self.proc_root)
        if st is not None and st.starttime != key.starttime and key.pid in self.q.procs():
            self.q.move(key.pid, into=False)
            self.errors.append(f"pid {key.pid} was reused during the move; moved back out")

    def late(self) -> list[tuple[Tree, ProcKey]]:
        """Members forked before their parent's move, verified and made members."""
        table: dict[int, StatFields] | None = None
        if self.v2 is not None and None not in self.sources:
            table = {k.pid: st for t in self.tr for k, st in t.stats.items()}
            for src in self.sources:
                assert src is not None
                pids = born_where(self.v2, src)
                if pids is None:
                    table = None
                    break
                for pid in pids:
                    if pid not in table and pid not in self.protected:
                        st = read_stat(pid, self.proc_root)
                        if st is not None:
                            table[pid] = st
        if table is None:  # no cgroup tells where they were born: every process of the uid
            uid = self.tr[0].uid
            table = read_stats(self.proc_root, None if uid is None else {uid})
        out = []
        for tree, key in candidates(self.tr, table, self.protected):
            if tree.add(key, late=True) is not None:
                out.append((tree, key))
        return out

    def take_in(self, joined: dict[int, int]) -> set[int]:
        """The quarantine's members now; those born inside join their tree (verified),
        any other is moved back out. Frozen, this is the complete set."""
        inside = self.q.procs()
        member_pid = {k.pid: i for i, t in enumerate(self.tr) for k in t.fds}
        unknown = sorted(inside - member_pid.keys())
        table = {}
        for pid in unknown:
            st = self.born_inside(pid)
            if st is not None:
                table[pid] = st
            else:
                inside.discard(pid)  # gone, or its pid already another's: not ours to touch
        for pid in sorted(table):
            if not belongs(pid, self.tr[0], table, self.protected):
                if self.q.move(pid, into=False):
                    self.errors.append(f"pid {pid} in the quarantine is not the tree's "
                                       "(another real uid); moved back out")  # fmt: skip
                inside.discard(pid)
                continue
            i = owner_tree(pid, table, member_pid)
            if self.tr[i].add(ProcKey(pid, table[pid].starttime), late=True) is not None:
                joined[i] = joined.get(i, 0) + 1
                member_pid[pid] = i
            else:
                inside.discard(pid)
        return inside

    def born_inside(self, pid: int) -> StatFields | None:
        """pid's stat if the process that has it now sits in the quarantine, else None. The
        pid was listed inside, but may have been reused outside since: a pidfd held across
        both reads proves they were of one process, and the starttime the caller verifies
        with its own pidfd names that process."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            lines = read_cgroup_lines(pid, self.proc_root)
            st = read_stat(pid, self.proc_root)
            if st is None or send_signal(fd, 0) is not None:
                return None
        finally:
            os.close(fd)
        return st if any(self.in_q(line) for line in lines) else None

    def in_q(self, line: str) -> bool:
        """Does this /proc/PID/cgroup line put its process in the quarantine?"""
        _hid, controllers, path = line.split(":", 2)
        if path != self.q_rel:
            return False
        return "freezer" in controllers.split(",") if self.q.v1 else line.startswith("0::")


def kill_confined(
    tr: list[Tree],
    q: Quarantine,
    *,
    grace: float,
    protected: frozenset[int],
    t0: float,
    track: dict[ProcKey, Track],
    cgroup_root: str,
) -> Confined:
    """Confine every tree of the kill in `q`, then SIGTERM, grace, SIGKILL (grace 0: SIGKILL
    only). All members share one uid (tr[0].uid). Raises Fallback, before any signal, when
    the trees cannot all be confined."""
    out = Confined()
    c = _Confinement(tr, q, protected, cgroup_root, out.errors)
    try:
        if not q.freeze(True, time.monotonic() + FREEZE_WAIT):
            raise Fallback("the empty quarantine did not report frozen")
        writer = ProcsWriter(q.dir)
    except OSError as e:
        raise Fallback(f"quarantine {q.dir}: {os.strerror(e.errno or 0)}") from e
    try:
        pending = [(t, k) for t in tr for k in t.fds]
        for _ in range(CONFINE_ROUNDS):
            c.move_in(pending, writer)
            pending = c.late()
            if not pending:
                break
        else:
            raise Fallback("the trees kept growing outside the quarantine")
    finally:
        writer.close()
    # No wait for the kernel to report every member frozen (under load, a thousand sleepers
    # take a while to reach the freezer): a member still on its way forks only into the
    # quarantine, and each kill round below takes in what its look found there.

    def fds() -> dict[ProcKey, int]:
        return {k: fd for t in tr for k, fd in t.fds.items()}

    def send(sig: int, inside: set[int] | None = None) -> None:
        """sig to every live member; with `inside`, those in it are marked as already sent
        it (cgroup.kill killed them) and only the others are signalled."""
        name = signal.Signals(sig).name
        for key, fd in fds().items():
            t = track.setdefault(key, Track())
            if t.exited is not None:
                continue
            err = None if inside is not None and key.pid in inside else send_signal(fd, sig)
            if err is None:
                t.signals.append(name)
            elif err == Result.GONE:
                t.exited = time.monotonic() - t0
            else:
                t.failed = err

    if grace > 0:
        c.take_in(out.joined)
        send(signal.SIGTERM)  # pending while frozen: all get it at the thaw
        q.freeze(False, time.monotonic())  # the exits are waited for on the pidfds
        for key in fds():
            track.setdefault(key, Track())
        out.cut = wait_grace(fds(), track, grace, t0, {0: q})
        out.in_grace = {k for k, t in track.items() if t.exited is not None}
    sigkilled: set[int] = set()
    for _ in range(KILL_ROUNDS):
        live = {k.pid for k in fds() if track.setdefault(k, Track()).exited is None}
        # Another round only for what the last did not reach (born inside mid-kill, on v1):
        # a member that outlives SIGKILL in D state is the caller's survivor, not a reason
        # to wait again.
        if not (live | q.procs()) - sigkilled:
            break
        deadline = time.monotonic() + KILL_WAIT
        try:  # no wait for "frozen": what forks meanwhile is born inside, for the next round
            q.freeze(True, time.monotonic())
        except OSError as e:  # SIGKILL works on a thawed cgroup too
            out.errors.append(f"freezing {q.dir}: {os.strerror(e.errno or 0)}")
        inside = c.take_in(out.joined)
        killed: set[int] | None = None
        try:
            if q.kill_all():  # v2: one write kills the whole cgroup, children mid-fork too
                killed = inside
        except OSError as e:
            out.errors.append(f"cgroup.kill of {q.dir}: {os.strerror(e.errno or 0)}")
        send(signal.SIGKILL, killed)
        sigkilled |= inside | live
        try:
            q.freeze(False, time.monotonic())  # the exits it lets happen: on the pidfds
        except OSError as e:
            out.errors.append(f"thawing {q.dir}: {os.strerror(e.errno or 0)}")
        track_exits(fds(), track, max(deadline, time.monotonic() + 0.5), t0)
    return out
