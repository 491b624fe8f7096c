"""Job knowledge without real cgroups: path parsing, the state-dir source, merging."""

from __future__ import annotations

import json
import os

import pytest

from pruned.jobs.slurmpath import SlurmPath, parse_slurm_cgroup_path
from pruned.jobs.source import read_jobs
from pruned.jobs.statedir import (
    StateDirSource,
    end_job_record,
    job_record_path,
    prune_job_records,
    write_job_record,
)
from pruned.model import Job, JobView, Membership

V2 = "system.slice/slurmstepd.scope"
V2N = "system.slice/node01_slurmstepd.scope"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        # v1, whatever the root is called
        ("/slurm/uid_1000/job_5", SlurmPath(1, "slurm", "5", 1000, None)),
        ("/slurm_vm/uid_1007/job_9/step_batch", SlurmPath(1, "slurm_vm", "9", 1007, "batch")),
        (
            "/slurm_node01/uid_1/job_12/step_extern/",
            SlurmPath(1, "slurm_node01", "12", 1, "extern"),
        ),
        ("/slurm_vm/uid_1007/job_9/step_0/task_3", SlurmPath(1, "slurm_vm", "9", 1007, "0", "3")),
        (
            "6:freezer:/slurm_vm/uid_1007/job_9/step_batch",
            SlurmPath(1, "slurm_vm", "9", 1007, "batch"),
        ),
        ("freezer:/slurm_vm/uid_7/job_9", SlurmPath(1, "slurm_vm", "9", 7, None)),
        (
            "/sys/fs/cgroup/cpuset/slurm_vm/uid_7/job_9/step_1",
            SlurmPath(1, "slurm_vm", "9", 7, "1"),
        ),
        # v2, with and without the node prefix
        (f"/{V2}/job_9", SlurmPath(2, V2, "9", None, None)),
        (f"/{V2}/job_9/step_batch", SlurmPath(2, V2, "9", None, "batch")),
        (f"/{V2}/job_9/step_batch/user", SlurmPath(2, V2, "9", None, "batch")),
        (f"/{V2}/job_9/step_0/user/task_2", SlurmPath(2, V2, "9", None, "0", "2")),
        (f"/{V2}/job_9/step_extern/slurm", SlurmPath(2, V2, "9", None, "extern", None, True)),
        (f"0::/{V2N}/job_44/step_0/user/task_0", SlurmPath(2, V2N, "44", None, "0", "0")),
        (f"/{V2N}/job_44/step_batch/slurm", SlurmPath(2, V2N, "44", None, "batch", None, True)),
        # not a job
        ("/", None),
        ("/user.slice/user-1000.slice/session-3.scope", None),
        ("/system.slice/slurmd.service", None),
        (f"/{V2}/system", None),
        (f"/{V2}/job_9/step_0/slurm/task_0", None),  # tasks live under user/, never slurm/
        ("/slurm_vm/uid_1007", None),
        ("/slurm_vm/system", None),
        ("/slurm_vm/uid_x/job_9", None),
        ("/slurm_vm/uid_1/job_9/step_0/task_0/extra", None),
        ("/myslurm/uid_1/job_2", None),  # the root must *start* with slurm
        ("/notslurm_vm/uid_1/job_2", None),
        ("4:memory:/user.slice", None),
    ],
)
def test_parse_slurm_cgroup_path(path: str, want: SlurmPath | None) -> None:
    assert parse_slurm_cgroup_path(path) == want


# ------------------------------------------------------------------ the walker on a fake tree


def _procs(path, *pids: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))


def test_walker_on_a_plain_directory_tree(tmp_path) -> None:
    """The tree walk over plain files: controllers found by their cgroup.procs, symlinks skipped."""
    me = os.getpid()  # a live process that is not a stepd
    _procs(tmp_path / "freezer")
    _procs(tmp_path / "freezer/slurm_x/uid_5/job_7/step_batch", me)
    _procs(tmp_path / "freezer/slurm_x/uid_5/job_8")
    (tmp_path / "cpu").symlink_to(tmp_path / "freezer")  # read once, like cpu -> cpu,cpuacct
    (tmp_path / "junk").mkdir()  # no cgroup.procs: not a hierarchy
    _procs(tmp_path / "junk/slurm_y/uid_5/job_99", me)
    from pruned.jobs.slurm import SlurmCgroupSource

    view = SlurmCgroupSource(
        cgroup_root=str(tmp_path), stepd_paths=("/nonexistent",), find_outside_stepds=False,
        slurmd_paths=(os.readlink("/proc/self/exe"),), slurmd_pidfiles=(),
    ).read()  # fmt: skip
    # The test process itself (python, as root) plays slurmd when we are root.
    assert set(view.jobs) == {"7", "8"}
    assert view.membership == {
        me: Membership("7", "batch", "freezer:/slurm_x/uid_5/job_7/step_batch")
    }
    assert not view.jobs["7"].running and not view.jobs["8"].running
    assert "no live slurmstepd" in view.jobs["7"].why_not_running
    assert "no processes" in view.jobs["8"].why_not_running
    if os.geteuid() == 0:
        assert view.problems == ()


def test_a_job_like_cgroup_the_grammar_does_not_know_is_doubt_not_a_stray(tmp_path) -> None:
    """A dir in Slurm's tree that is no known layout: a problem naming it (report-only), and its
    processes are members that are not understood (never strays)."""
    parent = os.getppid()  # alive, and nobody's stepd
    _procs(tmp_path / "freezer")
    _procs(tmp_path / "freezer/slurm_x/uid_5/job_notanumber/step_0", parent)
    from pruned.jobs.slurm import SlurmCgroupSource

    view = SlurmCgroupSource(
        cgroup_root=str(tmp_path), stepd_paths=("/nonexistent",), find_outside_stepds=False,
        slurmd_paths=(), slurmd_pidfiles=(),
    ).read()  # fmt: skip
    assert view.jobs == {}
    assert view.membership == {
        parent: Membership("", None, "freezer:/slurm_x/uid_5/job_notanumber", understood=False)
    }
    assert view.problems == (
        "cgroup /slurm_x/uid_5/job_notanumber is in Slurm's tree but not a layout pruned knows:"
        " its processes are left alone",
    )


def test_garbage_in_cgroup_procs_is_a_problem_line(tmp_path) -> None:
    _procs(tmp_path / "freezer")
    d = tmp_path / "freezer/slurm_x/uid_5/job_7"
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("12 banana\n")
    from pruned.jobs.slurm import SlurmCgroupSource

    view = SlurmCgroupSource(cgroup_root=str(tmp_path), find_outside_stepds=False).read()
    assert len(view.problems) == 1 and "slurm_x" in view.problems[0]


# ------------------------------------------------------------------ state-dir source


def test_prolog_and_epilog_records(tmp_path) -> None:
    sd = str(tmp_path / "state")
    path = write_job_record(sd, "123", 30001, 1000.0, user="pool001")
    assert path == os.path.join(sd, "jobs", "123.json")
    assert os.stat(sd).st_mode & 0o777 == 0o700
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600
    write_job_record(sd, "124.0", 30002, 1001.0)
    view = StateDirSource(sd).read()
    assert view.problems == () and view.sources == ("statedir",)
    assert view.jobs["123"] == Job("123", 30001, 1000.0, "statedir", True, user="pool001")
    assert view.running_for(30002)[0].job_id == "124.0"
    assert end_job_record(sd, "123", 2000.0)
    job = StateDirSource(sd).read().jobs["123"]
    assert not job.running and "2000" in job.why_not_running
    # A second epilog keeps the first end.
    assert end_job_record(sd, "123", 3000.0)
    with open(path) as f:
        assert json.load(f)["end"] == 2000.0
    # No record and no uid: nothing to do; with a uid the record is made, already ended.
    assert not end_job_record(sd, "555", 10.0)
    assert end_job_record(sd, "555", 10.0, uid=30003)
    assert StateDirSource(sd).read().jobs["555"].running is False
    assert prune_job_records(sd, older_than=2500.0) == 2  # 123 and 555, not the running 124.0
    assert set(StateDirSource(sd).read().jobs) == {"124.0"}


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 65, "9 1"])
def test_job_ids_must_be_plain_names(tmp_path, bad: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        write_job_record(str(tmp_path), bad, 1, 0.0)
    with pytest.raises(ValueError):
        job_record_path(str(tmp_path), bad)


def test_corrupt_records_are_named_problems(tmp_path) -> None:
    sd = str(tmp_path)
    os.chmod(sd, 0o700)
    write_job_record(sd, "1", 30001, 5.0)
    jobs = tmp_path / "jobs"
    for name, text in {
        "2.json": "{not json",
        "3.json": json.dumps({"uid": "root", "start": 1}),
        "4.json": json.dumps({"job_id": "5", "uid": 1, "start": 1}),
        "6.json": json.dumps([1, 2]),
        "7.json": json.dumps({"uid": 1, "start": 1, "end": "soon"}),
    }.items():
        (jobs / name).write_text(text)
        os.chmod(jobs / name, 0o600)
    (jobs / ".8.json.tmp.1.2").write_text("{half")  # a writer's tmp file: ignored
    (jobs / "README").write_text("ignored")
    view = StateDirSource(sd).read()
    assert set(view.jobs) == {"1"}
    assert len(view.problems) == 5
    for n, word in (
        ("2", "Expecting"),
        ("3", "uid"),
        ("4", "match"),
        ("6", "object"),
        ("7", "end"),
    ):
        line = next(p for p in view.problems if f"/jobs/{n}.json:" in p)
        assert "corrupt job record" in line and word in line, line


def test_state_dir_must_exist_and_be_private(tmp_path) -> None:
    view = StateDirSource(str(tmp_path / "none")).read()
    assert view.jobs == {} and len(view.problems) == 1 and "none" in view.problems[0]
    os.chmod(tmp_path, 0o700)
    view = StateDirSource(str(tmp_path)).read()
    assert "pruned prolog" in view.problems[0]  # no jobs/ yet
    write_job_record(str(tmp_path), "1", 30001, 5.0)
    os.chmod(tmp_path / "jobs", 0o777)  # anyone could forge a running job
    view = StateDirSource(str(tmp_path)).read()
    assert view.jobs == {} and "writable by group or others" in view.problems[0]
    os.chmod(tmp_path / "jobs", 0o700)
    os.chmod(tmp_path / "jobs" / "1.json", 0o666)
    view = StateDirSource(str(tmp_path)).read()
    assert view.jobs == {} and "1.json" in view.problems[0]


# ------------------------------------------------------------------ merging


class _Fixed:
    def __init__(self, name: str, view: JobView | Exception) -> None:
        self.name, self._view = name, view

    def read(self) -> JobView:
        if isinstance(self._view, Exception):
            raise self._view
        return self._view


def _job(job_id: str, uid: int | None, running: bool, source: str) -> Job:
    return Job(job_id, uid, 1.0, source, running)


def test_read_jobs_merges_sources() -> None:
    m9 = Membership("9", "batch", "freezer:/slurm_vm/uid_5/job_9/step_batch")
    slurm = JobView(
        jobs={"9": _job("9", 5, False, "slurm"), "10": _job("10", 5, True, "slurm")},
        membership={100: m9},
    )
    state = JobView(
        jobs={
            "9": _job("9", 5, True, "statedir"),  # same uid: the running copy wins
            "10": _job("10", 7, True, "statedir"),  # pool account of the pilot's job: kept too
            "11": _job("11", 6, True, "statedir"),
        },
        membership={100: Membership("x", None, "bogus")},
    )
    view = read_jobs([_Fixed("slurm", slurm), _Fixed("statedir", state)])
    assert view.healthy and view.sources == ("slurm", "statedir")
    assert view.jobs["9"].source == "statedir" and view.jobs["9"].running
    assert view.jobs["10"].uid == 5 and view.jobs["10@statedir"].uid == 7
    assert view.jobs["10@statedir"].job_id == "10"
    assert view.running_for(7)[0].job_id == "10"
    assert view.membership == {100: m9}


def test_read_jobs_carries_problems_and_failures() -> None:
    bad = JobView(jobs={}, membership={}, problems=("cgroup root /x: No such file or directory",))
    view = read_jobs(
        [
            _Fixed("slurm", bad),
            _Fixed("statedir", RuntimeError("boom")),
            _Fixed("ok", JobView({}, {})),
        ]
    )
    assert not view.healthy
    assert view.problems == (
        "slurm: cgroup root /x: No such file or directory",
        "statedir: job source failed: RuntimeError: boom",
    )


def test_read_jobs_keeps_the_sluid_aliases() -> None:
    """26.05's SLUID -> job id map survives the merge: the event path and reverify see the
    SLUID in /proc/PID/cgroup and must find the running job by it."""
    view = JobView(
        {"9": _job("9", 30001, True, "slurm")}, {}, sources=("slurm",),
        aliases={"s6T9M8T79NSN00": "9"},
    )  # fmt: skip
    merged = read_jobs([_Fixed("slurm", view)])
    assert merged.aliases == {"s6T9M8T79NSN00": "9"}
    assert merged.job("s6T9M8T79NSN00") is view.jobs["9"]
