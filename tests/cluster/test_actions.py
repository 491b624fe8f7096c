"""pruned acts, on the real single-node Slurm cluster.

- `pruned sweep --once` with `actions.stray: adopt` moves a stray started outside Slurm into
  its user's running job: `scontrol listpids` shows it in the extern step, its cgroup is
  step_extern, and `scancel` of the job kills it.
- a user with two jobs: the stray lands in the newer one (pam_slurm_adopt here picks the older).
- `pruned sweep --once --dry-run` lists exactly the strays and a crashed job's leftovers.
- a kill and an adoption reach journald with every documented field.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.cluster import Cluster, proc_cgroup
from tests.fixtures.paths import REPO
from tests.fixtures.users import User, alive, daemon_as, pids_of_uid, wait_dead, wait_for_pid

pytestmark = [pytest.mark.root, pytest.mark.cluster]

LINE_RE = re.compile(r"^(\w+)\s+(\w+)\s+pid (\d+) ")


def write_policy(tmp_path: Path, stray: str) -> Path:
    """An enforcing policy acting at once, with its state and audit fallback in tmp_path."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        f"actions:\n  stray: {stray}\n"
        "kill:\n  grace: 2s\n"
        f"jobs:\n  sources: [slurm]\n  state_dir: {tmp_path}/state\n"
        f"audit:\n  fallback_file: {tmp_path}/audit.jsonl\n"
    )
    return path


def sweep(policy: Path, *uids: int, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m pruned.cli sweep --once [--dry-run] --policy P --uid U...`."""
    argv = [sys.executable, "-m", "pruned.cli", "sweep", "--once", "--policy", str(policy)]
    if dry_run:
        argv.append("--dry-run")
    argv += ["--uid", *map(str, uids)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)


def acted(stdout: str) -> dict[int, tuple[str, str]]:
    """Per-decision lines of a sweep: pid -> (result, action)."""
    out = {}
    for line in stdout.splitlines():
        if m := LINE_RE.match(line):
            out[int(m[3])] = (m[1], m[2])
    return out


def sweep_id(stdout: str) -> str:
    m = re.search(r"^sweep (\w+) \(", stdout, re.M)
    assert m, stdout
    return m[1]


def kill_test_pid(pid: int, user: User) -> None:
    """SIGKILL pid if it still runs as the test user (never anything else)."""
    if pid in pids_of_uid(user.uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def submit(c: Cluster, jobs: list[int], user: User, name: str) -> tuple[int, int]:
    """A running job of user whose script is `exec -a name sleep`: (job id, script pid)."""
    job = c.sbatch(user, f"exec -a {name} sleep 900\n")
    jobs.append(job)
    c.wait_running(job)
    return job, wait_for_pid(user.uid, name, timeout=60)


def in_extern(c: Cluster, pid: int, job: int) -> bool:
    return (pid, "extern") in c.listpids(job)


def test_stray_adopted_into_job_and_dies_with_it(exclusive_cluster, jobs, make_user, tmp_path):
    c = exclusive_cluster
    user = make_user("prad")
    policy = write_policy(tmp_path, "adopt")
    job, script = submit(c, jobs, user, "adopt_job")
    stray = daemon_as(user, "adopt_stray")
    try:
        assert proc_cgroup(stray) == "/"
        r = sweep(policy, user.uid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert acted(r.stdout) == {stray: ("done", "adopt")}, r.stdout
        assert f"-> job {job}" in r.stdout, r.stdout
        # Slurm itself now counts it as part of the job's extern step
        assert in_extern(c, stray, job), c.listpids(job)
        for ctrl in ("freezer", "cpuset"):
            path = proc_cgroup(stray, ctrl)
            assert path == f"/{c.cgroup_root_name}/uid_{user.uid}/job_{job}/step_extern", path
        assert alive(stray) and alive(script)
        # ...so ending the job ends it too
        c.scancel(job)
        assert wait_dead(stray), proc_cgroup(stray)
        c.wait_gone(job)
    finally:
        kill_test_pid(stray, user)


def test_two_jobs_stray_goes_to_the_newer(exclusive_cluster, jobs, make_user, tmp_path):
    c = exclusive_cluster
    user = make_user("prnw")
    policy = write_policy(tmp_path, "adopt")
    older, _ = submit(c, jobs, user, "older_job")
    time.sleep(1.1)  # distinct step_extern mtimes (the newer job also has the higher id)
    newer, _ = submit(c, jobs, user, "newer_job")
    assert newer > older
    stray = daemon_as(user, "newer_stray")
    try:
        r = sweep(policy, user.uid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert acted(r.stdout) == {stray: ("done", "adopt")}, r.stdout
        assert f"-> job {newer}" in r.stdout, r.stdout
        assert in_extern(c, stray, newer), c.listpids(newer)
        assert not any(pid == stray for pid, _ in c.listpids(older))
        assert proc_cgroup(stray).endswith(f"/job_{newer}/step_extern")
        # the older job ending leaves it alone; the newer one ending takes it along
        c.scancel(older)
        c.wait_gone(older)
        assert alive(stray)
        c.scancel(newer)
        assert wait_dead(stray)
    finally:
        kill_test_pid(stray, user)


def test_dry_run_lists_exactly_strays_and_crashed_leftovers(
    exclusive_cluster, jobs, make_user, tmp_path
):
    c = exclusive_cluster
    alice, bob = make_user("prdra"), make_user("prdrb")
    policy = write_policy(tmp_path, "kill")
    # alice: a batch job with a child, an ssh session adopted into it, and a stray
    job = c.sbatch(
        alice, "bash -c 'exec -a alice_child sleep 900' &\nexec -a alice_job sleep 900\n"
    )
    jobs.append(job)
    c.wait_running(job)
    alice_job = wait_for_pid(alice.uid, "alice_job", timeout=60)
    alice_child = wait_for_pid(alice.uid, "alice_child", timeout=60)
    c.ssh(alice, "exec -a alice_ssh sleep 900")
    alice_ssh = wait_for_pid(alice.uid, "alice_ssh", timeout=60)
    assert in_extern(c, alice_ssh, job)
    alice_stray = daemon_as(alice, "alice_stray")
    # bob: a job whose slurmstepds crash, leaving its processes in stale cgroups
    crashed = c.sbatch(bob, "bash -c 'exec -a bob_left sleep 900' &\nexec -a bob_job sleep 900\n")
    jobs.append(crashed)
    c.wait_running(crashed)
    bob_left = wait_for_pid(bob.uid, "bob_left", timeout=60)
    bob_job = wait_for_pid(bob.uid, "bob_job", timeout=60)
    c.crash_job(crashed)
    try:
        assert alive(bob_left) and alive(bob_job)
        leftovers = {p for p in pids_of_uid(bob.uid) if alive(p)}
        assert {bob_left, bob_job} <= leftovers
        r = sweep(policy, alice.uid, bob.uid, dry_run=True)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = acted(r.stdout)
        expected = {pid: ("would", "kill") for pid in (alice_stray, *leftovers)}
        assert lines == expected, r.stdout
        assert "REPORT-ONLY" not in r.stdout, r.stdout
        for pid in (alice_job, alice_child, alice_ssh):
            assert pid not in lines
        time.sleep(0.3)  # nothing was touched
        for pid in (alice_job, alice_child, alice_ssh, alice_stray, bob_left, bob_job):
            assert alive(pid), pid
    finally:
        c.cleanup_crashed(crashed)
        kill_test_pid(alice_stray, alice)


def test_kill_and_adopt_reach_journald(exclusive_cluster, jobs, journald, make_user, tmp_path):
    c = exclusive_cluster
    withjob, nojob = make_user("prjna"), make_user("prjnk")
    policy = write_policy(tmp_path, "adopt")  # no job to adopt into: adopt_fallback kill
    job, _ = submit(c, jobs, withjob, "journal_job")
    to_adopt = daemon_as(withjob, "journal_adoptee")
    to_kill = daemon_as(nojob, "journal_victim")
    try:
        r = sweep(policy, withjob.uid, nojob.uid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert acted(r.stdout) == {to_adopt: ("done", "adopt"), to_kill: ("done", "kill")}
        assert wait_dead(to_kill, 10)
        sid = sweep_id(r.stdout)
        for pid, user, event, action in (
            (to_kill, nojob, "process_killed", "kill"),
            (to_adopt, withjob, "process_adopted", "adopt"),
        ):
            (rec,) = journald.wait_records(
                SYSLOG_IDENTIFIER="pruned", PRUNED_SWEEP_ID=sid, PRUNED_PID=str(pid)
            )
            want = {
                "PRUNED_EVENT": event,
                "PRUNED_PID": str(pid),
                "PRUNED_UID": str(user.uid),
                "PRUNED_USER": user.name,
                "PRUNED_COMM": "sleep",
                "PRUNED_CLASS": "stray",
                "PRUNED_RULE": "stray.default",
                "PRUNED_ACTION": action,
                "PRUNED_RESULT": "done",
                "PRUNED_SWEEP_ID": sid,
                "PRUNED_DRY_RUN": "no",
                "PRIORITY": "5",
            }
            assert {k: rec.get(k) for k in want} == want, rec
            assert rec["PRUNED_STARTTIME"].isdigit(), rec
            assert re.fullmatch(r"[0-9a-f]{32}", rec["MESSAGE_ID"]), rec
            assert str(pid) in rec["MESSAGE"] and user.name in rec["MESSAGE"], rec
            if action == "adopt":
                assert rec["PRUNED_JOB_ID"] == str(job), rec
                assert f"into job {job}" in rec["MESSAGE"], rec
            else:
                assert "PRUNED_JOB_ID" not in rec, rec
        killed = journald.records(PRUNED_SWEEP_ID=sid, PRUNED_EVENT="process_killed")
        adopted = journald.records(PRUNED_SWEEP_ID=sid, PRUNED_EVENT="process_adopted")
        assert killed[0]["MESSAGE_ID"] != adopted[0]["MESSAGE_ID"]
        (summary,) = journald.wait_records(PRUNED_SWEEP_ID=sid, PRUNED_EVENT="sweep_summary")
        assert (summary["PRUNED_KILLED"], summary["PRUNED_ADOPTED"]) == ("1", "1"), summary
        # journald took them all: nothing went to the fallback file
        assert not (tmp_path / "audit.jsonl").exists()
    finally:
        kill_test_pid(to_adopt, withjob)
        kill_test_pid(to_kill, nojob)
