"""Bounded state: which ended jobs are forgotten, when a prune is due, and that the history's
journal keeps a save's cost to what changed (see also tests/real/test_state_prune.py)."""

from __future__ import annotations

import json
import os

import pytest

from pruned.jobs import history, retention
from pruned.jobs.history import HISTORY_FILE, JOURNAL_FILE, JobHistory, JobRecord
from pruned.model import Job, JobView

DAY = 86400.0
NOW = 100 * DAY


def _rec(job_id: str, end: float | None, uid: int = 30001) -> JobRecord:
    return JobRecord(job_id, uid, 10.0, end, None, "slurm")


def _view(*jobs: Job) -> JobView:
    return JobView(jobs={j.job_id: j for j in jobs}, membership={}, problems=())


# ---------------------------------------------------------------- retention decisions


def test_expired_only_after_the_retention_and_never_while_running() -> None:
    keep = 7 * DAY
    assert retention.expired(NOW - keep - 1, NOW, keep)
    assert not retention.expired(NOW - keep, NOW, keep)  # exactly at the limit: kept
    assert not retention.expired(NOW - 1, NOW, keep)
    assert not retention.expired(None, NOW, keep)  # running: never
    assert not retention.expired(NOW + DAY, NOW, keep)  # an end in the future (clock): kept


def test_prune_due_hourly_or_when_the_history_doubled() -> None:
    assert retention.prune_due(None, 0, 0, NOW)  # first refresh after a start
    assert not retention.prune_due(NOW - 60, 500, 500, NOW)
    assert retention.prune_due(NOW - retention.PRUNE_EVERY, 500, 500, NOW)
    grown = 2 * 500 + retention.GROWTH_SLACK
    assert not retention.prune_due(NOW - 60, 500, grown, NOW)
    assert retention.prune_due(NOW - 60, 500, grown + 1, NOW)
    assert retention.prune_due(NOW + 60, 500, 500, NOW)  # the clock went back: due


def test_history_prune_keeps_running_and_young(tmp_path) -> None:
    keep = 7 * DAY
    h = JobHistory(str(tmp_path), {
        "old": _rec("old", NOW - 8 * DAY),
        "young": _rec("young", NOW - 6 * DAY),
        "running": _rec("running", None),
    })  # fmt: skip
    assert h.prune(retention.cutoff(NOW, keep)) == 1
    assert {r.job_id for r in h.records()} == {"young", "running"}


def test_housekeep_is_rate_limited(tmp_path) -> None:
    sd = str(tmp_path)
    h = JobHistory(sd, {"old": _rec("old", NOW - 9 * DAY)})
    first = retention.housekeep(h, sd, NOW, 7 * DAY)
    assert first is not None and first.history == 1 and len(h) == 0
    h.mark_ended("old2", 30001, NOW - 8 * DAY)
    assert retention.housekeep(h, sd, NOW + 60, 7 * DAY) is None  # not due yet
    again = retention.housekeep(h, sd, NOW + retention.PRUNE_EVERY, 7 * DAY)
    assert again is not None and again.history == 1


# ---------------------------------------------------------------- idle grace from the policy


def test_idle_grace_is_the_callers() -> None:
    h = JobHistory("/nonexistent")
    idle = Job("4", 30001, 1.0, "slurm", False)
    h.observe(_view(Job("4", 30001, 1.0, "slurm", True)), now=0.0)
    assert h.observe(_view(idle), now=10.0, idle_grace=60.0) == []
    ended = h.observe(_view(idle), now=70.0, idle_grace=60.0)
    assert [(r.job_id, r.end) for r in ended] == [("4", 10.0)]  # backdated to first seen idle


# ---------------------------------------------------------------- the journal


def _lines(sd: str) -> list[dict]:
    with open(os.path.join(sd, JOURNAL_FILE)) as f:
        return [json.loads(line) for line in f]


def test_save_appends_only_the_changes_and_writes_nothing_without_one(tmp_path) -> None:
    sd = str(tmp_path)
    h = JobHistory(sd, {str(i): _rec(str(i), float(i)) for i in range(50)})
    h.save()  # a new history: snapshot plus an empty journal naming it
    snap = os.stat(os.path.join(sd, HISTORY_FILE))
    assert len(_lines(sd)) == 1
    h.observe(_view(Job("new", 30001, 5.0, "slurm", True)), now=100.0)
    h.save()
    assert [e.get("key") for e in _lines(sd)[1:]] == ["new"]
    assert os.stat(os.path.join(sd, HISTORY_FILE)).st_ino == snap.st_ino  # not rewritten
    before = os.stat(os.path.join(sd, JOURNAL_FILE))
    h.observe(_view(Job("new", 30001, 5.0, "slurm", True)), now=130.0)  # nothing changed
    h.save()
    assert os.stat(os.path.join(sd, JOURNAL_FILE)).st_size == before.st_size
    h.prune(25.0)
    h.save()
    back = JobHistory.load(sd)
    assert back.problems == [] and back.records() == h.records()
    assert {r.job_id for r in back.records()} == {"new", *map(str, range(25, 50))}


def test_a_long_journal_is_compacted_into_a_new_snapshot(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(history, "JOURNAL_MIN", 10)  # fewer fsyncs than the real 1000
    sd = str(tmp_path)
    h = JobHistory(sd)
    h.save()
    for i in range(30):  # a job recorded and forgotten: two lines, one record at most
        h.mark_ended(str(i), 30001, float(i))
        h.save()
        h.prune(float(i) + 1)
        h.save()
    h.mark_ended("last", 30001, 1.0)
    h.save()
    assert len(_lines(sd)) <= 11  # the header and at most JOURNAL_MIN changes
    with open(os.path.join(sd, HISTORY_FILE)) as f:
        snap = json.load(f)
    assert _lines(sd)[0] == {"journal": snap["journal"]}
    assert [r.job_id for r in JobHistory.load(sd).records()] == ["last"]


def test_a_torn_last_line_is_dropped_and_reported(tmp_path) -> None:
    sd = str(tmp_path)
    h = JobHistory(sd)
    h.save()
    h.mark_ended("1", 30001, 5.0)
    h.save()
    with open(os.path.join(sd, JOURNAL_FILE), "ab") as f:
        f.write(b'{"key":"2","rec":{"job_')  # a crash mid-append
    back = JobHistory.load(sd)
    assert [r.job_id for r in back.records()] == ["1"]
    assert len(back.problems) == 1 and "torn last line" in back.problems[0]
    back.mark_ended("3", 30001, 6.0)
    back.save()  # never appends behind the torn line: a fresh snapshot instead
    again = JobHistory.load(sd)
    assert again.problems == [] and [r.job_id for r in again.records()] == ["1", "3"]


def test_a_journal_of_an_older_snapshot_is_not_replayed(tmp_path) -> None:
    sd = str(tmp_path)
    h = JobHistory(sd)
    h.save()
    h.mark_ended("1", 30001, 5.0)
    h.save()
    with open(os.path.join(sd, JOURNAL_FILE), "rb") as f:
        stale = f.read()
    h.prune(10.0)  # job 1 forgotten, then a compaction
    h._compact()
    # A crash after the new snapshot, before the new journal: the old journal is still there.
    with open(os.path.join(sd, JOURNAL_FILE), "wb") as f:
        f.write(stale)
    back = JobHistory.load(sd)
    assert back.records() == [] and back.problems == []


class _CountingJobs(dict):
    walks = 0

    def values(self):  # type: ignore[override]
        type(self).walks += 1
        return super().values()


def test_an_unchanged_view_is_not_walked_again() -> None:
    """The state-dir source hands out the same mapping while nothing changed: observe() walks
    it once, then only its open records (cost by running jobs, not by records)."""
    jobs = _CountingJobs({
        "run": Job("run", 30001, 1.0, "statedir", True),
        **{str(i): Job(str(i), 30001, 1.0, "statedir", False) for i in range(100)},
    })  # fmt: skip
    view = JobView(jobs=jobs, membership={})
    h = JobHistory("/nonexistent")
    h.observe(view, now=10.0)
    h.observe(view, now=20.0)
    assert _CountingJobs.walks == 1
    assert [r.job_id for r in h.records()] == ["run"] and h.get("run").end is None  # type: ignore[union-attr]
    # A new mapping without the job: walked, and the job ends.
    assert [r.job_id for r in h.observe(_view(), now=30.0)] == ["run"]


def test_the_epilog_appends_beside_the_daemon(tmp_path) -> None:
    """Two writers (the daemon's history in memory, a `pruned epilog` process): the epilog's
    mark is one appended line, and a later load sees both writers' changes."""
    sd = str(tmp_path)
    daemon = JobHistory(sd, {"1": _rec("1", None)})
    daemon.save()
    epilog = JobHistory.load(sd)
    epilog.mark_ended("1", 30001, 50.0)
    epilog.save()
    assert [e.get("key") for e in _lines(sd)[1:]] == ["1"]
    daemon.observe(
        _view(Job("2", 30001, 5.0, "slurm", True), Job("1", 30001, 1.0, "slurm", True)), now=60.0
    )
    daemon.save()
    back = JobHistory.load(sd)
    assert back.problems == [] and back.get("1").end == 50.0  # type: ignore[union-attr]
    assert back.get("2").end is None  # type: ignore[union-attr]


def test_a_failed_append_makes_the_next_save_a_snapshot(tmp_path, monkeypatch) -> None:
    sd = str(tmp_path)
    h = JobHistory(sd)
    h.save()
    h.mark_ended("1", 30001, 5.0)
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes) -> int:  # a full disk mid-line
        if len(data) > 8:
            return real_write(fd, bytes(data[:8]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history.os, "write", half_then_enospc)
    with pytest.raises(OSError):
        h.save()
    monkeypatch.setattr(history.os, "write", real_write)
    with open(os.path.join(sd, JOURNAL_FILE), "rb") as f:
        assert not f.read().endswith(b"\n")  # a torn line is in the file
    h.save()  # the change was kept pending: now a snapshot, behind no torn line
    back = JobHistory.load(sd)
    assert back.problems == [] and [r.job_id for r in back.records()] == ["1"]
