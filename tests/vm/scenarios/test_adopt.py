"""`adopt` on cgroup v2: pruned moves a stray into its user's newest job; on v2 the kernel takes
processes only into leaf cgroups, so it must land where Slurm itself puts adopted logins
(pam_slurm_adopt's cgroup), be counted by the job, and die with it at scancel."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from scene import Scene
from vmlib import (
    LONG,
    Proc,
    alive,
    job_dir_of,
    journal_after,
    journal_cursor,
    read_proc,
    sbatch,
    sh,
    wait_for,
    wait_procs,
    wait_running,
)

POLICY_DIR = Path("/run/pruned-vm-adopt-policy")


@dataclass
class Adoption:
    job: str
    job_dir: str
    stray: Proc  # before the sweep
    after: Proc | None  # the same process after the sweep
    sweep: str  # pruned sweep's output
    rc: int  # and its exit status
    cursor: str


@pytest.fixture(scope="module")
def adoption(scene: Scene) -> Adoption:
    job = sbatch("erin", f"#!/bin/bash\nexec -a vm_erin_job sleep {LONG}\n")
    wait_running(job)
    job_dir = job_dir_of(wait_procs("vm_erin_job")[0])
    sh("runuser", "-u", "erin", "--", "setsid", "-f", "bash", "-c",
       f"exec -a vm_erin_stray sleep {LONG} </dev/null >/dev/null 2>&1")
    stray = wait_procs("vm_erin_stray")[0]
    # The node's policy plus the adopt drop-in, as a site would stage it.
    shutil.rmtree(POLICY_DIR, ignore_errors=True)
    shutil.copytree("/etc/pruned/policy.d", POLICY_DIR)
    shutil.copy(Path(__file__).with_name("policy-adopt.yaml"), POLICY_DIR / "60-adopt.yaml")
    cursor = journal_cursor()
    out = sh("pruned", "sweep", "--once", "--policy", str(POLICY_DIR), "--uid", "erin",
             timeout=300, check=False)
    return Adoption(job, job_dir, stray, read_proc(stray.pid), out.stdout + out.stderr,
                    out.returncode, cursor)


def _below_job(path: str, job_dir: str) -> str:
    return path.split(f"slurmstepd.scope/{job_dir}/", 1)[-1]


def test_adopt_lands_where_slurm_puts_adopted_logins(adoption: Adoption, scene: Scene) -> None:
    a = adoption
    assert a.rc == 0, f"pruned sweep exit {a.rc}:\n{a.sweep}"
    assert a.after is not None and a.after.starttime == a.stray.starttime, a.sweep
    assert job_dir_of(a.after) == a.job_dir, f"{a.after.label()}\npruned sweep:\n{a.sweep}"
    # pam_slurm_adopt's place for alice's login, relative to her job's dir.
    login = scene.roles["ssh_command"][0]
    want = _below_job(login.cgroup_path, scene.alice_dir)
    assert _below_job(a.after.cgroup_path, a.job_dir) == want, a.after.label()
    cg = Path("/sys/fs/cgroup" + a.after.cgroup_path)
    assert not [d for d in cg.iterdir() if d.is_dir()], f"{cg} is not a leaf cgroup"


def test_adoption_is_audited(adoption: Adoption) -> None:
    recs = journal_after(adoption.cursor, SYSLOG_IDENTIFIER="pruned",
                         PRUNED_PID=str(adoption.stray.pid))
    events = [r.get("PRUNED_EVENT") for r in recs]
    assert "process_adopted" in events, (events, adoption.sweep)


def test_adopted_process_dies_with_the_job(adoption: Adoption) -> None:
    sh("scancel", adoption.job)
    deadline = time.monotonic() + 60
    while alive(adoption.stray) and time.monotonic() < deadline:
        time.sleep(1)
    now = read_proc(adoption.stray.pid)
    assert not alive(adoption.stray), f"still running after scancel: {now and now.label()}"
    wait_for(f"job {adoption.job} gone", lambda: sh(
        "squeue", "-h", "-j", adoption.job, "-t", "R", check=False).stdout.strip() == "", 60)
