"""`pruned scan --json` on the real single-node Slurm cluster: each kind of process, classified.

Job steps -> batch; an ssh login adopted by pam_slurm_adopt -> adopted; a process started
outside Slurm -> stray; what a crashed slurmstepd left -> stray; a whitelisted admin's ssh
session -> whitelisted; spoofed daemon names -> stray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.fixtures.users import daemon_as, setsid_as, wait_for_pid

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def scan(policy: str) -> dict[int, dict]:
    r = subprocess.run(
        [sys.executable, "-m", "pruned.cli", "scan", "--json", "--policy", policy],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    for row in rows:  # every row carries the documented fields
        for key in (
            "pid",
            "starttime",
            "ppid",
            "uid",
            "user",
            "comm",
            "class",
            "rule",
            "action",
            "job",
            "reason",
        ):
            assert key in row, (key, row)
    return {row["pid"]: row for row in rows}


def wait_class(policy: str, pid: int, cls: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < deadline:
        row = scan(policy).get(pid, {})
        if row.get("class") == cls:
            return row
        time.sleep(0.5)
    raise AssertionError(f"pid {pid}: expected {cls}, got {row}")


@pytest.fixture
def policy_file(tmp_path, make_user):
    admin = make_user("pradm")
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        "mode: report\n"
        f"whitelist:\n  users: [{admin.name}]\n"
        f"jobs:\n  state_dir: {tmp_path}/state\n"
    )
    return str(path), admin


def test_cluster_processes_are_classified(cluster, make_user, policy_file):
    policy, admin = policy_file
    alice, bob = make_user("pral"), make_user("prbo")

    # alice: a batch job with an srun step and a double-forked daemon inside the job.
    job = cluster.sbatch(
        alice,
        "srun --overlap -n1 bash -c 'exec -a alice_step sleep 600' &\n"
        "( setsid -f bash -c 'exec -a alice_jobdaemon sleep 600' & )\n"
        "exec -a alice_script sleep 600\n",
    )
    cluster.wait_running(job)
    script = wait_for_pid(alice.uid, "alice_script", timeout=30)
    step = wait_for_pid(alice.uid, "alice_step", timeout=30)
    jobdaemon = wait_for_pid(alice.uid, "alice_jobdaemon", timeout=30)
    # alice logs in with ssh: pam_slurm_adopt puts the session into job's step_extern.
    cluster.ssh(alice, "exec -a alice_ssh sleep 600")
    ssh_pid = wait_for_pid(alice.uid, "alice_ssh", timeout=30)
    # bob: started outside Slurm (no job), and daemon-name spoofs.
    stray = daemon_as(bob, "bob_stray")
    spoof = daemon_as(bob, "slurmstepd")
    subprocess.run(["cp", "/usr/bin/sleep", f"{bob.home}/sshd"], check=True)
    subprocess.run(["chown", f"{bob.uid}:{bob.gid}", f"{bob.home}/sshd"], check=True)
    setsid_as(bob, f"exec {bob.home}/sshd 601")
    copied = wait_for_pid(bob.uid, f"{bob.home}/sshd")
    # the whitelisted admin logs in without a job (pam_access lets them through).
    cluster.allow_ssh_without_job(admin)
    cluster.ssh(admin, "exec -a admin_ssh sleep 600")
    admin_pid = wait_for_pid(admin.uid, "admin_ssh", timeout=30)

    rows = scan(policy)
    expect = {
        script: ("batch", "batch.job_cgroup"),
        step: ("batch", "batch.job_cgroup"),
        jobdaemon: ("batch", "batch.job_cgroup"),
        ssh_pid: ("adopted", "adopted.extern"),
        stray: ("stray", "stray.default"),
        spoof: ("stray", "stray.default"),
        copied: ("stray", "stray.default"),
        admin_pid: ("whitelisted", "whitelist.user"),
    }
    for pid, (cls, rule) in expect.items():
        row = rows[pid]
        assert (row["class"], row["rule"]) == (cls, rule), row
        assert row["reason"]
    assert rows[script]["job"] == str(job)
    assert rows[ssh_pid]["job"] == str(job)
    assert rows[stray]["action"] == "kill"  # (held by min_age while it is young)
    # the slurm daemons themselves
    daemons = [r for r in rows.values() if r["comm"] in ("slurmd", "slurmstepd", "slurmctld")]
    assert daemons and all(r["class"] == "system" for r in daemons)

    # crash the job's slurmstepds: what it left keeps running in stale cgroups -> stray
    cluster.crash_job(job)
    try:
        row = wait_class(policy, script, "stray")
        assert row["rule"] == "stray.ended_job" and row["job"] == str(job)
        assert "NOT running" in " ".join(row["evidence"])
        assert wait_class(policy, jobdaemon, "stray")["rule"] == "stray.ended_job"
    finally:
        cluster.cleanup_crashed(job)
