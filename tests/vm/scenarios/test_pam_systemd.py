"""The pam_systemd escape route. Slurm's pam_slurm_adopt documentation asks to take
pam_systemd out of sshd's PAM stack (guest/setup.sh does); here a node that kept it.

The real order: pam_slurm_adopt runs in sshd's account phase and puts a login of a user with
a job into the job's extern step; pam_systemd runs later, in the session phase, and moves the
login into a logind session scope -- out of the job -- and starts the user's
`systemd --user` (user@UID.service). So every login ends up outside any job:
- with the shipped whitelist.sshd: true, the login itself is whitelisted (an ssh session
  under the root sshd), and only the `systemd --user` manager is a stray: killed for a user
  without a job, adopted into the job of a user with one;
- with whitelist.sshd: false (README: for nodes that must only be reached through
  pam_slurm_adopt), the login of the user without a job is a stray and killed, and the login
  of the user with a job is adopted back into that job, not killed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import Daemon
from vmlib import (
    LONG,
    RESULTS,
    Proc,
    alive,
    by_argv0,
    in_job_dir,
    job_dir_of,
    journal_after,
    journal_cursor,
    procs,
    pruned_scan,
    read_proc,
    sbatch,
    sh,
    ssh_popen,
    wait_for,
    wait_procs,
    wait_running,
)

PAM = Path("/etc/pam.d/sshd")
NO_SSHD = Path("/etc/pruned/policy.d/65-vm-no-sshd-whitelist.yaml")


def uid_of(user: str) -> int:
    return int(sh("id", "-u", user).stdout)


def managers(uid: int) -> list[Proc]:
    return [p for p in procs() if p.uid == uid and f"/user@{uid}.service" in p.cgroup_path
            and p.comm == "systemd"]


def pruned_records(cursor: str, event: str, uid: int) -> list[dict]:
    return journal_after(cursor, SYSLOG_IDENTIFIER="pruned", _SYSTEMD_UNIT="pruned.service",
                         PRUNED_EVENT=event, PRUNED_UID=str(uid))


def has_record(recs: list[dict], p: Proc) -> bool:
    return any(str(p.pid) == r.get("PRUNED_PID") or str(p.pid) in r.get("PRUNED_TREE", "").split()
               for r in recs)


class Logins:
    def __init__(self) -> None:
        self.job = ""
        self.job_dir = ""
        self.ivan: Proc
        self.judy: Proc
        self.ivan_uid = uid_of("ivan")
        self.judy_uid = uid_of("judy")
        self.cursor = ""
        self.scan: dict = {}


@pytest.fixture(scope="module")
def logins(enforcing: Daemon):
    s = Logins()
    s.job = sbatch("judy", f"#!/bin/bash\nexec -a vm_judy_job sleep {LONG}\n")
    wait_running(s.job)
    s.job_dir = job_dir_of(wait_procs("vm_judy_job")[0])
    saved = PAM.read_text()
    PAM.write_text(saved.replace("@include common-session-sshd", "@include common-session"))
    try:
        s.cursor = journal_cursor()
        ssh_popen("ivan", f"exec -a vm_ivan_ssh sleep {LONG}", RESULTS / "ssh-ivan.log")
        ssh_popen("judy", f"exec -a vm_judy_ssh sleep {LONG}", RESULTS / "ssh-judy.log")
        s.ivan = wait_procs("vm_ivan_ssh")[0]
        s.judy = wait_procs("vm_judy_ssh")[0]
        scan = pruned_scan()
        s.scan = {name: scan.of(p) for name, p in (("ivan", s.ivan), ("judy", s.judy))}
        yield s
    finally:
        PAM.write_text(saved)
        if NO_SSHD.exists():
            NO_SSHD.unlink()
            sh("systemctl", "reload", "pruned.service", timeout=120)


def test_pam_systemd_moves_logins_out_of_the_job(logins: Logins) -> None:
    for user, p in (("ivan", logins.ivan), ("judy", logins.judy)):
        uid = logins.ivan_uid if user == "ivan" else logins.judy_uid
        assert f"/user.slice/user-{uid}.slice/session-" in p.cgroup_path, p.label()
        assert "slurmstepd.scope" not in p.cgroup_path, p.label()


def test_by_default_the_logins_are_whitelisted_ssh_sessions(logins: Logins) -> None:
    for user, rec in logins.scan.items():
        assert (rec["class"], rec["rule"]) == ("whitelisted", "whitelist.sshd"), (user, rec)


def test_systemd_user_of_a_user_without_a_job_is_killed(logins: Logins) -> None:
    recs = wait_for("ivan's systemd --user killed", lambda: pruned_records(
        logins.cursor, "process_killed", logins.ivan_uid), timeout=90)
    assert any(r["PRUNED_COMM"] == "systemd" and r["PRUNED_CLASS"] == "stray" for r in recs), recs
    wait_for("ivan's manager gone", lambda: not managers(logins.ivan_uid), timeout=60)
    assert alive(logins.ivan)  # the whitelisted login itself stays


def test_systemd_user_of_a_user_with_a_job_is_adopted(logins: Logins) -> None:
    def manager_handled() -> tuple[list[dict], list[dict]] | None:
        done = [r for r in pruned_records(logins.cursor, "process_adopted", logins.judy_uid)
                if r["PRUNED_COMM"] == "systemd"]
        failed = [r for r in pruned_records(logins.cursor, "adopt_failed", logins.judy_uid)
                  if r["PRUNED_COMM"] == "systemd"]
        return (done, failed) if done or failed else None

    done, failed = wait_for("the daemon's adoption of judy's systemd --user", manager_handled,
                            timeout=90)
    assert alive(logins.judy)
    if not done:
        # systemd 257 and 262 (trixie, forky): the kernel refuses to move the user manager
        # out of user@UID.service (EPERM, also for root). actions.adopt_failure (default
        # ignore) is then applied once: one adopt_failed record, no retry on later sweeps.
        assert all("Operation not permitted" in r["MESSAGE"] for r in failed), failed
        assert all(r.get("PRUNED_ADOPT_FAILURE") == "ignore" for r in failed), failed
        time.sleep(20)  # four sweeps of the VM policy (schedule.sweep: 5s)
        again = [r for r in pruned_records(logins.cursor, "adopt_failed", logins.judy_uid)
                 if r["PRUNED_COMM"] == "systemd"]
        assert len({r["PRUNED_PID"] for r in again}) == len(again), again  # once per process
        assert managers(logins.judy_uid), "adopt_failure: ignore must leave it running"
        return
    assert done, failed
    assert all(r["PRUNED_JOB_ID"] in (logins.job, logins.job_dir) for r in done), done


def test_without_the_sshd_whitelist_login_killed_or_adopted(logins: Logins) -> None:
    cursor = journal_cursor()
    NO_SSHD.write_text("version: 1\nwhitelist:\n  sshd: false\n")
    sh("systemctl", "reload", "pruned.service", timeout=120)
    wait_for("ivan's login killed", lambda: not alive(logins.ivan), timeout=90)
    # The record follows the kill: it is written once the whole tree is gone (or the grace
    # ran out), and journald takes its time under TCG.
    wait_for("the process_killed record of ivan's login", lambda: has_record(
        pruned_records(cursor, "process_killed", logins.ivan_uid), logins.ivan), timeout=60)
    wait_for("judy's login adopted into her job", lambda: (p := read_proc(logins.judy.pid))
             and in_job_dir(p, logins.job_dir), timeout=90)
    assert alive(logins.judy)
    wait_for("the process_adopted record of judy's login", lambda: has_record(
        pruned_records(cursor, "process_adopted", logins.judy_uid), logins.judy), timeout=60)
    assert not by_argv0("vm_ivan_ssh")
