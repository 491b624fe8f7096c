"""rules.decide.recheck: the last look before acting, judged on a fresh full read (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pruned.model import Action, Decision, Job, JobView, ProcClass, Result, Verdict
from pruned.rules.decide import recheck
from tests.unit.test_classify import BOB, NOW, P

OLD = P(700, 1, BOB, "bob_stray", "/usr/bin/sleep")
D = Decision(OLD, Verdict(ProcClass.STRAY, "stray.default", "x"), Action.KILL, "policy")
JOBS = JobView(
    jobs={
        "9": Job("9", 1007, NOW, "slurm", True),
        "10": Job("10", BOB, NOW, "slurm", False),
    },
    membership={},
    aliases={"s6T9M8T79NSN00": "9"},
)
SLUID = "s6T9M8T79NSN00"
LINE_S = f"0::/system.slice/slurmstepd.scope/{SLUID}/step_batch/user/task_0"
LINE9 = "0::/system.slice/slurmstepd.scope/job_9/step_0/user/task_0"
LINE10 = "0::/system.slice/slurmstepd.scope/job_10/step_batch/user"
GONE = (Result.GONE, "gone (or pid reused) before acting")


def skipped(why: str) -> tuple[Result, str]:
    return Result.SKIPPED, f"{why}: not acted on"


@pytest.mark.parametrize(
    ("fresh", "in_jobs", "allow", "want"),
    [
        (OLD, [], (), None),  # unchanged: act
        (None, [], (), GONE),
        (replace(OLD, starttime=OLD.starttime + 1), [], (), GONE),  # pid reused
        (replace(OLD, state="Z"), [], (), (Result.GONE, "exited before acting")),
        (replace(OLD, uid=0), [], (), skipped("real uid changed to 0 since the snapshot")),
        # adopted into a running job since the snapshot: leave it
        (OLD, [("9", LINE9)], (), skipped(f"now in job 9's cgroup ({LINE9})")),
        # a job this view does not know yet may have just started: leave it too
        (OLD, [("12", LINE9)], (), skipped(f"now in job 12's cgroup ({LINE9})")),
        (OLD, [("10", LINE10)], (), None),  # an ended job's cgroup: still a stray
        (OLD, [("9", LINE9)], ("9",), None),  # the epilog of job 9 may act on its members
        # 26.05: the cgroup is named by the job's SLUID, which the view maps to job 9
        (OLD, [(SLUID, LINE_S)], (), skipped(f"now in job {SLUID}'s cgroup ({LINE_S})")),
        (OLD, [(SLUID, LINE_S)], ("9",), None),
        (OLD, [(SLUID, LINE_S)], (SLUID,), None),  # the epilog's own SLUID, not yet mapped
        # in Slurm's tree, in a cgroup the grammar does not know: doubt, never acted on
        (OLD, [(None, LINE9 + "/x")], ("9",), skipped(f"now in a Slurm cgroup pruned does not know ({LINE9}/x)")),  # noqa: E501
    ],
)
def test_recheck(fresh, in_jobs, allow, want) -> None:
    assert recheck(D, fresh, in_jobs, JOBS, allow) == want
