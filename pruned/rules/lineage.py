"""Age by lineage: how long a stray's lineage has been stray, not just the process. PURE.

`min_age` lets a new login or job step race pam_slurm_adopt or slurmstepd before it is
judged. A stray that forks a fresh child and exits every few seconds is always younger than
min_age, so by its own age alone it would never be judged. Its lineage is old, though: the
parent it came from, the session and the process group it still sits in. `trace` gives each
stray the start of the oldest stray lineage it provably belongs to; decide() judges a young
stray whose lineage has been stray for at least min_age.

What counts as lineage, and why each is safe:
- its parent, when the parent is in the same picture, a stray of the same uid, and older;
  or, on the event path, the stray that forked it (the kernel's fork event names it) and
  has exited since, as remembered by (pid, starttime) when it was seen alive;
- a (uid, session id) or (uid, process group id) in which a stray was seen before (memory
  kept by pruned.lineage) or earlier in this picture. The kernel never reuses a pid while a
  session or process group of that id has members (struct pid stays referenced), and the
  group is only used when its leader is gone or is itself a stray of that uid: a session led
  by a whitelisted admin's shell, an sshd session or a system process is never a lineage. A
  leader that differs from the one remembered (or a leader that is back when it was gone)
  means the id was reused: a new group. A group with a member of the same uid that is not a
  stray (adopted into a job, batch) or a whitelisted member of any uid is not a stray lineage
  at all, and is forgotten. A new ssh login has its own session, so it is never covered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pruned.model import ProcClass, ProcKey, Snapshot, Verdict

KINDS = (("session", "session"), ("pgroup", "process group"))


@dataclass(frozen=True, slots=True, order=True)
class Group:
    """A session or process group of one uid: `kind` "session" or "pgroup", `gid` its id."""

    kind: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class GroupMemo:
    """What is remembered of a stray group."""

    since: float  # epoch start of the oldest stray lineage seen in it
    leader: ProcKey | None  # its leader (pid == gid) when first seen alive; None: gone then
    first: str  # the stray that began the memory, "pid 123 (bash)"
    seen: float  # epoch of the last observation that saw a stray in it


@dataclass(frozen=True, slots=True)
class LineageMark:
    """A stray's lineage is older than the process: since when, and which lineage it is."""

    since: float  # epoch
    rule: str  # "lineage.parent", "lineage.session", "lineage.pgroup"
    what: str  # "its session 4242 of uid 30001 (first stray there: pid 4242 (bash))"
    group: Group | None = None  # the session or process group, for those rules
    uid: int = -1  # whose process it was given to (a key of another uid is not its lineage)


@dataclass(frozen=True, slots=True)
class LineageUpdate:
    """What one observation adds to (and removes from) the memory."""

    keys: dict[ProcKey, LineageMark] = field(default_factory=dict)
    groups: dict[Group, GroupMemo] = field(default_factory=dict)
    drop: frozenset[Group] = frozenset()
    strays: dict[ProcKey, Forker] = field(default_factory=dict)  # every stray seen


@dataclass(frozen=True, slots=True)
class Forker:
    """A stray as a possible parent: who it is and since when its lineage is stray."""

    key: ProcKey
    uid: int
    since: float
    comm: str


def iso(epoch: float) -> str:
    """UTC time of day for evidence lines."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def evidence(mark: LineageMark, age: float, grown: float, min_age: float) -> str:
    """The sentence scan, explain and the audit trail show for a stray judged by lineage."""
    return (
        f"{mark.rule}: young ({age:.1f}s), but {mark.what} has been stray since "
        f"{iso(mark.since)} ({grown:.1f}s >= min_age {min_age:g}s): judged with it"
    )


def _tainted(snap: Snapshot, verdicts: Mapping[int, Verdict], ids: set[int]) -> set[Group]:
    """Groups that are not stray lineages: a same-uid member that is not a stray, or a
    whitelisted member of any uid (an admin's shell the stray runs in). Groups of a
    whitelisted member are tainted for every uid, so they are keyed with uid -1. Only
    groups whose id is in `ids` (those of strays) are looked at."""
    out: set[Group] = set()
    if not ids:
        return out
    for pid, p in snap.procs.items():
        if p.sid not in ids and p.pgid not in ids:  # most of a node: nothing to look at
            continue
        v = verdicts.get(pid)
        # A system process (a setuid su or passwd in a user's session) says nothing: a
        # session it leads is refused by the leader check.
        if v is None or v.cls in (ProcClass.STRAY, ProcClass.SYSTEM):
            continue
        uid = -1 if v.cls is ProcClass.WHITELISTED else p.uid
        if p.sid in ids:
            out.add(Group("session", uid, p.sid))
        if p.pgid in ids:
            out.add(Group("pgroup", uid, p.pgid))
    return out


def trace(
    snap: Snapshot,
    verdicts: Mapping[int, Verdict],
    keys: Mapping[ProcKey, LineageMark],
    groups: Mapping[Group, GroupMemo],
    forked: Mapping[int, Forker] | None = None,
) -> tuple[dict[int, LineageMark], LineageUpdate]:
    """Each stray's lineage mark (only where the lineage is older than the process), and
    what the memory learns. `keys`, `groups`: the memory from earlier observations;
    `forked`: pid -> the remembered stray that forked it and is gone now (fork events).

    The caller must have read every group leader that exists (pid == sid or pgid of a
    stray) into `snap`: a leader missing from it counts as gone.
    """
    strays = sorted(
        (p for pid, v in verdicts.items() if v.cls is ProcClass.STRAY
         and (p := snap.procs.get(pid)) is not None and not p.zombie),
        key=lambda p: (p.starttime, p.pid),
    )  # fmt: skip
    tainted = _tainted(snap, verdicts, {x for p in strays for x in (p.sid, p.pgid)})
    work: dict[Group, GroupMemo] = {}  # groups as this observation leaves them
    drop: set[Group] = set()
    marks: dict[int, LineageMark] = {}
    since_of: dict[int, float] = {}
    new_keys: dict[ProcKey, LineageMark] = {}

    def usable(g: Group) -> tuple[bool, ProcKey | None]:
        """Whether g can be a stray lineage in this picture, and its live leader."""
        if g.gid <= 1 or g in tainted or Group(g.kind, -1, g.gid) in tainted:
            return False, None
        leader = snap.procs.get(g.gid)
        if leader is None:
            return True, None
        lv = verdicts.get(leader.pid)
        own = leader.sid if g.kind == "session" else leader.pgid
        if leader.uid != g.uid or own != g.gid or lv is None or lv.cls is not ProcClass.STRAY:
            return False, None
        return True, leader.key

    def memo_of(g: Group, leader: ProcKey | None) -> GroupMemo | None:
        m = work.get(g) or groups.get(g)
        if m is None:
            return None
        # A live leader other than the remembered one, or one that is back after it was
        # gone: the id was reused once the old group emptied. A new group.
        if leader is not None and m.leader != leader:
            drop.add(g)
            return None
        return m

    for p in strays:
        start = snap.start_epoch(p)
        best, mark = start, None
        known = keys.get(p.key)
        if known is not None and known.uid == p.uid and known.since < best:
            best, mark = known.since, known
            if known.group is not None and not usable(known.group)[0]:
                # Its lineage stays, but a group that is no stray lineage now (a member
                # adopted or whitelisted since) is not one the kill may follow.
                mark = replace(known, group=None)
        parent = snap.procs.get(p.ppid)
        if (parent is not None and parent.pid in since_of and parent.uid == p.uid
                and parent.starttime <= p.starttime and since_of[parent.pid] < best):
            best = since_of[parent.pid]
            mark = LineageMark(best, "lineage.parent", f"its parent {parent.pid} ({parent.comm})")
        fk = forked.get(p.pid) if forked else None
        if (fk is not None and fk.uid == p.uid and fk.key.starttime <= p.starttime
                and fk.since < best):
            best = fk.since
            mark = LineageMark(best, "lineage.parent", f"its parent {fk.key.pid} ({fk.comm}, "
                               "which forked it and exited)")  # fmt: skip
        seen_groups: list[tuple[Group, ProcKey | None, GroupMemo | None]] = []
        for kind, label in KINDS:
            g = Group(kind, p.uid, p.sid if kind == "session" else p.pgid)
            ok, leader = usable(g)
            if not ok:
                if g in groups:
                    drop.add(g)
                continue
            m = memo_of(g, leader)
            seen_groups.append((g, leader, m))
            if m is not None and m.since < best:
                best = m.since
                mark = LineageMark(
                    best, f"lineage.{kind}",
                    f"its {label} {g.gid} of uid {g.uid} (first stray there: {m.first})", g,
                )  # fmt: skip
        since_of[p.pid] = best
        if mark is not None:
            marks[p.pid] = mark
            new_keys[p.key] = replace(mark, uid=p.uid)
        for g, leader, m in seen_groups:
            if m is None:
                m = GroupMemo(best, leader, f"pid {p.pid} ({p.comm})", snap.taken_at)
            elif best < m.since:
                m = GroupMemo(best, m.leader, m.first, snap.taken_at)
            else:
                m = GroupMemo(m.since, m.leader, m.first, snap.taken_at)
            work[g] = m
            drop.discard(g)
    strays_seen = {p.key: Forker(p.key, p.uid, since_of[p.pid], p.comm) for p in strays}
    return marks, LineageUpdate(new_keys, work, frozenset(drop), strays_seen)
