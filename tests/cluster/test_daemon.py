"""The daemon against the real Slurm cluster: `pruned run` with the Slurm source, adopting
strays into their user's job by the event path, killing those of a user without a job."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.cluster import proc_cgroup
from tests.fixtures.users import wait_dead, wait_for_pid
from tests.real.test_daemon import FAR, plant_stray, start_daemon, write_policy  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def test_daemon_adopts_into_the_job_and_kills_without_one(
    exclusive_cluster, jobs, make_user, start_daemon, tmp_path  # noqa: F811
):
    c = exclusive_cluster
    withjob, nojob = make_user("prdj"), make_user("prdn")
    job = c.sbatch(withjob, "exec -a daemon_test_job sleep 900\n")
    jobs.append(job)
    c.wait_running(job)
    wait_for_pid(withjob.uid, "daemon_test_job", timeout=60)
    policy = write_policy(
        tmp_path,
        jobs={"sources": ["slurm"], "state_dir": str(tmp_path / "state")},
        actions={"stray": "adopt", "adopt_fallback": "kill"},
        events=True,
        schedule={"sweep": FAR},
    )
    d = start_daemon(policy, [withjob.uid, nojob.uid])
    d.ready()

    adopted = plant_stray(withjob, "to_adopt")
    killed = plant_stray(nojob, "to_kill")
    assert wait_dead(killed, 10), d.stderr()
    deadline = time.monotonic() + 10
    while proc_cgroup(adopted) != f"/{c.cgroup_root_name}/uid_{withjob.uid}/job_{job}/step_extern":
        assert time.monotonic() < deadline, (proc_cgroup(adopted), d.stderr())
        time.sleep(0.1)
    assert (adopted, "extern") in c.listpids(job)
    rec = d.wait_audit(PRUNED_EVENT="process_adopted", PRUNED_PID=str(adopted))
    assert rec["PRUNED_JOB_ID"] == str(job) and rec["PRUNED_SWEEP_ID"].startswith("event-")
    d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(killed))

    c.scancel(job)  # the adopted stray now belongs to the job and ends with it
    assert wait_dead(adopted, 60)
    assert d.stop() == 0
