"""(b) `pruned scan --json` on a real v2 node: every process of the scene gets the class its
role says (scene.ROLES), and job processes are attributed to their job."""

from __future__ import annotations

import pytest
from agree import three_paths_disagree
from scene import ROLES, Scene
from vmlib import Scan


def _explain(rec: dict) -> str:
    return (f"class {rec['class']} rule {rec['rule']} job {rec['job']}: {rec['reason']}; "
            f"evidence {rec['evidence']}")


@pytest.mark.parametrize("role", list(ROLES))
def test_class_of(role: str, scene: Scene, scan: Scan) -> None:
    procs = scene.roles.get(role, [])
    if not procs:
        if ROLES[role].required:
            pytest.fail(f"no process has role {role} ({ROLES[role].what})")
        pytest.skip(f"no {role} on this release ({ROLES[role].what})")
    wrong = []
    for p in procs:
        rec = scan.of(p)
        if rec["class"] != ROLES[role].cls:
            wrong.append(f"{p.label()}\n    -> {_explain(rec)}")
    assert not wrong, (f"{role}: want {ROLES[role].cls}, got:\n  " + "\n  ".join(wrong)
                       + (f"\npruned scan stderr:\n{scan.stderr}" if scan.stderr else ""))


def test_job_processes_are_attributed_to_their_job(scene: Scene, scan: Scan) -> None:
    # The job id pruned reports: Slurm's id (job_J dirs), or the job's SLUID dir on 26.05.
    want = {scene.alice_job, scene.alice_dir}
    wrong = []
    for role in ("batch_script", "batch_sleep", "job_daemon", "srun_task", "ssh_session",
                 "ssh_command", "ssh_daemon"):
        for p in scene.roles[role]:
            rec = scan.of(p)
            if rec["job"] not in want:
                wrong.append(f"{role}: {p.label()} -> {_explain(rec)}")
    assert not wrong, f"want job in {sorted(want)}:\n" + "\n".join(wrong)


def test_crashed_jobs_leftovers_are_ended_job_strays(scene: Scene, scan: Scan) -> None:
    # README: stray.ended_job = "in the cgroup of a job that is not running".
    for p in scene.roles["crash_left"]:
        rec = scan.of(p)
        assert (rec["class"], rec["rule"]) == ("stray", "stray.ended_job"), _explain(rec)


def test_job_source_sees_the_running_job_without_problems(scan: Scan) -> None:
    # A problem makes every sweep report-only: pruned would be blind on this node.
    problems = [line for line in scan.stderr.splitlines() if "job source:" in line]
    assert not problems, "\n".join(problems)


def test_full_sweep_event_path_and_reverify_agree(scene: Scene) -> None:
    """For every process of the scene: the full sweep (tree read through cgroup.procs), the
    event path (each process's own /proc/PID/cgroup lines, ancestors read one by one) and the
    re-check before an action (reverify) reach the same verdict."""
    compared, wrong = three_paths_disagree(scene.all())
    assert compared >= 10, f"only {compared} processes compared"
    assert not wrong, "\n".join(wrong)
