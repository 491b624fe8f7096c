"""Table-driven classification and decision tests on built snapshots (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from pruned.model import (
    Action,
    Job,
    JobView,
    Membership,
    Policy,
    Proc,
    ProcClass,
    Snapshot,
    WhitelistPolicy,
)
from pruned.rules.classify import classify
from pruned.rules.decide import decide

ALICE, BOB, CAROL, SLURM = 1007, 1008, 1009, 64030
NOW = 1_000_000.0


@dataclass(frozen=True)
class F:
    system_ranges: tuple[tuple[int, int], ...] = ((100, 999), (60000, 64999), (65534, 65534))
    whitelist_uids: frozenset[int] = frozenset()


def P(pid, ppid, uid, comm, exe=None, *, exact=None, state="S", kthread=False, age=3600.0):
    """A built process; root-owned ones carry an exact uid (the snapshot reads their status)."""
    exact = (uid == 0) if exact is None else exact
    return Proc(
        pid=pid,
        starttime=int((NOW - age) * 100),
        ppid=ppid,
        uid=uid,
        comm=comm,
        state=state,
        kthread=kthread,
        euid=uid if exact else None,
        uid_exact=exact,
        exe=exe,
    )


# A node like the one in ../shared/harness.md: alice has job 9 (batch + srun step + ssh
# adopted into extern), bob has a stray and an ended job 10 whose processes linger, carol is a
# whitelisted admin on ssh, and users try to spoof daemon names.
PROCS = [
    P(1, 0, 0, "init", "/sbin/init"),
    P(2, 0, 0, "kthreadd", kthread=True),
    P(50, 2, 0, "kworker/0:1", kthread=True),
    P(300, 1, 102, "munged", "/usr/sbin/munged"),
    P(301, 1, SLURM, "slurmctld", "/usr/sbin/slurmctld"),
    P(400, 1, 0, "slurmd", "/usr/sbin/slurmd"),
    P(500, 1, 0, "slurmstepd", "/usr/sbin/slurmstepd"),  # 9.extern
    P(501, 500, 0, "sleep", "/usr/bin/sleep"),
    P(510, 1, 0, "slurmstepd", "/usr/sbin/slurmstepd"),  # 9.batch
    P(511, 510, ALICE, "slurm_script", "/usr/bin/bash"),
    P(512, 511, ALICE, "sleep", "/usr/bin/sleep"),
    P(513, 1, ALICE, "mydaemon", "/usr/bin/sleep"),  # double-forked, still in step_batch
    P(600, 1, 0, "sshd", "/usr/sbin/sshd"),  # listener
    P(601, 600, 0, "sshd", "/usr/sbin/sshd"),  # alice [priv], adopted
    P(602, 601, ALICE, "sshd", "/usr/sbin/sshd"),
    P(603, 602, ALICE, "bash", "/usr/bin/bash"),
    P(610, 600, 0, "sshd", "/usr/sbin/sshd"),  # carol [priv]
    P(611, 610, CAROL, "sshd", "/usr/sbin/sshd"),
    P(612, 611, CAROL, "vim", "/usr/bin/vim"),
    P(620, 600, 0, "sshd", "/usr/sbin/sshd"),  # bob [priv], action_no_jobs=ignore
    P(621, 620, BOB, "sshd", "/usr/sbin/sshd"),
    P(622, 621, BOB, "bash", "/usr/bin/bash"),
    P(700, 1, BOB, "bob_stray", "/usr/bin/sleep"),
    P(701, 700, BOB, "child", "/usr/bin/sleep"),
    P(710, 1, BOB, "leftover", "/usr/bin/sleep"),  # in ended job 10's cgroup
    # spoofing: a user process named like a daemon, a user copy of the daemon binary
    P(800, 1, BOB, "slurmstepd", "/home/bob/slurmstepd"),
    P(801, 800, BOB, "sleep", "/usr/bin/sleep"),
    P(802, 1, BOB, "slurmstepd", "/usr/sbin/slurmstepd"),  # user runs the real binary
    P(803, 802, BOB, "sleep", "/usr/bin/sleep"),
    P(804, 1, BOB, "sshd", "/usr/sbin/sshd"),  # user runs their own sshd
    P(805, 804, BOB, "bash", "/usr/bin/bash"),
    # a non-dumpable user process: /proc owner is root but status says bob (uid_exact)
    P(806, 1, BOB, "nodump", "/usr/bin/python3", exact=True),
    P(900, 1, BOB, "zomb", state="Z"),
    P(901, 1, BOB, "young", "/usr/bin/sleep", age=1.0),
    P(950, 1, 65534, "nobody_thing", "/usr/bin/sleep"),
    P(960, 1, 50, "lowuid", "/usr/bin/sleep"),
]

JOBS = JobView(
    jobs={
        "9": Job("9", ALICE, NOW - 500, "slurm", True),
        "10": Job("10", BOB, NOW - 900, "slurm", False, why_not_running="no live slurmstepd"),
    },
    membership={
        500: Membership("9", None, "freezer:/slurm_vm/uid_1007/job_9"),
        501: Membership("9", "extern", "freezer:/slurm_vm/uid_1007/job_9/step_extern"),
        511: Membership("9", "batch", "freezer:/slurm_vm/uid_1007/job_9/step_batch"),
        512: Membership("9", "batch", "freezer:/slurm_vm/uid_1007/job_9/step_batch"),
        513: Membership("9", "batch", "freezer:/slurm_vm/uid_1007/job_9/step_batch"),
        601: Membership("9", "extern", "freezer:/slurm_vm/uid_1007/job_9/step_extern"),
        602: Membership("9", "extern", "freezer:/slurm_vm/uid_1007/job_9/step_extern"),
        603: Membership("9", "extern", "freezer:/slurm_vm/uid_1007/job_9/step_extern"),
        710: Membership("10", "batch", "freezer:/slurm_vm/uid_1008/job_10/step_batch"),
    },
)

SNAP = Snapshot({p.pid: p for p in PROCS}, taken_at=NOW, boot_time=0.0, clk_tck=100)

EXPECTED = {
    1: ("system", "system.kernel"),
    2: ("system", "system.kernel"),
    50: ("system", "system.kernel"),
    300: ("system", "system.service_account"),
    301: ("system", "system.service_account"),
    400: ("system", "system.uid_rail"),
    501: ("system", "system.uid_rail"),
    511: ("batch", "batch.job_cgroup"),
    512: ("batch", "batch.job_cgroup"),
    513: ("batch", "batch.job_cgroup"),
    602: ("adopted", "adopted.extern"),
    603: ("adopted", "adopted.extern"),
    611: ("whitelisted", "whitelist.user"),
    612: ("whitelisted", "whitelist.user"),
    621: ("whitelisted", "whitelist.sshd"),
    622: ("whitelisted", "whitelist.sshd"),
    700: ("stray", "stray.default"),
    701: ("stray", "stray.default"),
    710: ("stray", "stray.ended_job"),
    800: ("stray", "stray.default"),
    801: ("stray", "stray.default"),
    802: ("stray", "stray.default"),
    803: ("stray", "stray.default"),
    804: ("stray", "stray.default"),
    805: ("stray", "stray.default"),
    806: ("stray", "stray.default"),
    900: ("stray", "stray.default"),
    901: ("stray", "stray.default"),
    950: ("system", "system.service_account"),
    960: ("system", "system.uid_rail"),
}

FACTS = F(whitelist_uids=frozenset({CAROL}))


@pytest.mark.parametrize("pid", sorted(EXPECTED))
def test_classify_table(pid: int) -> None:
    verdicts = classify(SNAP, JOBS, Policy(), FACTS)
    v = verdicts[pid]
    assert (v.cls.value, v.rule) == EXPECTED[pid], v.reason
    assert v.reason


def test_every_process_gets_exactly_one_class() -> None:
    verdicts = classify(SNAP, JOBS, Policy(), FACTS)
    assert set(verdicts) == set(SNAP.procs)
    assert all(isinstance(v.cls, ProcClass) for v in verdicts.values())


def test_batch_by_lineage_without_cgroups() -> None:
    """Batch systems without cgroups: descent from a root pbs_mom decides, not the name."""
    procs = [
        P(1, 0, 0, "init", "/sbin/init"),
        P(10, 1, 0, "pbs_mom", "/usr/sbin/pbs_mom"),
        P(11, 10, BOB, "bash", "/usr/bin/bash"),
        P(12, 11, BOB, "a.out", "/home/bob/a.out"),
        P(20, 1, BOB, "pbs_mom", "/home/bob/pbs_mom"),  # spoof: user-owned
        P(21, 20, BOB, "a.out", "/home/bob/a.out"),
        P(30, 1, 0, "pbs_mom", "/opt/pbs/23/sbin/pbs_mom"),  # root, same binary, versioned dir
        P(31, 30, BOB, "a.out", "/home/bob/a.out"),
        P(40, 1, 0, "pbs_mom", "/usr/sbin/not_mom"),  # root, named pbs_mom, another binary
        P(41, 40, BOB, "a.out", "/home/bob/a.out"),
    ]
    snap = Snapshot({p.pid: p for p in procs}, NOW, 0.0, 100)
    v = classify(snap, JobView({}, {}), Policy(), F())
    assert (v[11].cls, v[11].rule, v[11].decider) == (ProcClass.BATCH, "batch.daemon_lineage", 10)
    assert v[12].cls is ProcClass.BATCH
    assert v[21].cls is ProcClass.STRAY
    assert v[31].cls is ProcClass.BATCH  # a root process of that binary name: trusted
    assert v[41].cls is ProcClass.STRAY


def test_root_daemon_upgraded_in_place_still_counts() -> None:
    procs = [
        P(1, 0, 0, "init"),
        P(10, 1, 0, "pbs_mom", "/usr/sbin/pbs_mom (deleted)"),
        P(11, 10, BOB, "job", "/usr/bin/bash"),
    ]
    snap = Snapshot({p.pid: p for p in procs}, NOW, 0.0, 100)
    assert classify(snap, JobView({}, {}), Policy(), F())[11].cls is ProcClass.BATCH


def test_inexact_root_is_not_trusted() -> None:
    """A root-looking process whose status was not read is never a trusted daemon."""
    procs = [
        P(1, 0, 0, "init"),
        P(10, 1, 0, "pbs_mom", "/usr/sbin/pbs_mom", exact=False),
        P(11, 10, BOB, "job", "/usr/bin/bash"),
    ]
    snap = Snapshot({p.pid: p for p in procs}, NOW, 0.0, 100)
    assert classify(snap, JobView({}, {}), Policy(), F())[11].cls is ProcClass.STRAY


def test_sshd_session_in_ended_job_is_stray_and_whitelist_sshd_switch() -> None:
    jobs = JobView(
        {"10": Job("10", BOB, NOW, "slurm", False)},
        {621: Membership("10", "extern", "freezer:/slurm_vm/uid_1008/job_10/step_extern")},
    )
    v = classify(SNAP, jobs, Policy(), FACTS)
    assert v[621].rule == "stray.ended_job"
    assert v[622].rule == "whitelist.sshd"  # not in the stale cgroup
    off = Policy(whitelist=WhitelistPolicy(sshd=False))
    assert classify(SNAP, JOBS, off, FACTS)[622].cls is ProcClass.STRAY


def test_whitelist_exe() -> None:
    pol = Policy(whitelist=WhitelistPolicy(exe=("/usr/bin/vim",)))
    host = replace(SNAP.procs[612], exe_host=True)  # the host's /usr/bin/vim (same inode)
    snap = replace(SNAP, procs={**SNAP.procs, 612: host})
    v = classify(snap, JOBS, pol, F())
    assert (v[612].cls, v[612].rule) == (ProcClass.WHITELISTED, "whitelist.exe")
    # The same path, not verified to be the host's file (a user's mount namespace): no.
    assert classify(SNAP, JOBS, pol, F())[612].rule != "whitelist.exe"


def test_deep_chain_is_not_recursive() -> None:
    procs = [P(1, 0, 0, "init")] + [P(i, i - 1, BOB, "x") for i in range(2, 20002)]
    procs[1] = P(2, 1, 0, "pbs_mom", "/usr/sbin/pbs_mom")
    snap = Snapshot({p.pid: p for p in procs}, NOW, 0.0, 100)
    v = classify(snap, JobView({}, {}), Policy(), F())
    assert v[20001].cls is ProcClass.BATCH


def test_ppid_cycle_terminates() -> None:
    procs = [P(10, 11, BOB, "a"), P(11, 10, BOB, "b")]
    snap = Snapshot({p.pid: p for p in procs}, NOW, 0.0, 100)
    assert classify(snap, JobView({}, {}), Policy(), F())[10].cls is ProcClass.STRAY


# ---------------------------------------------------------------- decide


def _plan(policy: Policy, jobs: JobView = JOBS, **kw):
    verdicts = classify(SNAP, jobs, policy, FACTS)
    return {d.proc.pid: d for d in decide(SNAP, verdicts, jobs, policy, **kw).decisions}, verdicts


def test_only_strays_get_actions_and_rails_hold() -> None:
    plan, verdicts = _plan(Policy())
    for pid, d in plan.items():
        if verdicts[pid].cls is not ProcClass.STRAY:
            assert d.action is Action.IGNORE
    assert plan[700].action is Action.KILL and plan[700].held is None
    assert plan[900].held and "zombie" in plan[900].held
    assert plan[901].held and "min_age" in plan[901].held


def test_protected_pids_are_never_targets() -> None:
    plan, _ = _plan(Policy(), protected={700})
    assert plan[700].held and "pruned itself" in plan[700].held


def test_uid_scope() -> None:
    plan, _ = _plan(Policy(), uids={ALICE})
    assert all(d.held for d in plan.values() if d.action is not Action.IGNORE)


def test_adopt_newest_job_and_fallback() -> None:
    jobs = JobView(
        {
            "9": Job("9", BOB, NOW - 500, "slurm", True),
            "12": Job("12", BOB, NOW - 100, "slurm", True),
            "11": Job("11", BOB, NOW - 50, "slurm", False),
        },
        {},
    )
    pol = Policy(stray_action=Action.ADOPT)
    plan, _ = _plan(pol, jobs)
    assert (plan[700].action, plan[700].target_job) == (Action.ADOPT, "12")
    plan, _ = _plan(pol, JobView({}, {}))
    assert plan[700].action is Action.KILL and "fallback" in plan[700].reason
    pol = Policy(stray_action=Action.ADOPT, adopt_fallback=Action.IGNORE)
    plan, _ = _plan(pol, JobView({}, {}))
    assert plan[700].action is Action.IGNORE


def test_report_only_when_job_source_has_problems() -> None:
    jobs = replace(JOBS, problems=("slurmd is not running",))
    verdicts = classify(SNAP, jobs, Policy(), FACTS)
    sp = decide(SNAP, verdicts, jobs, Policy())
    assert sp.report_only == ("slurmd is not running",)
    assert not sp.actionable()
    assert all("report-only" in d.held for d in sp.reported() if d.held and d.proc.pid == 700)


@pytest.mark.parametrize(
    ("exe", "expected"),
    [
        ("/usr/sbin/slurmstepd", True),
        ("/usr/sbin/slurmstepd-wlm (deleted)", True),  # upgraded in place by the package
        ("/opt/slurm/23.11/sbin/slurmstepd", True),  # versioned install, `current` link moved
        ("/usr/sbin/slurmstepd-wlm", True),
        ("/usr/sbin/slurmd", False),
        ("/home/bob/slurmstepdx", False),
        (None, False),
    ],
)
def test_root_exe_matches(exe, expected) -> None:
    """For real-root processes only: a daemon is known by its path or its binary name."""
    from pruned.rules.trust import root_exe_matches

    paths = frozenset({"/usr/sbin/slurmstepd", "/usr/sbin/slurmstepd-wlm"})
    assert root_exe_matches(exe, paths) is expected


def test_a_cgroup_the_grammar_does_not_know_is_never_a_stray() -> None:
    line = "0::/system.slice/slurmstepd.scope/job_9/step_0/user/task_0/sub"
    jobs = replace(JOBS, membership={**JOBS.membership, 700: Membership("", None, line, understood=False)})  # noqa: E501
    v = classify(SNAP, jobs, Policy(), FACTS)
    assert (v[700].cls, v[700].rule) == (ProcClass.BATCH, "batch.unknown_cgroup")
    assert line in v[700].reason
    # its child is judged by its own cgroup: none, so still a stray (it is not in the doubt)
    assert v[701].cls is ProcClass.STRAY
    plan = decide(SNAP, v, jobs, Policy())
    assert next(d for d in plan.decisions if d.proc.pid == 700).action is Action.IGNORE


def test_a_sluid_membership_resolves_through_the_view_aliases() -> None:
    line = "0::/system.slice/slurmstepd.scope/s6T9M8T79NSN00/step_0/user/task_0"
    jobs = replace(
        JOBS,
        membership={**JOBS.membership, 700: Membership("s6T9M8T79NSN00", "0", line)},
        aliases={"s6T9M8T79NSN00": "9"},
    )
    v = classify(SNAP, jobs, Policy(), FACTS)
    assert (v[700].cls, v[700].rule, v[700].job_id) == (ProcClass.BATCH, "batch.job_cgroup", "9")
