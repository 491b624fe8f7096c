"""Steady-state verdicts (pruned.rules.steady) against judging from scratch: random process
trees, job views and policies, changed a little between sweeps the ways a node changes
(records re-read or replaced, processes gone or new, cgroup moves, jobs starting and ending,
time passing, the policy reloaded); after every sweep the plan made with the memo is the
one made without it."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from pruned.model import Job, JobView, Membership, Policy, Proc, Snapshot, WhitelistPolicy
from pruned.rules.steady import VerdictMemo
from tests.fuzz._settings import fuzz
from tests.unit.test_classify import FACTS, NOW, F
from tests.unit.test_steady import judge

EXES = (None, "/usr/sbin/sshd", "/usr/sbin/slurmstepd", "/usr/sbin/sshd", "/usr/bin/sleep")
UIDS = (0, 0, 0, 1007, 1008, 1009, 60001)
STATES = ("S", "S", "S", "R", "Z", "Zl")
FIELDS = (("exe", EXES), ("uid", UIDS), ("uid_exact", (True, False)), ("state", STATES),
          ("comm", ("a", "b")), ("ppid", (1, 10, 11, 12, 4242)), ("kthread", (True, False)))
LINES = {
    ("1", "batch"): "freezer:/slurm/uid_1007/job_1/step_batch",
    ("1", "extern"): "freezer:/slurm/uid_1007/job_1/step_extern",
    ("1", None): "freezer:/slurm/uid_1007/job_1",
    ("2", "batch"): "freezer:/slurm/uid_1008/job_2/step_batch",
    ("3", "0"): "freezer:/slurm/uid_1009/job_3/step_0",
}


def proc(draw, pid: int, parents: list[int]) -> Proc:
    uid = draw(st.sampled_from(UIDS))
    return Proc(
        pid=pid,
        starttime=int((NOW - draw(st.sampled_from((0.5, 5.0, 3600.0)))) * 100),
        ppid=draw(st.sampled_from([*parents, 1, 4242])),  # 4242: a parent never there
        uid=uid,
        comm=draw(st.sampled_from(("a", "b"))),
        state=draw(st.sampled_from(STATES)),
        euid=uid,
        uid_exact=uid == 0 or draw(st.booleans()),
        exe=draw(st.sampled_from(EXES)),
    )


def membership(draw) -> Membership | None:
    key = draw(st.sampled_from([None, None, None, None, *LINES]))
    if key is None:
        return None
    if draw(st.integers(0, 9)) == 0:
        return Membership("", None, "freezer:/slurm/weird", understood=False)
    return Membership(key[0], key[1], LINES[key])


def jobs_of(draw, members: dict[int, Membership]) -> dict[str, Job]:
    out = {}
    for job_id, uid in (("1", 1007), ("2", 1008), ("3", 1009)):
        if draw(st.integers(0, 3)):
            running = draw(st.booleans())
            out[job_id] = Job(job_id, uid, NOW - 100, "slurm", running,
                              why_not_running="" if running else "ended")  # fmt: skip
    return out


@fuzz(2.0)
@given(st.data())
def test_the_memo_never_changes_a_plan(data) -> None:
    draw = data.draw
    n = draw(st.integers(3, 25))
    procs: dict[int, Proc] = {1: Proc(1, 1, 0, 0, "init", "S", euid=0, uid_exact=True)}
    for pid in range(10, 10 + n):
        procs[pid] = proc(draw, pid, list(procs))
    members = {pid: m for pid in procs if (m := membership(draw)) is not None}
    jobs = JobView(jobs_of(draw, members), members)
    policy = Policy(min_age=10.0)
    facts: F = FACTS
    at = NOW
    memo = VerdictMemo()
    judge(memo, Snapshot(dict(procs), at, 0.0, 100), jobs, policy, facts)
    for _ in range(draw(st.integers(1, 6))):
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.sampled_from(("reread", "field", "replace", "drop", "new", "move",
                                       "job", "rebuild", "time", "policy", "facts", "exec",
                                       "exit")))  # fmt: skip
            pids = sorted(procs)
            pid = draw(st.sampled_from(pids))
            parents = sorted({p.ppid for p in procs.values() if p.ppid in procs} - {1})
            if op in ("exec", "exit") and parents:  # what its children's chains go through
                pid = draw(st.sampled_from(parents))
                if op == "exec":
                    procs[pid] = replace(procs[pid], exe=draw(st.sampled_from(EXES)))
                else:
                    del procs[pid]  # its children are read before they are reparented
            if op == "reread":  # root-owned processes are read into a new record each sweep
                procs[pid] = replace(procs[pid], state=draw(st.sampled_from(STATES)))
            elif op == "field" and pid != 1:  # one thing about it changed (an exec, a setuid)
                name, values = draw(st.sampled_from(FIELDS))
                procs[pid] = replace(procs[pid], **{name: draw(st.sampled_from(values))})
            elif op == "replace" and pid != 1:
                procs[pid] = proc(draw, pid, [p for p in pids if p != pid])
            elif op == "drop" and pid != 1:
                del procs[pid]
            elif op == "new":
                new = max(pids) + 1
                procs[new] = proc(draw, new, pids)
            elif op == "move":
                m = membership(draw)
                members = {k: v for k, v in jobs.membership.items() if k != pid}
                if m is not None:
                    members[pid] = m
                jobs = replace(jobs, membership=members)
            elif op == "job":
                jobs = replace(jobs, jobs=jobs_of(draw, dict(jobs.membership)))
            elif op == "rebuild":  # a new view: equal objects, not the same ones
                jobs = JobView({k: replace(j) for k, j in jobs.jobs.items()},
                               {k: replace(m) for k, m in jobs.membership.items()})  # fmt: skip
            elif op == "time":
                at += draw(st.sampled_from((1.0, 10.0, 100.0)))
            elif op == "policy":
                policy = replace(policy, whitelist=WhitelistPolicy(sshd=draw(st.booleans())),
                                 stray_action=draw(st.sampled_from(policy.stray_action.__class__)))
            elif op == "facts":
                facts = F(whitelist_uids=frozenset(draw(st.sets(st.sampled_from(UIDS)))))
        # judge() asserts the plan equals the one judged from scratch
        judge(memo, Snapshot(dict(procs), at, 0.0, 100), jobs, policy, facts)
