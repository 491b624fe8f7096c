"""File cleanup on a real node: what a job leaves in /tmp, /dev/shm and its per-job directory
/tmp/slurm-<job> is gone after the job ended -- the job directory by pruned-epilog at once,
the loose files by the daemon (under its unit) once the owner has no job and no process and
cleanup.min_age (2 s in policy-enforce.yaml) has passed -- each with a files_removed record.
A user who still has a running job keeps hers.

job_container/tmpfs is configured only for test_job_container's phase (its leftovers after
a crashed step), so cleanup.job_container_base is null here."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Daemon
from scene import Scene
from vmlib import job_state, journal_after, journal_cursor, sbatch, sh, wait_for, wait_running

SCRIPT = """#!/bin/bash
echo data > /tmp/vm-henry-loose
echo data > /dev/shm/vm-henry-shm
mkdir /tmp/slurm-$SLURM_JOB_ID && echo data > /tmp/slurm-$SLURM_JOB_ID/out
# Long enough for the daemon's job refresh (every 3 s) to see the job run.
sleep 10
"""
LOOSE = [Path("/tmp/vm-henry-loose"), Path("/dev/shm/vm-henry-shm")]
KEPT = Path("/tmp/vm-alice-keep")


def removed(recs: list[dict], path: Path) -> dict | None:
    for r in recs:
        names = r.get("PRUNED_NAMES", "").split()
        if r.get("PRUNED_PATH") == str(path) or str(path) in names or (
                r.get("PRUNED_PATH") == str(path.parent) and path.name in names):
            return r
    return None


def test_files_of_an_ended_job_go_those_of_a_running_job_stay(scene: Scene,
                                                              enforcing: Daemon) -> None:
    cursor = journal_cursor()
    sh("runuser", "-u", "alice", "--", "sh", "-c", f"echo keep > {KEPT}")
    job = sbatch("henry", SCRIPT)
    wait_running(job)
    job_dir = Path(f"/tmp/slurm-{job}")
    wait_for("henry's files", lambda: all(p.exists() for p in (*LOOSE, job_dir / "out")), 60)
    uid = str(os.stat(LOOSE[0]).st_uid)
    wait_for(f"job {job} gone", lambda: job_state(job) == "", timeout=120)
    wait_for("henry's files removed", lambda: not any(p.exists() for p in (*LOOSE, job_dir)),
             timeout=120)

    def records() -> list[dict]:
        return journal_after(cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="files_removed")

    # A file sweep writes its records after the removals.
    try:
        recs = wait_for("files_removed records", lambda: (r := records()) and all(
            removed(r, p) for p in (job_dir, *LOOSE)) and r, timeout=60)
    except AssertionError:
        recs = records()
    jd = removed(recs, job_dir)
    assert jd is not None and jd["PRUNED_JOB_ID"] == job, recs
    for p in LOOSE:
        rec = removed(recs, p)
        assert rec is not None, (p, recs)
        assert rec["PRUNED_UID"] == uid and rec["_SYSTEMD_UNIT"] == "pruned.service", rec
    # alice's job runs: her file stayed through the file sweeps that took henry's.
    assert KEPT.exists()
    assert not removed(recs, KEPT)
