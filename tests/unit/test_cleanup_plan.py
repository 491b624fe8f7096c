"""plan_cleanup is pure: tables of running/ended/live/system/young cases -> plan items."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pruned.model import CleanupPolicy, Job
from pruned.rules.cleanplan import JobDirItem, expand_pattern, plan_cleanup
from pruned.rules.trust import is_system_uid

NOW = 1_000_000.0
SYS = ((60000, 64999), (65534, 65534), (100, 999))
POLICY = CleanupPolicy(
    roots=("/tmp", "/dev/shm"),
    job_dirs=("/tmp/slurm-{job_id}", "/scratch/{user}/{job_id}", "/tmp/u{uid}"),
    job_container_base="/var/spool/slurm-jc",
    min_age=3600,
)


@dataclass(frozen=True)
class Rec:  # stands in for pruned.jobs.history.JobRecord
    job_id: str
    uid: int
    start: float
    end: float | None
    user: str | None = "alice"
    source: str = "slurm"


def running(job_id: str, uid: int | None) -> Job:
    return Job(job_id=job_id, uid=uid, start=NOW - 50, source="slurm", running=True)


def plan(ended, run=(), live=frozenset(), nodes=("vm",), policy=POLICY):
    return plan_cleanup(policy, list(run), list(ended), set(live), SYS, NOW, nodes)


# (case, ended, running, live uids) -> (job ids with dirs, uids with loose files)
CASES = [
    ("ended long ago, idle uid", [Rec("10", 5000, 0, NOW - 7200)], [], set(), {"10"}, {5000}),
    (
        # an end seen from outside may be a job between steps: its dirs wait min_age too
        "ended recently: dirs wait, loose no",
        [Rec("11", 5000, 0, NOW - 60)],
        [],
        set(),
        set(),
        set(),
    ),
    (
        "uid has another running job",
        [Rec("12", 5000, 0, NOW - 7200)],
        [running("13", 5000)],
        set(),
        {"12"},
        set(),
    ),
    ("uid has a live process", [Rec("14", 5000, 0, NOW - 7200)], [], {5000}, {"14"}, set()),
    (
        "same job id running again",
        [Rec("15", 5000, 0, NOW - 7200)],
        [running("15", 5000)],
        set(),
        set(),
        set(),
    ),
    ("system uid (login.defs range)", [Rec("16", 500, 0, NOW - 7200)], [], set(), set(), set()),
    ("system uid (rail)", [Rec("17", 42, 0, NOW - 7200)], [], set(), set(), set()),
    ("system uid (nobody)", [Rec("18", 65534, 0, NOW - 7200)], [], set(), set(), set()),
    ("job not ended", [Rec("19", 5000, 0, None)], [], set(), set(), set()),
    (
        "last job decides min_age",
        [Rec("20", 5000, 0, NOW - 7200), Rec("21", 5000, 0, NOW - 5)],
        [],
        set(),
        {"20"},
        set(),
    ),
    (
        "a job with unknown end holds loose files",
        [Rec("22", 5000, 0, NOW - 7200), Rec("23", 5000, 0, None)],
        [],
        set(),
        {"22"},
        set(),
    ),
    (
        "other uid's running job does not matter",
        [Rec("24", 5000, 0, NOW - 7200)],
        [running("25", 5001), running("26", None)],
        {5001},
        {"24"},
        {5000},
    ),
    ("no jobs at all: nothing", [], [], set(), set(), set()),
]


@pytest.mark.parametrize(
    ("case", "ended", "run", "live", "dirs", "loose"), CASES, ids=[c[0] for c in CASES]
)
def test_plan_table(case, ended, run, live, dirs, loose) -> None:
    p = plan(ended, run, live)
    assert {i.job_id for i in p.job_dirs} == dirs
    assert {i.uid for i in p.loose} == loose
    for item in p.loose:
        assert item.roots == POLICY.roots and item.reason
    if not dirs and any(r.end is not None for r in ended):
        assert p.held, "every held-back job or uid says why"


def test_paths_of_one_job() -> None:
    p = plan([Rec("30", 5000, 0, NOW - 7200, user="alice")])
    assert {(i.path, i.container) for i in p.job_dirs} == {
        ("/tmp/slurm-30", False),
        ("/scratch/alice/30", False),
        ("/tmp/u5000", False),
        ("/var/spool/slurm-jc/30", True),
        ("/var/spool/slurm-jc/vm/30", True),
    }
    assert all(isinstance(i, JobDirItem) and i.uid == 5000 for i in p.job_dirs)


def test_per_user_pattern_waits_for_an_idle_uid() -> None:
    # "/tmp/u{uid}" has no {job_id}: another job of the uid may still use it.
    p = plan([Rec("31", 5000, 0, NOW - 7200)], run=[running("32", 5000)])
    assert "/tmp/u5000" not in {i.path for i in p.job_dirs}
    assert "/tmp/slurm-31" in {i.path for i in p.job_dirs}
    assert any("per-user" in h for h in p.held)


@pytest.mark.parametrize("job_id", ["..", ".", "a/b", "../../etc", "", ".hidden", "x\0y"])
def test_hostile_job_ids_never_become_paths(job_id: str) -> None:
    p = plan([Rec(job_id, 5000, 0, NOW - 7200)])
    assert p.job_dirs == ()
    assert p.held


@pytest.mark.parametrize(
    ("user", "ok"), [("alice", True), ("..", False), ("a/b", False), (None, False)]
)
def test_user_in_patterns(user, ok) -> None:
    got = expand_pattern("/scratch/{user}/{job_id}", "9", 5000, user)
    assert (got == f"/scratch/{user}/9") if ok else got is None


def test_patterns_that_escape_or_stay_unfilled_are_refused() -> None:
    assert expand_pattern("relative/{job_id}", "9", 1, "a") is None
    assert expand_pattern("/{job_id}", "9", 1, "a") is None  # one component: a root itself
    assert expand_pattern("/tmp/{jobid}", "9", 1, "a") is None  # typo: braces left over
    assert expand_pattern("/tmp/../etc/{job_id}", "9", 1, "a") is None


def test_disabled_policy_and_no_loose_files() -> None:
    ended = [Rec("40", 5000, 0, NOW - 7200)]
    off = plan(ended, policy=CleanupPolicy(enabled=False))
    assert off.items == ()
    no_loose = plan(ended, policy=CleanupPolicy(loose_files=False))
    assert no_loose.loose == () and {i.path for i in no_loose.job_dirs} == {
        "/tmp/slurm-40",
        "/dev/shm/slurm-40",
    }


def test_unknown_uids_are_never_planned() -> None:
    # Files of a uid that never had a job here (service account, login-only user) stay.
    p = plan([Rec("50", 5000, 0, NOW - 7200)], live=set())
    assert {i.uid for i in p.loose} == {5000}


def test_system_ranges() -> None:
    assert is_system_uid(0, ()) and is_system_uid(98, ())
    assert not is_system_uid(99, ()) and is_system_uid(60001, SYS)
    assert not is_system_uid(30000, SYS)


def test_plan_carries_the_numbers_the_executor_needs() -> None:
    p = plan([Rec("60", 5000, 0, NOW - 7200)])
    assert (p.now, p.min_age, p.max_listed) == (NOW, 3600, 20)
    (item,) = p.loose
    assert item.last_job == "60" and item.last_end == NOW - 7200


def test_job_dirs_wait_for_the_grace_unless_the_epilog_says_the_job_ended() -> None:
    recent = [Rec("30", 5000, 0, NOW - 60)]
    p = plan(recent)
    assert p.job_dirs == ()
    assert "job 30: ended 60s ago; its dirs wait 3600s" in p.held
    epilog = plan_cleanup(POLICY, [], recent, set(), SYS, NOW, ("vm",), dir_grace=0.0)
    assert {i.job_id for i in epilog.job_dirs} == {"30"}
