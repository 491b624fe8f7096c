"""jobs.slurmpath: cgroup lines -> job ids and memberships, the one grammar (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pruned.jobs.slurmpath import (
    is_sluid,
    job_ids_in,
    job_of_stepd_argv,
    membership_from_cgroups,
    membership_of,
    not_understood,
    parse_slurm_cgroup_path,
    slurm_lines,
)
from pruned.model import Membership
from tests.unit.test_classify import P

V2 = "0::/system.slice/node01_slurmstepd.scope"
V1 = "4:freezer:/slurm_node01/uid_1007"


def test_membership_prefers_a_step_over_the_job_level() -> None:
    lines = (f"{V1}/job_9", "5:cpu:/slurm_node01/uid_1007/job_9/step_batch", "0::/user.slice")
    assert membership_of(lines) == Membership("9", "batch", lines[1], False)
    assert membership_of((f"{V1}/job_9",)) == Membership("9", None, f"{V1}/job_9", False)


def test_membership_of_a_stepd_slot_and_of_nothing() -> None:
    line = f"{V2}/job_44/step_0/slurm"
    assert membership_of((line,)) == Membership("44", "0", line, True)
    assert membership_of(("0::/user.slice/user-1007.slice/session-3.scope",)) is None
    assert membership_of(()) is None


def test_job_ids_and_lines() -> None:
    lines = (f"{V1}/job_9/step_0/task_1", f"{V2}/job_44/step_extern/user", "1:name=x:/")
    assert job_ids_in(lines) == {"9", "44"}
    assert [(line, sp.job_id) for line, sp in slurm_lines(lines)] == [
        (lines[0], "9"),
        (lines[1], "44"),
    ]


def test_membership_from_cgroups_reads_each_process_own_lines() -> None:
    a = replace(P(10, 1, 1007, "a"), cgroups=(f"{V2}/job_5/step_batch/user",))
    b = P(11, 1, 1007, "b")
    got = membership_from_cgroups([a, b])
    assert set(got) == {10} and got[10].job_id == "5" and got[10].step == "batch"


# ------------------------------------------------------------------ the grammar on v2 layouts

SCOPE = "/system.slice/vmnode_slurmstepd.scope"


@pytest.mark.parametrize(
    ("line", "job", "step", "task", "stepd", "sluid"),
    [
        # 22.05: every user process in task_special
        (f"0::{SCOPE}/job_1/step_batch/user/task_special", "1", "batch", "special", False, False),
        (f"0::{SCOPE}/job_1/step_extern/user/task_special", "1", "extern", "special", False, False),
        (f"0::{SCOPE}/job_1/step_0/slurm", "1", "0", None, True, False),
        # 24.11: task_N
        (f"0::{SCOPE}/job_1/step_0/user/task_0", "1", "0", "0", False, False),
        # 26.05: job dirs named by SLUID (unless CgroupJobIdPaths=yes)
        (f"0::{SCOPE}/s6T9M8T79NSN00/step_batch/user/task_0", "s6T9M8T79NSN00", "batch", "0", False, True),  # noqa: E501
        (f"0::{SCOPE}/s6T9M8T79NSN00/step_extern/slurm", "s6T9M8T79NSN00", "extern", None, True, True),  # noqa: E501
        # CgroupSlice (25.11+): another slice, nested slices, no node prefix
        ("0::/slurm.slice/slurmstepd.scope/job_7/step_0/user/task_3", "7", "0", "3", False, False),
        ("0::/hpc.slice/hpc-jobs.slice/n1_slurmstepd.scope/job_7/step_batch", "7", "batch", None, False, False),  # noqa: E501
    ],
)
def test_v2_layouts_of_the_three_releases(line, job, step, task, stepd, sluid) -> None:
    sp = parse_slurm_cgroup_path(line)
    assert sp is not None, line
    assert (sp.version, sp.job_id, sp.step, sp.task, sp.stepd, sp.sluid) == (
        2, job, step, task, stepd, sluid,
    )  # fmt: skip
    assert not not_understood(line)


@pytest.mark.parametrize(
    "line",
    [
        # a look-alike tree in a subtree systemd delegates to a user: never a job's
        "0::/user.slice/user-1007.slice/user@1007.service/app.slice/slurmstepd.scope/job_1/step_0/user/task_0",
        "0::/user.slice/user-1007.slice/session-4.scope/slurm/uid_1007/job_1/step_0",
        "1:name=systemd:/user.slice/user-1007.slice/user@1007.service/slurm/uid_1007/job_1",
        # not SLUIDs: wrong length, a letter Crockford base32 leaves out (I, L, O, U)
        f"0::{SCOPE}/s6T9M8T79NSN0/step_0/user/task_0",
        f"0::{SCOPE}/s6T9M8T79NSNU0/step_0/user/task_0",
    ],
)
def test_look_alikes_are_not_jobs(line) -> None:
    assert parse_slurm_cgroup_path(line) is None


@pytest.mark.parametrize(
    ("line", "doubt"),
    [
        (f"0::{SCOPE}/system", False),  # the scope's keeper stepd
        (f"0::{SCOPE}", False),
        ("4:freezer:/slurm_vm", False),
        ("4:freezer:/slurm_vm/uid_1007", False),
        ("4:freezer:/slurm_vm/system", False),
        ("0::/system.slice/slurmd.service", False),  # not Slurm's job tree at all
        ("0::/user.slice/user-1007.slice/session-4.scope", False),
        # inside Slurm's trees, but no layout the grammar knows: doubt
        (f"0::{SCOPE}/job_1/step_0/user/task_0/sub", True),
        (f"0::{SCOPE}/s6T9M8T79NSN0/step_0", True),
        (f"0::{SCOPE}/jobs", True),
        (f"0::{SCOPE}/job_1/step_0/other", True),
        ("4:freezer:/slurm_vm/uid_1007/job_x", True),
        ("4:freezer:/slurm_vm/uid_1007/job_9/step_0/task_1/deeper", True),
    ],
)
def test_not_understood(line, doubt) -> None:
    assert not_understood(line) is doubt
    if doubt:
        m = membership_of(["0::/user.slice", line])
        assert m == Membership("", None, line, understood=False)
        assert job_ids_in([line]) == {f"?{line}"}


def test_sluid_and_stepd_argv() -> None:
    assert is_sluid("s6T9M8T79NSN00") and is_sluid("sEKNKTV3WPV500")
    assert not is_sluid("s6T9M8T79NSN0") and not is_sluid("S6T9M8T79NSN00") and not is_sluid("")
    assert job_of_stepd_argv(b"slurmstepd: [17.batch]\0") == "17"
    assert job_of_stepd_argv(b"slurmstepd: [17.extern]") == "17"
    assert job_of_stepd_argv(b"slurmstepd: [123+1.0]") == "123"
    assert job_of_stepd_argv(b"slurmstepd: [system]") is None
    assert job_of_stepd_argv(b"sleep\x00600") is None and job_of_stepd_argv(b"") is None
