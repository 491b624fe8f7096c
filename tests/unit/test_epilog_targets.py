"""rules.epilog: which processes the epilog of one job kills, on built snapshots (pure)."""

from __future__ import annotations

from dataclasses import replace

from pruned.model import HeldBy, Job, JobView, Membership, Observation, Policy
from pruned.rules.classify import classify
from pruned.rules.decide import decide
from pruned.rules.epilog import epilog_targets, job_ids_in_environ
from tests.unit.test_classify import ALICE, BOB, FACTS, JOBS, NOW, SNAP, P

POLICY = Policy()


def observe(jobs: JobView = JOBS, snap=SNAP) -> Observation:
    verdicts = classify(snap, jobs, POLICY, FACTS)
    return Observation(snap, jobs, verdicts, decide(snap, verdicts, jobs, POLICY))


def targets(obs: Observation, job: str, uid: int, env: dict[int, set[str]] | None = None):
    asked: list[int] = []

    def env_jobs(pid: int) -> set[str]:
        asked.append(pid)
        return (env or {}).get(pid, set())

    decisions, last, why = epilog_targets(obs, POLICY, job, uid, env_jobs=env_jobs)
    return {d.proc.pid: d for d in decisions}, last, why, asked


def test_last_job_of_the_uid_kills_all_its_strays_and_nothing_whitelisted() -> None:
    # bob's job 10 ended and he has no other: every stray of bob goes, his ssh session stays.
    got, last, why, _ = targets(observe(), "10", BOB)
    assert last and "last job" in why
    assert set(got) == {700, 701, 710, 800, 801, 802, 803, 804, 805, 806, 900, 901}
    assert 621 not in got and 622 not in got  # whitelist.sshd
    assert got[710].reason.startswith("epilog of job 10: in its cgroup")
    assert got[700].reason.endswith("stray of a uid whose last job ended (" + why + ")")


def test_rails_hold_inside_the_epilog() -> None:
    got, _, _, _ = targets(observe(), "10", BOB)
    assert got[900].held_by is HeldBy.RAIL and "zombie" in (got[900].held or "")
    assert got[700].held_by is None


def test_another_running_job_limits_the_epilog_to_this_job() -> None:
    jobs = replace(
        JOBS,
        jobs={**JOBS.jobs, "11": Job("11", BOB, NOW - 100, "slurm", True)},
        membership={**JOBS.membership, 805: Membership("11", "batch", "0::/x/job_11/step_0")},
    )
    got, last, why, asked = targets(observe(jobs), "10", BOB, env={700: {"10"}, 701: {"12"}})
    assert not last and why == "uid has other running jobs: 11"
    # its own cgroup member, and the stray whose environment names job 10; not job 11's
    assert set(got) == {700, 710}
    assert 805 not in got and 805 not in asked  # a batch process is never even asked about
    assert 701 in asked


def test_a_job_source_with_problems_never_counts_as_the_last_job() -> None:
    jobs = replace(JOBS, problems=("slurm: cannot read /sys/fs/cgroup",))
    got, last, why, _ = targets(observe(jobs), "10", BOB)
    assert not last and "problems" in why
    assert set(got) == {710}


def test_a_process_under_a_live_batch_daemon_means_another_job_runs() -> None:
    # proctrack/linuxproc: no cgroups; alice's task under a root slurmstepd is the only sign.
    procs = {**SNAP.procs, 520: P(520, 510, BOB, "task", "/usr/bin/sleep")}
    snap = replace(SNAP, procs=procs)
    got, last, why, _ = targets(observe(snap=snap), "10", BOB)
    assert not last and "batch daemon (pid 520)" in why
    assert 520 not in got


def test_other_users_are_never_targets() -> None:
    got, _, _, _ = targets(observe(), "9", ALICE)
    # alice's batch and adopted processes sit in job 9's own cgroups: the epilog of 9 kills them
    assert set(got) == {511, 512, 513, 602, 603}
    assert all(d.proc.uid == ALICE for d in got.values())


def test_job_ids_in_environ() -> None:
    env = b"HOME=/h\0SLURM_JOB_ID=17\0SLURM_JOBID=17\0PBS_JOBID=123[4].server\0X=SLURM_JOB_ID=9\0"
    assert job_ids_in_environ(env) == {"17", "123[4]", "123[4].server"}
    assert job_ids_in_environ(b"") == set()
    assert job_ids_in_environ(b"SLURM_JOB_ID=\0SLURM_JOB_ID") == set()
    got = job_ids_in_environ(b"SLURM_JOB_ID=\xff\xfe.batch")
    # lossless: the bytes come back, and a bad value never equals another bad one
    assert got == {"\udcff\udcfe", "\udcff\udcfe.batch"}
    assert job_ids_in_environ(b"SLURM_JOB_ID=\xfe\xff") != got


def test_epilog_records_name_the_job_also_for_strays_outside_it() -> None:
    # `journalctl PRUNED_JOB_ID=J` must show everything the epilog of J did (README): a stray
    # outside every job cgroup has no job of its own, so its record gets J; one in a job's
    # cgroup keeps the job its verdict names.
    from pruned.act.audit import ListSink
    from pruned.model import Outcome, Result, SweepPlan
    from pruned.sweep import SweepReport, audit_sweep

    obs = observe()
    got, _, _, _ = targets(obs, "10", BOB)
    report = SweepReport("epilog-10-x", NOW, 0.0, False, replace(obs, plan=SweepPlan(())),
                         [Outcome(got[700], Result.DONE), Outcome(got[710], Result.DONE)])
    sink = ListSink()
    audit_sweep(report, sink, job_id="10")
    jobs = {r.fields["PRUNED_PID"]: r.fields.get("PRUNED_JOB_ID") for r in sink.records
            if r.event == "process_killed"}
    assert jobs == {"700": "10", "710": got[710].verdict.job_id}
    assert got[700].verdict.job_id is None and got[710].verdict.job_id
    sink = ListSink()
    audit_sweep(report, sink)  # a daemon sweep is about no job
    assert [r.fields.get("PRUNED_JOB_ID") for r in sink.records
            if r.fields.get("PRUNED_PID") == "700"] == [None]
