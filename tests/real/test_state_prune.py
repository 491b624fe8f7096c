"""Bounded state on real files: the prune of `<state_dir>/jobs/` removes exactly the records
of jobs ended before the retention, keeps young, running and unreadable ones (named), never
follows or removes a symlink, never touches a name pruned does not write; the cached reader
sees every change; and the daemon's jobs refresh prunes both the records and the history."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pruned.jobs import statedir
from pruned.jobs.history import HISTORY_FILE, JobHistory, JobRecord
from pruned.jobs.statedir import (
    CHANGES,
    StateDirSource,
    end_job_record,
    prune_records,
    record_name,
    write_job_record,
)
from tests.real.test_daemon import start_daemon, write_policy  # noqa: F401 (a fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the records must be root's, as in production"),
]

DAY = 86400.0


def _state(tmp_path: Path) -> tuple[str, Path]:
    sd = tmp_path / "state"
    write_job_record(str(sd), "seed", 30001, 1.0)  # makes state/ and jobs/ as the prolog does
    os.unlink(sd / "jobs" / "seed.json")
    return str(sd), sd / "jobs"


def _ended(sd: str, job_id: str, end: float, uid: int = 30001) -> None:
    write_job_record(sd, job_id, uid, end - 60)
    assert end_job_record(sd, job_id, end)


def test_prune_removes_exactly_the_old_records(tmp_path) -> None:
    now = time.time()
    sd, jobs = _state(tmp_path)
    _ended(sd, "old", now - 30 * DAY)
    _ended(sd, "123[4].server", now - 8 * DAY)  # an escaped name: pruned wrote it too
    _ended(sd, "young", now - 3600)
    write_job_record(sd, "running", 30001, now - 40 * DAY)  # started long ago, still running
    (jobs / "corrupt.json").write_bytes(b'{"uid": 1, "start": ')
    os.chmod(jobs / "corrupt.json", 0o600)
    outside = tmp_path / "outside.json"  # an old-ended record a symlink points at
    outside.write_text(json.dumps({"job_id": "link", "uid": 1, "start": 1.0, "end": 2.0}))
    os.chmod(outside, 0o600)
    os.symlink(outside, jobs / "link.json")
    for foreign in ("notes.txt", "x.json.bak", "a%zz.json"):  # not names pruned writes
        (jobs / foreign).write_text(json.dumps({"uid": 1, "start": 1.0, "end": 2.0}))
    stale = jobs / f".{record_name('gone')}.tmp.999.1"  # a writer that crashed long ago
    stale.write_text("{")
    os.utime(stale, (now - 2 * DAY, now - 2 * DAY))
    live = jobs / f".{record_name('busy')}.tmp.998.2"  # a writer still writing
    live.write_text("{")

    got = prune_records(sd, now - 7 * DAY, now)

    assert sorted(got.removed) == ["123[4].server", "old"]
    assert got.tmp_removed == 1 and got.kept_running == 1 and got.kept_young == 1
    left = sorted(os.listdir(jobs))
    assert left == sorted([
        record_name("young"), record_name("running"), "corrupt.json", "link.json",
        "notes.txt", "x.json.bak", "a%zz.json", live.name, CHANGES,
    ])  # fmt: skip
    assert os.path.islink(jobs / "link.json") and outside.exists()  # not followed, not removed
    assert any("corrupt.json: corrupt job record" in p for p in got.problems)
    assert any("link.json: not pruned: a symlink" in p for p in got.problems)
    # The reader agrees: the young and the running record, two named problems.
    view = StateDirSource(sd).read()
    assert set(view.jobs) == {"young", "running"}


def test_a_symlinked_or_shared_jobs_dir_is_not_pruned(tmp_path) -> None:
    now = time.time()
    sd, jobs = _state(tmp_path)
    _ended(sd, "old", now - 30 * DAY)
    real = tmp_path / "elsewhere"
    jobs.rename(real)
    os.symlink(real, jobs)
    got = prune_records(sd, now - 7 * DAY, now)
    assert got.removed == () and "cannot prune" in got.problems[0]
    assert (real / "old.json").exists()
    os.unlink(jobs)
    real.rename(jobs)
    os.chmod(jobs, 0o733)  # writable by others: nothing in it can be trusted
    got = prune_records(sd, now - 7 * DAY, now)
    assert got.removed == () and "writable by group or others" in got.problems[0]
    assert (jobs / "old.json").exists()


def test_a_record_rewritten_while_judged_is_kept(tmp_path, monkeypatch) -> None:
    """A job id reused between the prune's read and its unlink: the new record stays."""
    now = time.time()
    sd, jobs = _state(tmp_path)
    _ended(sd, "7", now - 30 * DAY)
    real_parse = statedir.parse_record

    def parse_then_prolog(obj, job_id):  # the prolog of a new job 7 runs right after the read
        rec = real_parse(obj, job_id)
        write_job_record(sd, "7", 30002, now)
        return rec

    monkeypatch.setattr(statedir, "parse_record", parse_then_prolog)
    got = prune_records(sd, now - 7 * DAY, now)
    assert got.removed == ()
    with open(jobs / "7.json") as f:
        new = json.load(f)
    assert new["uid"] == 30002 and new["end"] is None


def test_the_cached_reader_sees_every_change(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(statedir, "RACY", 0.0)  # trust every timestamp: the cache always counts
    sd, jobs = _state(tmp_path)
    write_job_record(sd, "1", 30001, 10.0)
    src = StateDirSource(sd)
    first = src.read()
    assert first.jobs["1"].running
    assert src.read() is first  # nothing changed: the same view, nothing read
    assert end_job_record(sd, "1", 20.0)  # the epilog: a rename, and a line in the change log
    assert not src.read().jobs["1"].running
    write_job_record(sd, "2", 30001, 10.0)
    assert set(src.read().jobs) == {"1", "2"}
    # A writer that keeps no change log (an older pruned): the directory changed, so a scan.
    tmp = jobs / ".3.json.tmp"
    tmp.write_text(json.dumps({"job_id": "3", "uid": 30001, "start": 1.0, "end": None}))
    os.chmod(tmp, 0o600)
    os.rename(tmp, jobs / "3.json")
    assert set(src.read().jobs) == {"1", "2", "3"}
    os.unlink(jobs / "2.json")
    assert set(src.read().jobs) == {"1", "3"}
    # A logged change in place (same inode, same directory) is read again because of the log.
    with open(jobs / "3.json", "r+") as f:
        f.write(json.dumps({"job_id": "3", "uid": 30009, "start": 1.0, "end": None}))
        f.truncate()
    statedir._log_changes(str(jobs), ["3.json"])
    assert src.read().jobs["3"].uid == 30009
    # An unlogged in-place edit (by hand) is seen once RESCAN has passed.
    (jobs / "1.json").write_text("{")
    monkeypatch.setattr(statedir, "RESCAN", 0.0)
    view = src.read()
    assert set(view.jobs) == {"3"} and "1.json: corrupt job record" in view.problems[0]
    # A prune replaces the log (a new inode): the next read scans and sees the removal.
    monkeypatch.setattr(statedir, "RESCAN", 600.0)
    src.read()
    assert end_job_record(sd, "3", 30.0)
    assert prune_records(sd, 100.0).removed == ("3",)
    assert set(src.read().jobs) == set()


def test_the_daemon_refresh_prunes_records_and_history(tmp_path, make_user, start_daemon):  # noqa: F811
    user = make_user("prs")
    now = time.time()
    policy = write_policy(
        tmp_path,
        jobs={
            "sources": ["statedir"],
            "state_dir": str(tmp_path / "state"),
            "keep_ended": "2d",
        },
        schedule={"sweep": "10m", "jobs": "1s"},
    )
    sd = str(tmp_path / "state")
    jobs = tmp_path / "state" / "jobs"
    _ended(sd, "old", now - 3 * DAY, user.uid)
    _ended(sd, "young", now - 3600, user.uid)
    write_job_record(sd, "running", user.uid, now - 5 * DAY)
    (jobs / "corrupt.json").write_bytes(b"not json")
    os.chmod(jobs / "corrupt.json", 0o600)
    hist = JobHistory(sd, {
        "h-old": JobRecord("h-old", user.uid, 1.0, now - 4 * DAY, None, "slurm"),
        "h-young": JobRecord("h-young", user.uid, 1.0, now - DAY, None, "slurm"),
    })  # fmt: skip
    hist.save()

    d = start_daemon(policy, [user.uid])
    d.ready()
    deadline = time.monotonic() + 30
    while (jobs / "old.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (jobs / "old.json").exists(), d.stderr()
    time.sleep(1.5)  # the refresh that pruned saves the history right after
    assert d.stop() == 0
    assert sorted(os.listdir(jobs)) == [CHANGES, "corrupt.json", "running.json", "young.json"]
    back = JobHistory.load(sd)
    assert back.problems == []
    # Only the history's old entry went. (The corrupt record makes the view a problem view,
    # from which the refresh learns nothing: the running record is not in the history.)
    assert {r.job_id for r in back.records()} == {"h-young"}
    err = d.stderr()
    assert "removed 1 job records" in err and "forgot 1 ended jobs" in err
    assert "corrupt.json: corrupt job record" in err
    assert os.path.exists(os.path.join(sd, HISTORY_FILE))
