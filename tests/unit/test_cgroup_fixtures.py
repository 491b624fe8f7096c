"""The one path grammar on /proc/PID/cgroup lines captured from real nodes of each release.

tests/fixtures/cgroup_paths/<release>.txt are written by the VM lane (tests/vm): every
process of a running job, a crashed job's leftovers, the daemons and processes outside
Slurm, with the role each plays; and every cgroup directory of the stepd scope.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pruned.jobs.slurmpath import membership_of, not_understood, parse_slurm_cgroup_path
from tests.fixtures.paths import REPO

FIXTURES = REPO / "tests" / "fixtures" / "cgroup_paths"
RELEASES = sorted(p.stem for p in FIXTURES.glob("*.txt"))

# role -> (step, stepd slot) the grammar must find; None: not inside a job
IN_JOB = {
    "batch_script": ("batch", False),
    "batch_srun": ("batch", False),
    "batch_sleep": ("batch", False),
    "job_daemon": ("batch", False),  # double-forked, ppid 1, still in the step's cgroup
    "srun_task": ("0", False),
    "stepd": (None, True),
    "extern_task": ("extern", False),
    "ssh_priv": ("extern", False),  # adopted by pam_slurm_adopt
    "ssh_session": ("extern", False),
    "ssh_command": ("extern", False),
    "ssh_daemon": ("extern", False),
    "crash_left": ("batch", False),
    "crash_root_left": ("extern", False),
}
OUTSIDE = {
    "scope_keeper", "sshd_listener", "slurmd", "slurmctld", "stray_outside", "admin_priv",
    "admin_session", "admin_command",
    # systemd's escape routes: a lingering user's manager and its units, a login that
    # bypassed pam_slurm_adopt and stayed in ssh.service
    "systemd_user", "linger_manager", "linger_unit", "bypass_session", "bypass_command",
    "bypass_daemon",
}  # fmt: skip


def rows(release: str) -> list[list[str]]:
    lines = (FIXTURES / f"{release}.txt").read_text().splitlines()
    return [ln.split("\t") for ln in lines if ln and not ln.startswith("#")]


def test_every_release_is_captured() -> None:
    assert set(RELEASES) == {"bookworm", "trixie", "forky"}


@pytest.mark.parametrize("release", RELEASES)
def test_every_captured_process_line(release: str) -> None:
    seen = set()
    for row in rows(release):
        if row[0] == "dir":
            continue
        role, _user, _comm, line = row
        seen.add(role)
        sp = parse_slurm_cgroup_path(line)
        assert not not_understood(line), (role, line)
        if role in OUTSIDE:
            assert sp is None and membership_of([line]) is None, (role, line)
            continue
        assert role in IN_JOB, f"unknown role {role} in {release}.txt"
        step, stepd = IN_JOB[role]
        assert sp is not None, (role, line)
        assert (sp.step if not stepd else None, sp.stepd) == (step, stepd), (role, line)
        m = membership_of([line])
        assert m is not None and m.understood and m.job_id == sp.job_id
    assert {"batch_script", "srun_task", "stepd", "ssh_session", "scope_keeper"} <= seen


@pytest.mark.parametrize("release", RELEASES)
def test_every_captured_cgroup_dir_is_understood(release: str) -> None:
    dirs = [row[1] for row in rows(release) if row[0] == "dir"]
    assert dirs, f"{release}.txt has no cgroup dirs"
    for d in dirs:
        assert not not_understood(f"0::{d}"), d
    jobs = {sp.job_id for d in dirs if (sp := parse_slurm_cgroup_path(f"0::{d}"))}
    assert len(jobs) >= 2  # the running job and the crashed one


def test_fixture_files_are_tab_separated() -> None:
    for release in RELEASES:
        for row in rows(release):
            assert len(row) == (2 if row[0] == "dir" else 4), (release, row)
    assert Path(FIXTURES).is_dir()
