"""JobHistory: transitions, epilog marks, crash-safe persistence, permissions."""

from __future__ import annotations

import json
import os
import time

from pruned.jobs.history import HISTORY_FILE, IDLE_GRACE, JOURNAL_FILE, JobHistory, JobRecord
from pruned.linux.atomic import write_json_atomic
from pruned.model import Job, JobView


def _view(*jobs: Job, problems: tuple[str, ...] = ()) -> JobView:
    return JobView(jobs={j.job_id: j for j in jobs}, membership={}, problems=problems)


def _job(job_id: str, uid: int | None = 30001, running: bool = True, start: float = 100.0) -> Job:
    return Job(job_id, uid, start, "slurm", running)


def test_observe_records_and_ends_jobs(tmp_path) -> None:
    h = JobHistory.load(str(tmp_path / "state"))
    assert h.records() == [] and h.problems == []
    assert h.observe(_view(_job("1"), _job("2", uid=30002, start=150.0)), now=200.0) == []
    assert [r.job_id for r in h.records()] == ["1", "2"]
    assert h.ended() == [] and h.last_end_for(30001) is None
    # Job 1 is now present but not running (between steps, or a crashed step): idle, not
    # ended; job 2 still runs.
    assert h.observe(_view(_job("1", running=False), _job("2", uid=30002)), now=300.0) == []
    assert h.get("1").end is None
    # Idle past the grace: ended, at the time it was first seen idle.
    later = 300.0 + IDLE_GRACE
    ended = h.observe(_view(_job("1", running=False), _job("2", uid=30002)), now=later)
    assert ended == [JobRecord("1", 30001, 100.0, 300.0, None, "slurm")]
    # Job 2 is gone from the view altogether: its cgroup is gone, it ended now.
    got = h.observe(_view(), now=later + 100)
    assert got == [JobRecord("2", 30002, 150.0, later + 100, None, "slurm")]
    assert [r.job_id for r in h.ended()] == ["1", "2"]
    assert h.last_end_for(30001) == 300.0 and h.last_end_for(30002) == later + 100
    assert h.observe(_view(), now=later + 200) == []  # ending is reported once


def test_a_job_between_steps_is_idle_not_ended(tmp_path) -> None:
    """Without PrologFlags=contain a running allocation has its cgroup and no stepd between
    two steps: it must not be recorded ended (its job dirs would go)."""
    h = JobHistory(str(tmp_path))
    h.observe(_view(_job("4")), now=0.0)
    for t in (10.0, 100.0, IDLE_GRACE - 1):  # no stepd for most of the grace
        assert h.observe(_view(_job("4", running=False)), now=t) == []
    assert h.observe(_view(_job("4")), now=IDLE_GRACE) == []  # the next step starts
    assert h.observe(_view(_job("4", running=False)), now=IDLE_GRACE + 10) == []
    assert h.get("4").end is None


def test_a_job_first_seen_idle_ends_after_the_grace(tmp_path) -> None:
    """A job whose slurmstepds died before pruned ever saw it run (a crash right after its
    start, or while pruned was down) is recorded when first seen idle and ends after the
    grace like any idle job: its directories must not be left forever. An ended job's
    lingering cgroup does not start it over; a job of unknown uid waits, as a running one."""
    h = JobHistory(str(tmp_path))
    assert h.observe(_view(_job("9", running=False, start=50.0)), now=100.0) == []
    assert h.get("9") == JobRecord("9", 30001, 50.0, None, None, "slurm")
    ended = h.observe(_view(_job("9", running=False)), now=100.0 + IDLE_GRACE)
    assert ended == [JobRecord("9", 30001, 50.0, 100.0, None, "slurm")]
    assert h.observe(_view(_job("9", running=False)), now=200.0 + 2 * IDLE_GRACE) == []
    assert h.get("9").end == 100.0
    h.observe(_view(_job("10", uid=None, running=False)), now=1.0)
    assert h.get("10") is None


def test_a_26_05_job_whose_stepds_died_is_idle_under_its_sluid_not_ended(tmp_path) -> None:
    """Slurm 26.05 names the job's cgroup by SLUID; the view calls it by its number only while
    a stepd states it. When the stepds die the view shows the SLUID: that is job 9 idle (it
    ends after the grace), not job 9 gone -- between steps without PrologFlags=contain its
    dirs would otherwise go at once -- and not a new job of its own."""
    sluid = "s0123456789ABC"
    h = JobHistory(str(tmp_path))
    running = JobView(jobs={"9": _job("9")}, membership={}, aliases={sluid: "9"})
    h.observe(running, now=10.0)
    idle = _view(Job(sluid, 30001, 100.0, "slurm", False))
    assert h.observe(idle, now=20.0) == []
    assert h.get("9").end is None and h.get(sluid) is None
    assert h.observe(running, now=30.0) == []  # the next step's stepd: running again
    assert h.observe(idle, now=40.0) == []
    ended = h.observe(idle, now=40.0 + IDLE_GRACE)
    assert [(r.job_id, r.end) for r in ended] == [("9", 40.0)]
    assert h.observe(idle, now=50.0 + 2 * IDLE_GRACE) == []  # its cgroup lingers: no new job
    assert h.get(sluid) is None


def test_a_26_05_job_crashed_before_its_owner_was_seen_is_recorded_by_number(tmp_path) -> None:
    """Found on the forky VM: the only look at job 4 while its stepd ran came before its
    owner's first process (uid unknown: nothing recorded), then the stepds died. Its cgroup
    is the SLUID's, its directories the number's: the alias the stepd stated is kept while
    that cgroup is in the view (prune included), and the job, first seen idle with its
    owner's leftover in it, is recorded as job 4, so it ends and its dirs are cleaned."""
    sluid = "s3T9M8W20JVT00"
    h = JobHistory(str(tmp_path))
    early = JobView(jobs={"4": _job("4", uid=None)}, membership={}, aliases={sluid: "4"})
    h.observe(early, now=10.0)
    assert h.get("4") is None
    h.prune(older_than=10.0)  # the refresh's housekeeping: the alias stays
    crashed = _view(Job(sluid, 30001, 100.0, "slurm", False))
    assert h.observe(crashed, now=20.0) == []
    assert h.get("4") == JobRecord("4", 30001, 100.0, None, None, "slurm")
    assert h.get(sluid) is None
    # The leftover killed: an empty cgroup names no owner; job 4 ends after the grace.
    empty = _view(Job(sluid, None, 100.0, "slurm", False))
    ended = h.observe(empty, now=20.0 + IDLE_GRACE)
    assert [(r.job_id, r.end) for r in ended] == [("4", 20.0)]
    # An alias whose cgroup left the view and that names no record is let go.
    other = JobView(jobs={"5": _job("5", uid=None)}, membership={}, aliases={"s5": "5"})
    h.observe(other, now=30.0)
    h.observe(_view(), now=31.0)
    h.prune(older_than=0.0)
    assert "5" not in h._sluid


def test_a_view_with_problems_never_ends_jobs(tmp_path) -> None:
    h = JobHistory(str(tmp_path))
    h.observe(_view(_job("1")), now=1.0)
    assert h.observe(_view(problems=("slurm: cannot read",)), now=2.0) == []
    assert h.get("1").end is None
    # It still records newly seen running jobs.
    h.observe(_view(_job("3"), problems=("x",)), now=3.0)
    assert h.get("3") is not None


def test_unknown_uid_waits_and_reused_ids_start_over(tmp_path) -> None:
    h = JobHistory(str(tmp_path))
    h.observe(_view(_job("7", uid=None)), now=1.0)
    assert h.get("7") is None  # a v2 job whose uid is not known yet
    h.observe(_view(_job("7", uid=30001, start=5.0)), now=10.0)
    h.observe(_view(), now=20.0)
    assert h.get("7").end == 20.0
    h.observe(_view(_job("7", uid=30009, start=50.0)), now=60.0)  # the id came back: a new job
    assert h.get("7") == JobRecord("7", 30009, 50.0, None, None, "slurm")


def test_mark_ended(tmp_path) -> None:
    h = JobHistory(str(tmp_path))
    h.observe(_view(_job("1")), now=10.0)
    h.mark_ended("1", 30001, now=20.0)
    assert h.get("1").end == 20.0
    h.mark_ended("1", 30001, now=30.0)  # a later word keeps the first end
    assert h.get("1").end == 20.0
    h.mark_ended("2", 30002, now=40.0, start=35.0)  # never seen: the epilog's word is enough
    assert h.get("2") == JobRecord("2", 30002, 35.0, 40.0, None, "epilog")
    assert h.observe(_view(), now=50.0) == []  # already ended: not reported again
    assert h.prune(older_than=30.0) == 1
    assert [r.job_id for r in h.records()] == ["2"]


def test_save_and_load_round_trip_with_modes(tmp_path) -> None:
    sd = str(tmp_path / "state")
    h = JobHistory(sd)
    h.observe(_view(_job("1"), _job("2")), now=10.0)
    h.mark_ended("2", 30001, now=11.0)
    h.save()
    assert os.stat(sd).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(sd, HISTORY_FILE)).st_mode & 0o777 == 0o600
    again = JobHistory.load(sd)
    assert again.problems == [] and again.records() == h.records()
    assert sorted(os.listdir(sd)) == [JOURNAL_FILE, HISTORY_FILE]  # no tmp file left behind


def test_save_tightens_a_loose_state_dir(tmp_path) -> None:
    sd = tmp_path / "state"
    sd.mkdir(mode=0o755)
    os.chmod(sd, 0o755)
    JobHistory(str(sd)).save()
    assert os.stat(sd).st_mode & 0o777 == 0o700


def test_a_leftover_tmp_file_is_ignored_and_cleaned(tmp_path) -> None:
    sd = str(tmp_path)
    h = JobHistory(sd)
    h.observe(_view(_job("1")), now=10.0)
    h.save()
    # A writer that crashed before its rename left half a file.
    stale = os.path.join(sd, f".{HISTORY_FILE}.tmp.999.1")
    with open(stale, "w") as f:
        f.write('{"version": 1, "jobs": {"66": ')
    young = os.path.join(sd, f".{HISTORY_FILE}.tmp.998.2")
    with open(young, "w") as f:
        f.write("{")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    loaded = JobHistory.load(sd)
    assert loaded.problems == [] and [r.job_id for r in loaded.records()] == ["1"]
    loaded.remove_stale_tmp()  # the daemon's hourly housekeeping, and every compaction
    assert not os.path.exists(stale)  # an old leftover is removed
    assert os.path.exists(young)  # a young one may be a live writer's: kept


def test_corrupt_history_is_kept_and_reported(tmp_path) -> None:
    sd = str(tmp_path)
    path = os.path.join(sd, HISTORY_FILE)
    for junk in (
        b'{"version": 1, "jobs": {"1": {"uid"',
        b"\xff\xfe",
        b'{"version": 99, "jobs": {}}',
    ):
        for name in os.listdir(sd):
            os.unlink(os.path.join(sd, name))
        with open(path, "wb") as f:
            f.write(junk)
        h = JobHistory.load(sd)
        assert h.records() == []
        assert len(h.problems) == 1 and "corrupt" in h.problems[0], h.problems
        copies = [n for n in os.listdir(sd) if n.startswith(f"{HISTORY_FILE}.corrupt-")]
        assert len(copies) == 1 and copies[0] in h.problems[0]
        with open(os.path.join(sd, copies[0]), "rb") as f:
            assert f.read() == junk
        h.save()  # starting over works, and the copy stays for a human
        assert JobHistory.load(sd).problems == []
        assert os.path.exists(os.path.join(sd, copies[0]))


def test_a_bad_record_is_dropped_not_fatal(tmp_path) -> None:
    good = {"job_id": "1", "uid": 5, "start": 1.0, "end": None, "user": None, "source": "slurm"}
    write_json_atomic(
        os.path.join(tmp_path, HISTORY_FILE),
        {"version": 1, "jobs": {"1": good, "2": {**good, "job_id": "2", "uid": -3}}},
    )
    h = JobHistory.load(str(tmp_path))
    assert [r.job_id for r in h.records()] == ["1"]
    assert len(h.problems) == 1 and "'2'" in h.problems[0] and "uid" in h.problems[0]


def test_write_json_atomic_replaces_whole_files(tmp_path) -> None:
    path = os.path.join(tmp_path, "f.json")
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    with open(path) as f:
        assert json.load(f) == {"b": 2}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["f.json"]


def test_a_running_job_whose_uid_became_unknown_is_not_ended(tmp_path) -> None:
    """v2: an allocation with only the root extern sleep left has no uid, but still runs."""
    h = JobHistory(str(tmp_path))
    h.observe(JobView({"5": Job("5", 1001, 10.0, "slurm", True)}, {}), now=20.0)
    assert h.observe(JobView({"5": Job("5", None, 10.0, "slurm", True)}, {}), now=30.0) == []
    assert not h.get("5").ended
    assert [r.job_id for r in h.observe(JobView({}, {}), now=40.0)] == ["5"]
