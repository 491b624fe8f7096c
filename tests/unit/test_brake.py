"""The mass-kill brake (rules.decide.apply_brake): it counts uids, not processes. Pure."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pruned.model import Action, Decision, HeldBy, Policy, ProcClass, SweepPlan, Verdict
from pruned.rules.classify import classify
from pruned.rules.decide import apply_brake, decide, held
from tests.unit.test_classify import BOB, FACTS, JOBS, SNAP, P

STRAY = Verdict(ProcClass.STRAY, "stray.default", "no job")
POLICY = Policy(brake_max_uids=3)


def kill(pid: int, uid: int, ppid: int = 1, job: str | None = None) -> Decision:
    verdict = STRAY if job is None else Verdict(ProcClass.STRAY, "stray.ended_job", "ended",
                                                job_id=job)  # fmt: skip
    return Decision(P(pid, ppid, uid, f"p{pid}"), verdict, Action.KILL, "policy: strays are killed")


def free(plan: SweepPlan) -> list[Decision]:
    return [d for d in plan.decisions if d.action is Action.KILL and d.held is None]


def test_a_fork_bomb_of_one_uid_is_one_target() -> None:
    bomb = [kill(1000, 2001), *(kill(1001 + i, 2001, ppid=1000 + i) for i in range(400))]
    plan = apply_brake(SweepPlan(tuple(bomb)), Policy(brake_max_uids=1))
    assert plan.brake is None and len(free(plan)) == 401


def test_one_uids_many_strays_do_not_hold_another_uids_kill() -> None:
    many = [kill(1000 + i, 2001) for i in range(60)]  # more than the old 50 per sweep
    plan = apply_brake(SweepPlan((*many, kill(5000, 2002))), Policy(brake_max_uids=2))
    assert plan.brake is None and len(free(plan)) == 61


@pytest.mark.parametrize(("uids", "trips"), [(1, False), (3, False), (4, True), (40, True)])
def test_trips_only_above_max_uids(uids: int, trips: bool) -> None:
    plan = apply_brake(SweepPlan(tuple(kill(1000 + u, 2000 + u) for u in range(uids))), POLICY)
    assert (plan.brake is not None) is trips
    assert len(free(plan)) == (0 if trips else uids)


def test_a_tripped_brake_holds_every_kill_and_names_the_uids() -> None:
    ds = [kill(1000 + u, 2000 + u, job=f"{17 + u}") for u in range(4)]
    other = Decision(P(3000, 1, 2009, "adoptee"), STRAY, Action.ADOPT, "adopt", target_job="9")
    plan = apply_brake(SweepPlan((*ds, other)), POLICY)
    assert plan.brake == (
        "mass-kill brake: kills of 4 uids (2000, 2001, 2002, 2003), in jobs 17, 18, 19, 20 "
        "exceed kill.brake.max_uids=3; nothing was killed"
    )
    assert plan.brake_uids == (2000, 2001, 2002, 2003)
    assert plan.brake_jobs == ("17", "18", "19", "20")
    assert all(d.held_by is HeldBy.BRAKE and d.held == plan.brake for d in plan.decisions[:4])
    assert plan.decisions[4].held is None  # the brake is about kills: an adoption goes on


def test_already_held_kills_do_not_count() -> None:
    young = held(kill(1000, 2000), "younger than min_age", HeldBy.YOUNG)
    plan = apply_brake(SweepPlan((young, kill(1001, 2001))), Policy(brake_max_uids=1))
    assert plan.brake is None and plan.decisions[0].held_by is HeldBy.YOUNG


def test_a_long_uid_list_is_cut_in_the_message() -> None:
    plan = apply_brake(SweepPlan(tuple(kill(1000 + u, 2000 + u) for u in range(25))), POLICY)
    assert plan.brake is not None and "2009 and 15 more)" in plan.brake
    assert len(plan.brake_uids) == 25  # the plan itself keeps them all


def test_the_event_path_shares_the_window_of_the_last_sweep() -> None:
    """Uids the event path killed since the last full sweep count; the same uid again is
    free, a new one beyond the limit trips the brake for the whole batch."""
    pol = Policy(brake_max_uids=2)
    again = apply_brake(SweepPlan((kill(1000, 2001),)), pol, already={2001, 2002})
    assert again.brake is None
    second = apply_brake(SweepPlan((kill(1000, 2002),)), pol, already={2001})
    assert second.brake is None
    third = apply_brake(SweepPlan((kill(1000, 2001), kill(1001, 2003))), pol, already={2001, 2002})
    assert third.brake is not None and not free(third)
    assert "kills of 3 uids (2001, 2002, 2003; 2001, 2002 since the last full sweep)" in third.brake
    assert third.brake_uids == (2001, 2002, 2003)


def test_no_kills_never_trip_even_over_an_old_window() -> None:
    plan = apply_brake(SweepPlan(()), Policy(brake_max_uids=1), already={1, 2, 3})
    assert plan.brake is None


def test_decide_applies_it_last() -> None:
    """Through decide(): bob's strays in the shared snapshot are one uid; with a second
    user's stray and a limit of one, nothing is killed."""
    verdicts = classify(SNAP, JOBS, Policy(), FACTS)
    plan = decide(SNAP, verdicts, JOBS, Policy(brake_max_uids=1))
    assert plan.brake is None and {d.proc.uid for d in free(plan)} == {BOB}
    other = P(950, 1, BOB + 100, "other_stray")
    snap = replace(SNAP, procs={**SNAP.procs, 950: other})
    verdicts = classify(snap, JOBS, Policy(), FACTS)
    plan = decide(snap, verdicts, JOBS, Policy(brake_max_uids=1))
    assert plan.brake is not None and plan.brake_uids == (BOB, BOB + 100) and not free(plan)


def test_one_uids_kill_trees_merge_into_one_per_job() -> None:
    """sweep._merge_trees: a fork bomb reparented to init is one kill tree, not hundreds;
    trees in different jobs' cgroups stay apart (the kill's re-walk judges late members
    against its root's job)."""
    from pruned.sweep import _merge_trees

    ds = [kill(1000, 2001, ppid=1), kill(1001, 2001, ppid=1000), kill(1002, 2001, ppid=1),
          kill(1003, 2001, ppid=1, job="17"), kill(1004, 2001, ppid=1003, job="17")]
    ds[2] = replace(ds[2], proc=replace(ds[2].proc, starttime=ds[0].proc.starttime - 5))
    by_pid = {d.proc.pid: d for d in ds}
    roots = [by_pid[p].proc for p in (1000, 1002, 1003)]
    desc = {1000: [1001], 1002: [], 1003: [1004]}
    got_roots, got_desc = _merge_trees(roots, desc, by_pid)
    assert [r.pid for r in got_roots] == [1002, 1003]  # the oldest root leads the no-job tree
    assert sorted(got_desc[1002]) == [1000, 1001] and got_desc[1003] == [1004]
