"""Steady-state verdicts (pruned.rules.steady) on built snapshots: a verdict is carried over
only while its inputs are what they were, and every sweep's plan equals the one judged from
scratch. The node is test_classify's."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pruned.model import (
    Action,
    Decision,
    HeldBy,
    Job,
    JobView,
    Membership,
    Policy,
    ProcClass,
    Snapshot,
    SweepPlan,
    Verdict,
    WhitelistPolicy,
)
from pruned.rules.classify import classify
from pruned.rules.decide import decide
from pruned.rules.steady import Basis, VerdictMemo, carry, remember
from tests.unit.test_classify import FACTS, JOBS, NOW, SNAP, P

POLICY = Policy()


@dataclass(frozen=True)
class Carried:
    """What a sweep took from the memo: verdicts, and decisions (the very same objects)."""

    verdicts: dict[int, Verdict]
    decisions: dict[int, Decision]


def judge(memo: VerdictMemo, snap: Snapshot, jobs: JobView = JOBS, policy: Policy = POLICY,
          facts=FACTS) -> tuple[SweepPlan, Carried]:  # fmt: skip
    """One sweep as sweep.observe makes it with the memo: carry, classify, decide, remember."""
    basis = Basis(policy, facts, None)  # type: ignore[arg-type]
    before = dict(memo.decisions)
    c = carry(memo, snap.procs, jobs, basis)
    verdicts = classify(snap, jobs, policy, facts, known=c.verdict if c else None)
    plan = decide(snap, verdicts, jobs, policy, known=memo.decisions)
    remember(memo, basis, plan, snap.procs, jobs, c)
    carried = {pid: v for pid, v in verdicts.items() if c is not None and pid not in c.judged}
    # The safety property: whatever was carried, the plan is the one judged from scratch.
    assert plan == fresh(snap, jobs, policy, facts)
    kept = {d.proc.pid: d for d in plan.decisions if before.get(d.proc.pid) is d}
    assert all(d.verdict.cls is not ProcClass.STRAY for d in kept.values())
    return plan, Carried(carried, kept)


def fresh(snap: Snapshot, jobs: JobView = JOBS, policy: Policy = POLICY, facts=FACTS) -> SweepPlan:
    return decide(snap, classify(snap, jobs, policy, facts), jobs, policy)


def with_procs(snap: Snapshot, *procs, drop: tuple[int, ...] = (), at: float = NOW) -> Snapshot:
    """The same snapshot (the very same Proc objects) with some records replaced or gone."""
    out = {pid: p for pid, p in snap.procs.items() if pid not in drop}
    out.update({p.pid: p for p in procs})
    return replace(snap, procs=out, taken_at=at)


def decision(plan: SweepPlan, pid: int):
    return next(d for d in plan.decisions if d.proc.pid == pid)


def test_an_unchanged_sweep_carries_every_verdict_and_every_non_stray_decision() -> None:
    memo = VerdictMemo()
    first, carried = judge(memo, SNAP)
    assert carried.verdicts == {}  # nothing to carry yet
    _, carried = judge(memo, with_procs(SNAP))
    assert set(carried.verdicts) == set(SNAP.procs)
    strays = {d.proc.pid for d in first.decisions if d.verdict.cls is ProcClass.STRAY}
    assert set(carried.decisions) == set(SNAP.procs) - strays
    for pid, d in carried.decisions.items():
        assert d is decision(first, pid)  # the same object, not a rebuilt one


def test_a_job_that_ends_turns_its_processes_stray_at_once() -> None:
    memo = VerdictMemo()
    judge(memo, SNAP)
    ended = replace(JOBS, jobs={**JOBS.jobs, "9": replace(JOBS.jobs["9"], running=False,
                                                            why_not_running="gone")})
    plan, carried = judge(memo, with_procs(SNAP), ended)
    for pid in (511, 512, 513):  # batch before, in job 9's cgroup: judged again
        assert pid not in carried.verdicts
    # the double-forked daemon has no slurmstepd above it to keep it
    assert decision(plan, 513).verdict.rule == "stray.ended_job"
    assert decision(plan, 513).action is Action.KILL
    assert decision(plan, 512).verdict.rule == "batch.daemon_lineage"
    assert 700 in carried.verdicts  # not in any job: its verdict still holds


def test_a_job_that_starts_takes_its_processes_in() -> None:
    memo = VerdictMemo()
    judge(memo, SNAP)
    m = Membership("11", "batch", "freezer:/slurm_vm/uid_1008/job_11/step_batch")
    started = replace(JOBS, jobs={**JOBS.jobs, "11": Job("11", 1008, NOW - 5, "slurm", True)},
                      membership={**JOBS.membership, 700: m, 701: m})
    plan, carried = judge(memo, with_procs(SNAP), started)
    assert 700 not in carried.verdicts and 701 not in carried.verdicts
    assert decision(plan, 701).verdict.rule == "batch.job_cgroup"


def test_a_membership_compared_by_value_across_views() -> None:
    """Each job view builds new Membership objects: equal ones still carry."""
    memo = VerdictMemo()
    judge(memo, SNAP)
    rebuilt = replace(JOBS, jobs=dict(JOBS.jobs), membership={
        pid: replace(m) for pid, m in JOBS.membership.items()})
    _, carried = judge(memo, with_procs(SNAP), rebuilt)
    assert set(carried.verdicts) == set(SNAP.procs)
    moved = replace(rebuilt, membership={**rebuilt.membership, 512: Membership(
        "9", "0", "freezer:/slurm_vm/uid_1007/job_9/step_0")})
    _, carried = judge(memo, with_procs(SNAP), moved)
    assert 512 not in carried.verdicts and 511 in carried.verdicts


def test_a_stray_younger_than_min_age_is_judged_again_when_it_comes_of_age() -> None:
    """min_age is time: the same record, no event, and yet the decision changes."""
    memo = VerdictMemo()
    plan, _ = judge(memo, SNAP)
    young = decision(plan, 901)
    assert young.action is Action.KILL and young.held_by is HeldBy.YOUNG
    later, carried = judge(memo, with_procs(SNAP, at=NOW + POLICY.min_age))
    assert 901 in carried.verdicts and 901 not in carried.decisions
    grown = decision(later, 901)
    assert grown.action is Action.KILL and grown.held is None


def test_an_ancestor_that_changes_rejudges_its_whole_subtree() -> None:
    """bob's sshd [priv] 620 replaced by another binary (a new record): bob's session under
    it is judged again, though its own records are the very same objects, and is now in the
    ssh session of the listener 600 above it; then the listener too: a stray."""
    memo = VerdictMemo()
    judge(memo, SNAP)
    fake = P(620, 600, 0, "sshd", "/usr/local/bin/not-sshd")
    plan, carried = judge(memo, with_procs(SNAP, fake))
    for pid in (620, 621, 622):
        assert pid not in carried.verdicts, pid
    assert decision(plan, 622).verdict.decider == 600
    assert 612 in carried.verdicts and 512 in carried.verdicts  # other branches of the tree
    plan, carried = judge(memo, with_procs(SNAP, fake, P(600, 1, 0, "sshd", "/usr/bin/nc")))
    for pid in (600, 601, 602, 603, 610, 611, 612, 620, 621, 622):
        assert pid not in carried.verdicts, pid
    assert decision(plan, 622).verdict.cls is ProcClass.STRAY


def test_a_parent_that_exited_rejudges_its_children() -> None:
    """bob_stray 700 exits; its child 701 is read before the kernel reparented it (the same
    record, ppid 700 still): its chain ended somewhere else last time, so it is judged again."""
    memo = VerdictMemo()
    judge(memo, SNAP)
    _, carried = judge(memo, with_procs(SNAP, drop=(700,)))
    assert 701 not in carried.verdicts
    # An orphan whose parent was never there is stable: its chain ended there both times.
    orphan = P(990, 4242, 1008, "orphan", "/usr/bin/sleep")
    snap = with_procs(SNAP, orphan)
    judge(memo, snap)
    _, carried = judge(memo, with_procs(snap))
    assert 990 in carried.verdicts


def test_a_root_process_read_again_into_an_equal_record_keeps_its_verdict() -> None:
    """Root-owned processes are re-read every sweep: equal records (the run state aside)
    carry the verdict, and the decision is made again for the new record."""
    memo = VerdictMemo()
    judge(memo, SNAP)
    again = replace(SNAP.procs[510], state="R")  # slurmstepd of 9.batch, now running
    plan, carried = judge(memo, with_procs(SNAP, again))
    assert 510 in carried.verdicts and 510 not in carried.decisions
    assert decision(plan, 510).proc is again
    assert 512 in carried.decisions  # its subtree carries: nothing it is judged by changed
    dead = replace(SNAP.procs[510], state="Z")  # no longer a genuine root daemon
    _, carried = judge(memo, with_procs(SNAP, dead))
    assert 510 not in carried.verdicts and 512 not in carried.verdicts


def test_a_reused_pid_is_judged_as_the_new_process_it_is() -> None:
    memo = VerdictMemo()
    judge(memo, SNAP)
    reused = P(612, 611, 1008, "other", "/usr/bin/sleep", age=2.0)
    plan, carried = judge(memo, with_procs(SNAP, reused))
    assert 612 not in carried.verdicts and decision(plan, 612).proc is reused


def test_a_policy_or_facts_change_carries_nothing() -> None:
    memo = VerdictMemo()
    judge(memo, SNAP)
    wl = replace(POLICY, whitelist=WhitelistPolicy(sshd=False))
    plan, carried = judge(memo, with_procs(SNAP), policy=wl)
    assert carried.verdicts == {}
    assert decision(plan, 622).verdict.cls is ProcClass.STRAY  # no sshd whitelist now
    _, carried = judge(memo, with_procs(SNAP), policy=wl, facts=replace(FACTS,
                       whitelist_uids=frozenset()))  # fmt: skip
    assert carried.verdicts == {}


def test_the_memo_forgets_processes_that_are_gone() -> None:
    memo = VerdictMemo()
    judge(memo, SNAP)
    judge(memo, with_procs(SNAP, drop=(700, 701, 710)))
    assert not {700, 701, 710} & memo.decisions.keys()
    assert 710 not in memo.members
    assert set(memo.decisions) == set(SNAP.procs) - {700, 701, 710}


def test_live_keys_name_exactly_the_snapshot_processes() -> None:
    """What the adopt-failure and survivor memories keep: a reused pid is not the same key."""
    from pruned.model import ProcKey
    from pruned.sweep import LiveKeys

    keys = LiveKeys(SNAP.procs)
    p = SNAP.procs[700]
    assert p.key in keys and ProcKey(700, p.starttime + 1) not in keys
    assert ProcKey(4242, 1) not in keys and "700" not in keys
    assert set(keys) == {q.key for q in SNAP.procs.values()} and len(keys) == len(SNAP.procs)


def test_the_reactors_seeded_children_take_new_children_and_give_them_back() -> None:
    """The seeded map holds tuples; an event's child turns that entry into a set."""
    from pruned.reactor import add_child

    children: dict = {1: (10, 11), 5: {50}}
    add_child(children, 1, 12)
    add_child(children, 1, 10)  # already there
    add_child(children, 5, 51)
    add_child(children, 7, 70)
    assert children == {1: {10, 11, 12}, 5: {50, 51}, 7: {70}}
    pids: set[int] = set()
    pids.update(children.pop(1, ()))
    pids.update(children.pop(99, ()))
    assert pids == {10, 11, 12}
