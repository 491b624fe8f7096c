"""Smoke tests: the real Slurm/sshd/journald harness behaves as harness.md says."""

from __future__ import annotations

import uuid

import pytest

from tests.fixtures.cluster import Cluster, Journald, parse_listpids, proc_cgroup, stepd_pids
from tests.fixtures.users import User, alive, wait_for_pid

pytestmark = [pytest.mark.root]


def test_parse_listpids_drops_header_and_placeholder() -> None:
    text = (
        "PID      JOBID    STEPID   LOCALID GLOBALID\n"
        "15133    9        batch    0       0\n"
        "-1       9        extern   0       0\n"
        "15118    9        extern   -       -\n"
    )
    assert parse_listpids(text) == [(15133, "batch"), (15118, "extern")]


@pytest.mark.cluster
def test_batch_script_sits_in_step_batch(cluster: Cluster, user_a: User) -> None:
    job = cluster.sbatch(user_a, "exec -a harness_batch sleep 300\n", job_name="harness")
    try:
        cluster.wait_running(job)
        pid = wait_for_pid(user_a.uid, "harness_batch", timeout=30)
        want = f"/{cluster.cgroup_root_name}/uid_{user_a.uid}/job_{job}/step_batch"
        assert proc_cgroup(pid, "freezer") == want
        assert proc_cgroup(pid, "cpuset") == want
        assert (pid, "batch") in cluster.listpids(job)
        assert cluster.job_cgroup(user_a.uid, job, "batch").is_dir()
        assert {s.split(".")[-1] for s in _stepd_names(job)} >= {"batch]", "extern]"}
    finally:
        cluster.scancel(job)
    cluster.wait_gone(job)
    assert not alive(pid)


@pytest.mark.cluster
def test_ssh_of_user_with_job_is_adopted_into_step_extern(cluster: Cluster, user_a: User) -> None:
    job = cluster.sbatch(user_a, "sleep 300\n")
    try:
        cluster.wait_running(job)
        client = cluster.ssh(user_a, "exec -a harness_ssh sleep 300")
        pid = wait_for_pid(user_a.uid, "harness_ssh", timeout=30)
        want = f"/{cluster.cgroup_root_name}/uid_{user_a.uid}/job_{job}/step_extern"
        assert proc_cgroup(pid, "freezer") == want
        assert (pid, "extern") in cluster.listpids(job)
    finally:
        cluster.scancel(job)
    cluster.wait_gone(job)
    assert client.wait(20) != 0  # scancel ends the adopted session
    assert not alive(pid)


@pytest.mark.cluster
def test_ssh_without_job_is_denied(cluster: Cluster, make_user) -> None:
    nobody = make_user("prn")
    r = cluster.ssh(nobody, "true", background=False)
    assert r.returncode == 255
    assert "no active jobs" in r.stderr


@pytest.mark.cluster
def test_whitelisted_user_lands_outside_job_cgroups(cluster: Cluster, make_user) -> None:
    admin = make_user("prw")
    cluster.allow_ssh_without_job(admin)
    try:
        cluster.ssh(admin, "exec -a harness_admin sleep 300")
        pid = wait_for_pid(admin.uid, "harness_admin", timeout=30)
        assert proc_cgroup(pid, "freezer") == "/"
        assert proc_cgroup(pid, "cpuset") == "/"
    finally:
        cluster.disallow_ssh_without_job(admin)
    r = cluster.ssh(admin, "true", background=False)
    assert r.returncode == 255, "removing the whitelist entry must deny again"


@pytest.mark.cluster
def test_crash_job_leaves_processes_in_stale_cgroup(cluster: Cluster, user_b: User) -> None:
    job = cluster.sbatch(user_b, "exec -a harness_crash sleep 300\n")
    cluster.wait_running(job)
    pid = wait_for_pid(user_b.uid, "harness_crash", timeout=30)
    cluster.crash_job(job)
    assert cluster.state(job) not in ("RUNNING", "PENDING")
    assert not stepd_pids(job)
    assert alive(pid), "a crashed stepd leaves its job's processes running"
    stale = cluster.job_cgroup(user_b.uid, job, "batch")
    assert str(pid) in (stale / "cgroup.procs").read_text().split()
    cluster.cleanup_crashed(job)
    assert not alive(pid)
    assert not cluster.job_cgroup(user_b.uid, job).exists()


@pytest.mark.journald
def test_journald_round_trip_with_custom_field(journald: Journald) -> None:
    from systemd import journal

    tag = str(uuid.uuid4())
    journal.send(
        "pruned harness test",
        PRUNED_TEST_ID=tag,
        PRUNED_ACTION="kill",
        SYSLOG_IDENTIFIER="pruned-test",
    )
    (rec,) = journald.wait_records(PRUNED_TEST_ID=tag)
    assert rec["PRUNED_ACTION"] == "kill"
    assert rec["MESSAGE"] == "pruned harness test"


def _stepd_names(job: int) -> list[str]:
    names = []
    for pid in stepd_pids(job):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            names.append(f.read().rstrip(b"\0").decode())
    return names


@pytest.mark.cluster
def test_linuxproc_variant_lets_a_double_forked_daemon_escape(
    cluster: Cluster, user_b: User, tmp_path
) -> None:
    epilog = tmp_path / "epilog.sh"
    marker = tmp_path / "epilog.ran"
    epilog.write_text(f'#!/bin/sh\necho "$SLURM_JOB_ID $SLURM_JOB_UID" >> {marker}\n')
    epilog.chmod(0o755)
    tmp_path.chmod(0o755)
    with cluster.configured(proctrack="linuxproc", epilog=str(epilog)):
        job = cluster.sbatch(
            user_b, "( setsid -f bash -c 'exec -a harness_escapee sleep 300' & )\nsleep 300\n"
        )
        cluster.wait_running(job)
        daemon = wait_for_pid(user_b.uid, "harness_escapee", timeout=30)
        assert proc_cgroup(daemon, "freezer") == "/"
        cluster.scancel(job)
        cluster.wait_gone(job)
        assert alive(daemon), "under proctrack/linuxproc the daemon survives scancel"
        assert marker.read_text().split() == [str(job), str(user_b.uid)]
    text = (cluster.workdir / "etc" / "slurm.conf").read_text()
    assert "ProctrackType=proctrack/cgroup" in text
    assert "Epilog=" not in text


@pytest.mark.journald
def test_journald_stop_leaves_stale_socket_and_start_recovers(journald: Journald) -> None:
    from systemd import journal

    journald.stop()
    try:
        assert not journald.running
        with pytest.raises(ConnectionRefusedError):
            journal.send("lost", SYSLOG_IDENTIFIER="pruned-test")
    finally:
        journald.start()
    tag = str(uuid.uuid4())
    journal.send("after restart", PRUNED_TEST_ID=tag)
    assert journald.wait_records(PRUNED_TEST_ID=tag)[0]["MESSAGE"] == "after restart"
