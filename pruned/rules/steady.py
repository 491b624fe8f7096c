"""Steady-state verdicts: the last sweep's verdict of a process whose inputs did not change. PURE.

Between full reads most of a node's processes are the same records as in the last sweep
(pruned.linux.proccache keeps them), and judging them again gives the same answer. A verdict
(rules.classify) rests on exactly these inputs, and is carried over only while all of them
are what they were when it was made:
- the process's own record: the same Proc, or one equal in every field classify reads
  (`_same`: a root-owned process is re-read each sweep, into a new object);
- the records of all its ancestors up to the top of its chain, the same way (the batch
  daemon and sshd lineage walks; a parent that exited, or one that appeared, breaks it);
- its job membership (the cgroup line it was judged by) and the job that membership names,
  as the job view shows it (running or not, its canonical id): a job that ends turns its
  processes from batch to stray; a job that starts has new members anyway;
- the policy, the node facts and the known executables (`Basis`): any change, and nothing
  is carried.

A decision is taken again (rules.decide, `known`: the memo's decisions) only for a non-stray
whose record and verdict are the very objects it was made for: `ignore`, whatever the time,
the brake, the scope or the rails say. A stray's decision is made again every sweep from its
verdict: min_age is time (a stray younger than min_age becomes actionable later, by no
event), and its lineage, adoption failures, the --uid scope and the brake all move.

The memo holds no record of its own: it refers to the Proc and Decision objects of the last
sweep, which the process cache holds anyway. It must be emptied whenever its records cannot
be trusted (the caller keeps it in ProcCache.memo, emptied by every full read).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pruned.model import (
    DEAD_STATES,
    Decision,
    Job,
    JobView,
    KnownExes,
    Membership,
    Policy,
    Proc,
    SweepPlan,
    Verdict,
)


@dataclass(frozen=True, slots=True)
class Basis:
    """What every verdict of a sweep shares: when any of it differs, nothing is carried."""

    policy: Policy
    facts: object  # pruned.policy.facts.NodeFacts (system ranges, whitelisted uids)
    exes: KnownExes


@dataclass(slots=True)
class VerdictMemo:
    """The last sweep's judgements: pid -> its decision (with the Proc and Verdict it was
    made from), pid -> the membership it was judged with, and the job each membership
    named then."""

    basis: Basis | None = None
    decisions: dict[int, Decision] = field(default_factory=dict)
    members: dict[int, Membership] = field(default_factory=dict)
    # One object per distinct membership: a pid's membership is compared by identity.
    canon: dict[Membership, Membership] = field(default_factory=dict)
    jobs: dict[Membership, tuple[str, Job | None]] = field(default_factory=dict)
    canon_floor: int = 0  # len(canon) after it was last rebuilt


_UNSEEN = object()


def _same(a: Proc, b: Proc) -> bool:
    """Equal in every field classify reads (the run state only as dead or not)."""
    return a is b or (
        a.starttime == b.starttime and a.ppid == b.ppid and a.uid == b.uid
        and a.uid_exact == b.uid_exact and a.kthread == b.kthread and a.exe == b.exe
        and a.exe_host == b.exe_host and a.comm == b.comm
        and (a.state in DEAD_STATES) == (b.state in DEAD_STATES)
    )  # fmt: skip


@dataclass(slots=True)
class Carry:
    """carry()'s answer for one sweep: `verdict(pid, proc)` is the last sweep's verdict of
    that process if it still holds, else None (and the pid is noted in `judged`, the ones
    classify judges afresh). Asked once per process, so nothing per process is built."""

    verdict: Callable[[int, Proc], Verdict | None]
    judged: list[int]


def carry(memo: VerdictMemo, procs: Mapping[int, Proc], jobs: JobView,
          basis: Basis) -> Carry | None:  # fmt: skip
    """What of the last sweep's verdicts still holds for `procs` judged against `jobs` under
    `basis` (None: nothing, judge all). The decisions to go with them are memo.decisions:
    rules.decide takes one again only for the same record and verdict objects, and never a
    stray's."""
    if memo.basis is None or memo.basis != basis or not memo.decisions:
        return None
    old = memo.decisions
    members = memo.members
    membership = jobs.membership
    stable: dict[int, bool] = {}  # parent pid -> its record and its whole chain are unchanged
    same_member: dict[int, Membership | None] = {}  # id(new membership) -> its memo twin
    judged: list[int] = []

    def chain_ok(pid: int) -> bool:
        path: list[int] = []
        cur = pid
        ok = True
        while True:
            s = stable.get(cur)
            if s is not None:
                ok = s
                break
            p = procs.get(cur)
            if p is None:  # the chain ends: it must have ended here last time too
                ok = cur not in old
                break
            d = old.get(cur)
            if d is None or not _same(p, d.proc) or cur in path:
                ok = False
                break
            path.append(cur)
            cur = p.ppid
        for c in path:
            stable[c] = ok
        return ok

    def twin(m: Membership) -> Membership | None:
        """The memo's object equal to m, if the job m names is as it was then too."""
        t = memo.canon.get(m)
        if t is not None and memo.jobs.get(t) != (jobs.canonical(m.job_id), jobs.job(m.job_id)):
            t = None  # the job it names started, ended or changed: judged again
        same_member[id(m)] = t
        return t

    get_old, get_member, get_om, get_stable = old.get, membership.get, members.get, stable.get
    refuse = judged.append

    def verdict(pid: int, p: Proc) -> Verdict | None:
        d = get_old(pid)
        if d is None or (d.proc is not p and not _same(p, d.proc)):
            return refuse(pid)
        ok = get_stable(p.ppid)
        if not (ok or (ok is None and chain_ok(p.ppid))):
            return refuse(pid)
        m = get_member(pid)
        if m is None:
            if pid in members:
                return refuse(pid)  # it left its job's cgroup
        else:
            t = same_member.get(id(m), _UNSEEN)
            if t is _UNSEEN:
                t = twin(m)
            if t is None or t is not get_om(pid):
                return refuse(pid)  # a membership it did not have, or its job changed
        return d.verdict

    return Carry(verdict, judged)


def remember(memo: VerdictMemo, basis: Basis, plan: SweepPlan, procs: Mapping[int, Proc],
             jobs: JobView, carried: Carry | None) -> None:  # fmt: skip
    """Update the memo from this sweep: its decision of every process in `procs` (the
    plan's), and the membership and job each verdict judged afresh was judged with.
    `carried`: what carry() gave this sweep (None: every process was judged afresh).
    Costs what changed, not the table."""
    if memo.basis != basis:
        memo.basis = basis
        memo.decisions, memo.members, memo.canon, memo.jobs = {}, {}, {}, {}
    decisions, members, canon = memo.decisions, memo.members, memo.canon
    for pid in decisions.keys() - procs.keys():
        del decisions[pid]  # gone from the snapshot
        members.pop(pid, None)
    get = decisions.get
    decisions.update({d.proc.pid: d for d in plan.decisions if get(d.proc.pid) is not d})
    membership = jobs.membership
    by_id: dict[int, Membership] = {}  # id(this view's membership) -> its memo twin
    for pid in procs if carried is None else carried.judged:  # by its membership of now
        m = membership.get(pid)
        if m is None:
            members.pop(pid, None)
            continue
        c = by_id.get(id(m))
        if c is None:
            c = canon.get(m)
            if c is None:
                c = canon[m] = m
            by_id[id(m)] = c
            memo.jobs[c] = (jobs.canonical(m.job_id), jobs.job(m.job_id))
        members[pid] = c
    if len(canon) > 2 * memo.canon_floor + 256:  # drop memberships no pid holds now
        held = {id(m): m for m in members.values()}.values()
        memo.canon = {m: m for m in held}
        memo.jobs = {m: memo.jobs[m] for m in memo.canon}
        memo.canon_floor = len(memo.canon)
