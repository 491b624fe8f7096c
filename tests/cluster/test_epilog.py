"""End to end on the real Slurm cluster: `pruned-epilog` as Slurm's Epilog=, and report-only
sweeps while slurmd is down.

- proctrack/linuxproc: a job's double-forked daemon escapes the job; the epilog kills it and
  removes the job's per-job directory.
- a user with two jobs: ending one leaves the other job, its adopted ssh session and the
  user's other processes alive; ending the last one kills the user's strays.
- slurmd stopped while job cgroups hold processes: sweeps act on nothing and say why.
- a broken policy never drains the node: without a last good policy the epilog does nothing
  and exits 0, with one it does its job with it and exits 0; the node stays in service.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pruned.policy.lastgood import STORE_ENV
from tests.fixtures.cluster import WORKDIR, run_cluster_sh
from tests.fixtures.paths import REPO
from tests.fixtures.users import alive, daemon_as, wait_dead, wait_for_pid

pytestmark = [pytest.mark.root, pytest.mark.cluster]


@pytest.fixture
def epilog_setup(tmp_path: Path):
    """A policy whose cleanup root is a test dir, and an Epilog wrapper that logs what it did."""
    base = Path(f"/var/tmp/prtest-{os.getpid()}-{tmp_path.name}")
    root = base / "tmp"
    root.mkdir(parents=True)
    root.chmod(0o1777)
    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        "kill:\n  grace: 2s\n"
        f"jobs:\n  sources: [slurm]\n  state_dir: {state}\n"
        f"audit:\n  fallback_file: {tmp_path}/audit.jsonl\n"
        f"cleanup:\n  roots: [{root}]\n  job_dirs: ['{root}/slurm-{{job_id}}']\n"
        "  job_container_base: null\n  min_age: 0s\n"
    )
    log = tmp_path / "epilog.log"
    wrapper = tmp_path / "epilog.sh"
    # slurmd gives epilogs an environment of its own: the test session's last-good store.
    store = os.environ.get(STORE_ENV, "")
    wrapper.write_text(
        "#!/bin/sh\n"
        f"export {STORE_ENV}={store}\n"
        f'echo "== job $SLURM_JOB_ID uid $SLURM_JOB_UID" >> {log}\n'
        f"{REPO}/.venv/bin/pruned-epilog --policy {policy} >> {log} 2>&1\n"
        f'rc=$?; echo "== rc $rc" >> {log}; exit $rc\n'
    )
    wrapper.chmod(0o755)
    tmp_path.chmod(0o755)
    try:
        yield policy, root, wrapper, log
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)])


def epilog_ran(log: Path, job: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if f"== job {job} " in text and "== rc" in text.split(f"== job {job} ", 1)[1]:
            return text.split(f"== job {job} ", 1)[1]
        time.sleep(0.2)
    raise AssertionError(f"epilog of job {job} did not finish: {log.read_text()}")


def test_linuxproc_daemon_killed_and_job_dir_removed(exclusive_cluster, make_user, epilog_setup):
    _policy, root, wrapper, log = epilog_setup
    alice = make_user("prel")
    with exclusive_cluster.configured(proctrack="linuxproc", epilog=str(wrapper)) as c:
        job = c.sbatch(
            alice,
            f"mkdir {root}/slurm-$SLURM_JOB_ID && echo data > {root}/slurm-$SLURM_JOB_ID/out\n"
            "( setsid -f bash -c 'exec -a alice_escapee sleep 900' & )\n"
            "sleep 2\n",
        )
        daemon = wait_for_pid(alice.uid, "alice_escapee", timeout=60)
        deadline = time.monotonic() + 30
        while not (root / f"slurm-{job}" / "out").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (root / f"slurm-{job}" / "out").exists()
        c.wait_gone(job)
        out = epilog_ran(log, job)
        assert wait_dead(daemon), out  # escaped the job (linuxproc), killed by the epilog
        assert not (root / f"slurm-{job}").exists(), out
        assert "== rc 0" in out, out


def test_two_jobs_ending_one_keeps_the_other(exclusive_cluster, make_user, epilog_setup):
    _policy, _root, wrapper, log = epilog_setup
    bob = make_user("pret")
    with exclusive_cluster.configured(epilog=str(wrapper)) as c:
        job1 = c.sbatch(bob, "exec -a bob_job1 sleep 900\n")
        c.wait_running(job1)
        batch1 = wait_for_pid(bob.uid, "bob_job1", timeout=60)
        c.ssh(bob, "exec -a bob_ssh sleep 900")  # adopted into job1, its only job
        ssh_pid = wait_for_pid(bob.uid, "bob_ssh", timeout=60)
        job2 = c.sbatch(bob, "exec -a bob_job2 sleep 900\n")
        c.wait_running(job2)
        outside = daemon_as(bob, "bob_outside")  # a stray, tied to no job
        c.scancel(job2)
        c.wait_gone(job2)
        out2 = epilog_ran(log, job2)
        assert "other running jobs" in out2, out2
        time.sleep(0.5)
        assert alive(batch1) and alive(ssh_pid) and alive(outside), out2
        # ending the last job takes the user's strays with it
        c.scancel(job1)
        c.wait_gone(job1)
        out1 = epilog_ran(log, job1)
        assert "last job" in out1, out1
        assert wait_dead(outside), out1
        assert "== rc 0" in out1


def node_state(node: str) -> str:
    r = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True,
                       text=True, timeout=30)
    return r.stdout.strip().lower()


def test_broken_policy_never_drains_the_node(exclusive_cluster, make_user, epilog_setup,
                                             journald):
    """Configuration management pushes a broken policy: Slurm's Epilog still exits 0 (Slurm
    would DRAIN the node otherwise), first doing nothing (no last good policy of this path
    yet), then — once the policy was validated and kept — doing its job with the last good
    one. Both are said in the journal (policy_fallback)."""
    policy, _root, wrapper, log = epilog_setup
    carol = make_user("prbp")
    good = policy.read_text()
    broken = good + "kill_typo: {grace: 5s}\n"
    with exclusive_cluster.configured(proctrack="linuxproc", epilog=str(wrapper)) as c:
        policy.write_text(broken)
        job1 = c.sbatch(carol, "( setsid -f bash -c 'exec -a prbp_escapee1 sleep 900' & )\n"
                               "sleep 1\n")
        esc1 = wait_for_pid(carol.uid, "prbp_escapee1", timeout=60)
        c.wait_gone(job1)
        out1 = epilog_ran(log, job1)
        assert "== rc 0" in out1 and "no last good policy" in out1, out1
        time.sleep(0.5)
        assert alive(esc1), "without a usable policy the epilog must not act"
        assert "drain" not in node_state(c.node), out1
        # PRUNED_PATH is this test's own policy: job ids start again when the cluster does.
        rec1 = journald.wait_records(PRUNED_EVENT="policy_fallback", PRUNED_JOB_ID=str(job1),
                                     PRUNED_PATH=str(policy))
        assert rec1[0]["PRUNED_RESULT"] == "nothing done"
        assert rec1[0]["PRUNED_REASON"].startswith(f"{policy}:17: kill_typo: unknown key")

        policy.write_text(good)
        r = subprocess.run([sys.executable, "-m", "pruned.cli", "check-config", str(policy)],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0 and "kept as the last good policy" in r.stderr, r.stderr
        policy.write_text(broken)
        job2 = c.sbatch(carol, "( setsid -f bash -c 'exec -a prbp_escapee2 sleep 900' & )\n"
                               "sleep 1\n")
        esc2 = wait_for_pid(carol.uid, "prbp_escapee2", timeout=60)
        c.wait_gone(job2)
        out2 = epilog_ran(log, job2)
        assert "== rc 0" in out2 and "running with the last good policy" in out2, out2
        assert wait_dead([esc1, esc2]), out2  # carol's last job: all of her strays go
        assert "drain" not in node_state(c.node), out2
        rec2 = journald.wait_records(PRUNED_EVENT="policy_fallback", PRUNED_JOB_ID=str(job2),
                                     PRUNED_PATH=str(policy))
        assert rec2[0]["PRUNED_RESULT"] == "fallback" and rec2[0]["PRIORITY"] == "4"
        assert rec2[0]["PRUNED_FALLBACK_FILES"] == str(policy)
        epilog_pid = rec2[0]["_PID"]  # the same epilog process then killed the stray
        journald.wait_records(PRUNED_EVENT="process_killed", PRUNED_PID=str(esc2),
                              _PID=epilog_pid)


def test_slurmd_down_makes_sweeps_report_only(exclusive_cluster, make_user, tmp_path):
    c = exclusive_cluster
    carol = make_user("prsd")
    job = c.sbatch(carol, "exec -a carol_job sleep 900\n")
    c.wait_running(job)
    stray = daemon_as(carol, "carol_stray")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        f"jobs:\n  state_dir: {tmp_path}/state\n"
        f"audit:\n  fallback_file: {tmp_path}/audit.jsonl\n"
    )
    slurmd = int((WORKDIR / "pids" / "slurmd.pid").read_text())
    os.kill(slurmd, signal.SIGTERM)
    try:
        assert wait_dead(slurmd, 30)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pruned.cli",
                "sweep",
                "--once",
                "--policy",
                str(policy),
                "--uid",
                str(carol.uid),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert "REPORT-ONLY" in r.stdout and "slurmd" in r.stdout, r.stdout + r.stderr
        time.sleep(0.3)
        assert alive(stray)
    finally:
        r = run_cluster_sh("restart-slurm")
        assert r.returncode == 0, r.stderr
