"""Age by lineage (pure: rules.lineage.trace, decide's min_age branch) and its memory
(pruned.lineage), on built snapshots; adopt_failure in decide."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pruned.act.adopt import AdoptFailures
from pruned.lineage import LineageMemory
from pruned.model import (
    Action,
    HeldBy,
    Job,
    JobView,
    Policy,
    Proc,
    ProcClass,
    ProcKey,
    Snapshot,
    Verdict,
)
from pruned.rules.decide import decide
from pruned.rules.lineage import Group, GroupMemo, trace

BOB, CAROL = 30001, 30002
T0 = 1_000_000.0
POLICY = Policy(dry_run=False, min_age=10.0)

STRAY = Verdict(ProcClass.STRAY, "stray.default", "no job")
WHITE = Verdict(ProcClass.WHITELISTED, "whitelist.user", "admin")
ADOPTED = Verdict(ProcClass.ADOPTED, "adopted.extern", "in job 9's extern step", job_id="9")
SYSTEM = Verdict(ProcClass.SYSTEM, "system.uid_rail", "root")


def P(pid: int, ppid: int, uid: int, *, age: float, now: float, sid: int, pgid: int = 0,
      comm: str = "sh") -> Proc:  # fmt: skip
    """A process started `age` seconds before `now` (boot time 0, 100 ticks a second)."""
    return Proc(pid=pid, starttime=int((now - age) * 100), ppid=ppid, uid=uid, comm=comm,
                state="S", sid=sid, pgid=pgid or sid)  # fmt: skip


def snap(now: float, *procs: Proc) -> Snapshot:
    return Snapshot({p.pid: p for p in procs}, taken_at=now, boot_time=0.0, clk_tck=100)


def plan_of(s: Snapshot, verdicts: dict[int, Verdict], marks, **kw):
    return {d.proc.pid: d for d in decide(s, verdicts, JobView({}, {}), kw.pop("policy", POLICY),
                                          lineage=marks, **kw).decisions}  # fmt: skip


def test_reforker_session_is_remembered_across_sweeps() -> None:
    """gen1 is young at the first sweep, gen2 (its grandchild, reparented) at the second:
    without memory both are held; with it the second is judged with the session."""
    mem = LineageMemory()
    s1 = snap(T0, P(1, 0, 0, age=9e3, now=T0, sid=1), P(100, 1, BOB, age=2, now=T0, sid=90))
    v1 = {1: SYSTEM, 100: STRAY}
    assert mem.observe(s1, v1, full=True) == {}
    assert plan_of(s1, v1, {})[100].held_by is HeldBy.YOUNG
    t = T0 + 60
    s2 = snap(t, P(1, 0, 0, age=9e3, now=t, sid=1), P(200, 1, BOB, age=1, now=t, sid=90))
    v2 = {1: SYSTEM, 200: STRAY}
    assert plan_of(s2, v2, trace(s2, v2, {}, {})[0])[200].held_by is HeldBy.YOUNG  # no memory
    marks = mem.observe(s2, v2, full=True)
    assert marks[200].rule == "lineage.session" and marks[200].since == pytest.approx(T0 - 2)
    d = plan_of(s2, v2, marks)[200]
    assert d.held is None and d.action is Action.KILL
    assert d.lineage_group == ("session", 90, pytest.approx(T0 - 2))  # acting follows it
    assert "lineage.session: young (1.0s), but its session 90 of uid 30001" in d.reason
    assert "first stray there: pid 100 (sh)" in d.verdict.evidence[-1]


def test_new_session_of_the_same_uid_is_still_held() -> None:
    mem = LineageMemory()
    t = T0 + 60
    mem.observe(snap(T0, P(100, 1, BOB, age=2, now=T0, sid=90)), {100: STRAY}, full=True)
    # a new login: its own session 300, led by its own (young, stray) shell
    s = snap(t, P(200, 1, BOB, age=1, now=t, sid=90), P(300, 1, BOB, age=1, now=t, sid=300),
             P(301, 300, BOB, age=0.5, now=t, sid=300))  # fmt: skip
    v = {200: STRAY, 300: STRAY, 301: STRAY}
    d = plan_of(s, v, mem.observe(s, v, full=True))
    assert d[200].held is None
    assert d[300].held_by is HeldBy.YOUNG and d[301].held_by is HeldBy.YOUNG


def test_lineage_younger_than_min_age_is_held() -> None:
    """A login racing pam_slurm_adopt: its session is only 3 s old, so min_age still holds."""
    s = snap(T0, P(90, 1, BOB, age=3, now=T0, sid=90), P(91, 90, BOB, age=1, now=T0, sid=90))
    v = {90: STRAY, 91: STRAY}
    marks = trace(s, v, {}, {})[0]
    assert marks[91].since == pytest.approx(T0 - 3)
    assert plan_of(s, v, marks)[91].held_by is HeldBy.YOUNG


def test_session_with_an_old_stray_in_the_same_picture() -> None:
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=40), P(60, 1, BOB, age=1, now=T0, sid=40))
    v = {50: STRAY, 60: STRAY}
    marks = trace(s, v, {}, {})[0]
    assert marks[60].rule == "lineage.session" and "pid 50" in marks[60].what
    assert plan_of(s, v, marks)[60].held is None


def test_parent_chain_survives_setsid() -> None:
    """A child that made its own session is still judged with its old stray parent."""
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=50), P(60, 50, BOB, age=1, now=T0, sid=60))
    v = {50: STRAY, 60: STRAY}
    marks = trace(s, v, {}, {})[0]
    assert marks[60].rule == "lineage.parent" and "parent 50" in marks[60].what
    # ... and the event path remembers it by (pid, starttime): its child, seen with it
    mem = LineageMemory()
    mem.observe(s, v, full=False)
    s2 = snap(T0 + 1, P(60, 1, BOB, age=2, now=T0 + 1, sid=60),
              P(70, 60, BOB, age=0.1, now=T0 + 1, sid=70))  # fmt: skip
    marks2 = mem.observe(s2, {60: STRAY, 70: STRAY}, full=False)
    assert marks2[70].since == pytest.approx(T0 - 500)


def test_parent_of_another_uid_is_no_lineage() -> None:
    s = snap(T0, P(50, 1, CAROL, age=500, now=T0, sid=50), P(60, 50, BOB, age=1, now=T0, sid=60))
    assert trace(s, {50: STRAY, 60: STRAY}, {}, {})[0] == {}


def test_session_led_by_a_whitelisted_admin_is_no_lineage() -> None:
    """carol's shell (whitelisted) runs bob's commands: an old one does not doom a new one."""
    s = snap(T0, P(40, 1, CAROL, age=900, now=T0, sid=40), P(50, 40, BOB, age=500, now=T0, sid=40),
             P(60, 40, BOB, age=1, now=T0, sid=40))  # fmt: skip
    v = {40: WHITE, 50: STRAY, 60: STRAY}
    mem = LineageMemory()
    marks = mem.observe(s, v, full=True)
    assert 60 not in marks and plan_of(s, v, marks)[60].held_by is HeldBy.YOUNG
    assert not any(g.kind == "session" for g in mem.groups)


def test_session_with_an_adopted_member_is_forgotten() -> None:
    """Once part of a session is adopted into a job, the session is not a stray lineage."""
    mem = LineageMemory()
    mem.observe(snap(T0, P(100, 1, BOB, age=2, now=T0, sid=90)), {100: STRAY}, full=True)
    t = T0 + 60
    s = snap(t, P(150, 1, BOB, age=30, now=t, sid=90), P(200, 1, BOB, age=1, now=t, sid=90))
    v = {150: ADOPTED, 200: STRAY}
    marks = mem.observe(s, v, full=True)
    assert 200 not in marks and Group("session", BOB, 90) not in mem.groups


def test_reused_session_id_is_a_new_session() -> None:
    """The remembered session 90 had no live leader; now pid 90 leads a session again: the
    old one emptied and the id was reused (a new `setsid`), so it is not that lineage."""
    memo = GroupMemo(T0 - 100, None, "pid 100 (sh)", T0)
    t = T0 + 5
    s = snap(t, P(90, 1, BOB, age=1, now=t, sid=90), P(91, 90, BOB, age=0.5, now=t, sid=90))
    marks, upd = trace(s, {90: STRAY, 91: STRAY}, {}, {Group("session", BOB, 90): memo})
    assert all(m.since >= t - 1.01 for m in marks.values())  # no older than its own leader
    assert upd.groups[Group("session", BOB, 90)].since == pytest.approx(t - 1)
    # a remembered live leader, now a different process with that pid: the same
    leader = ProcKey(90, 12345)
    memo = GroupMemo(T0 - 100, leader, "pid 90 (sh)", T0)
    marks = trace(s, {90: STRAY, 91: STRAY}, {}, {Group("session", BOB, 90): memo})[0]
    assert all(m.since >= t - 1.01 for m in marks.values())


def test_session_of_a_system_process_is_no_lineage() -> None:
    """A user process in a session whose leader (pid == sid) is a root process."""
    s = snap(T0, P(40, 1, 0, age=900, now=T0, sid=40), P(50, 40, BOB, age=500, now=T0, sid=40),
             P(60, 40, BOB, age=1, now=T0, sid=40))  # fmt: skip
    assert 60 not in trace(s, {40: SYSTEM, 50: STRAY, 60: STRAY}, {}, {})[0]
    # session 1 (init's) and 0 never count, even with the leader gone from the picture
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=1), P(60, 1, BOB, age=1, now=T0, sid=1))
    assert trace(s, {50: STRAY, 60: STRAY}, {}, {})[0] == {}


def test_rails_and_scope_still_come_first() -> None:
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=40), P(60, 1, BOB, age=1, now=T0, sid=40))
    v = {50: STRAY, 60: STRAY}
    d = plan_of(s, v, trace(s, v, {}, {})[0], uids={CAROL})
    assert d[60].held_by is HeldBy.SCOPE


def test_memory_forgets_what_a_full_snapshot_lacks_and_is_bounded() -> None:
    mem = LineageMemory(max_keys=3, max_groups=4)
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=40),
             *(P(60 + i, 50, BOB, age=1, now=T0, sid=40) for i in range(6)))  # fmt: skip
    v = {p: STRAY for p in s.procs}
    mem.observe(s, v, full=False)
    assert len(mem.keys) == 3 and len(mem.groups) <= 4
    mem.observe(snap(T0 + 60, P(1, 0, 0, age=9e3, now=T0 + 60, sid=1)), {1: SYSTEM}, full=True)
    assert len(mem) == 0


def test_adopt_failure_is_applied_instead_of_a_retry() -> None:
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=50))
    jobs = JobView({"9": Job("9", BOB, T0 - 900, "slurm", True, extern_dirs=("/x",))}, {})
    v = {50: STRAY}
    adopt = replace(POLICY, stray_action=Action.ADOPT)
    d = decide(s, v, jobs, adopt).decisions[0]
    assert d.action is Action.ADOPT and d.target_job == "9"
    failures = AdoptFailures()
    failures.remember(s.procs[50].key, "write refused: No space left on device")
    ignore = decide(s, v, jobs, adopt, adopt_failed=failures.view()).decisions[0]
    assert ignore.action is Action.IGNORE and "not retried" in ignore.reason
    assert "No space left on device" in ignore.reason
    kill = replace(adopt, adopt_failure=Action.KILL)
    d = decide(s, v, jobs, kill, adopt_failed=failures.view()).decisions[0]
    assert d.action is Action.KILL and d.target_job is None and d.held is None
    # another process with that pid (reused) is adopted as usual
    other = snap(T0, replace(s.procs[50], starttime=s.procs[50].starttime + 7))
    assert decide(other, v, jobs, adopt, adopt_failed=failures.view()).decisions[0].action \
        is Action.ADOPT
    failures.prune(set())
    assert failures.view() == {}


def test_fork_events_link_a_child_to_its_exited_stray_forker() -> None:
    """The event path: gen1 was seen; it forked a child (which forked gen3) and both exited
    before gen3 was read; gen3 made its own session. Only the fork events link them."""
    from pruned.linux.cnproto import ProcEvent
    from pruned.linux.connector import EventBatcher

    def ev(what: str, pid: int, parent: int) -> ProcEvent:
        return ProcEvent(what, pid, pid, parent, parent, None, None, 0, None)

    b = EventBatcher(delay=0.0)
    b.feed([ev("fork", 101, 100), ev("fork", 102, 101), ev("exit", 101, 0)], now=0.0)
    assert b.due(0.0) == ({102}, {101}) and b.batch_parents == {101: 100, 102: 101}
    mem = LineageMemory()
    s1 = snap(T0, P(100, 1, BOB, age=30, now=T0, sid=100))
    mem.observe(s1, {100: STRAY}, full=False)
    t = T0 + 1
    s2 = snap(t, P(102, 1, BOB, age=0.2, now=t, sid=102))
    marks = mem.observe(s2, {102: STRAY}, full=False, parents=b.batch_parents)
    assert marks[102].rule == "lineage.parent" and marks[102].since == pytest.approx(T0 - 30)
    assert "which forked it and exited" in marks[102].what
    # another uid's child, or a forker forgotten on its exit event, is no lineage
    s3 = snap(t, P(102, 1, CAROL, age=0.2, now=t, sid=102))
    assert mem.observe(s3, {102: STRAY}, full=False, parents=b.batch_parents) == {}
    mem.forget([100])
    s4 = snap(t, P(103, 1, BOB, age=0.2, now=t, sid=103))
    assert mem.observe(s4, {103: STRAY}, full=False, parents={103: 100}) == {}


def test_a_remembered_mark_keeps_its_age_but_not_a_group_gone_bad() -> None:
    """p was judged by session 40's lineage; a whitelisted process has joined session 40
    since: p stays of that lineage, but acting no longer follows the session."""
    s = snap(T0, P(50, 1, BOB, age=500, now=T0, sid=40), P(60, 1, BOB, age=1, now=T0, sid=40))
    mem = LineageMemory()
    assert mem.observe(s, {50: STRAY, 60: STRAY}, full=True)[60].group is not None
    t = T0 + 2
    s2 = snap(t, P(60, 1, BOB, age=3, now=t, sid=40), P(70, 1, BOB, age=1, now=t, sid=40))
    marks = mem.observe(s2, {60: STRAY, 70: WHITE}, full=True)
    assert marks[60].since == pytest.approx(T0 - 500) and marks[60].group is None
    d = plan_of(s2, {60: STRAY, 70: WHITE}, marks)[60]
    assert d.held is None and d.lineage_group is None
