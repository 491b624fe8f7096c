"""pruned's memory of jobs across sweeps and restarts, in a root-only state directory.

The history maps job -> (uid, start, end) so that files left behind can be tied to a job
that has ended, and "the uid's last job ended N seconds ago" can be answered. It is one
JSON file, `<state_dir>/history.json`, written crash-safely (tmp file in the same dir,
fsync, rename, fsync of the dir): after a crash the file is either the old or the new
version, and a leftover tmp file is ignored (and removed by the next save).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pruned.linux.atomic import FILE_MODE, ensure_private_dir, remove_stale_tmp, write_json_atomic
from pruned.model import JobView

HISTORY_FILE = "history.json"
# How long a job's cgroup may stay without a slurmstepd before the job counts as ended: long
# enough for the pause between two steps of an allocation without PrologFlags=contain.
IDLE_GRACE = 600.0
HISTORY_VERSION = 1


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job pruned has seen on this node (or was told about by the prolog/epilog)."""

    job_id: str
    uid: int
    start: float
    end: float | None
    user: str | None
    source: str  # "slurm", "statedir", "epilog", ...

    @property
    def ended(self) -> bool:
        return self.end is not None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_record(obj: Any, default_job_id: str | None = None) -> JobRecord:
    """A JobRecord from decoded JSON; ValueError naming the bad field otherwise."""
    if not isinstance(obj, dict):
        raise ValueError("record is not an object")
    job_id = obj.get("job_id", default_job_id)
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job_id: expected a non-empty string, got {job_id!r}")
    uid = obj.get("uid")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise ValueError(f"uid: expected an integer >= 0, got {uid!r}")
    start = obj.get("start")
    if not _number(start):
        raise ValueError(f"start: expected a number, got {start!r}")
    end = obj.get("end")
    if end is not None and not _number(end):
        raise ValueError(f"end: expected a number or null, got {end!r}")
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise ValueError(f"user: expected a string or null, got {user!r}")
    source = obj.get("source", "statedir")
    if not isinstance(source, str):
        raise ValueError(f"source: expected a string, got {source!r}")
    return JobRecord(job_id, uid, float(start), None if end is None else float(end), user, source)


class JobHistory:
    """Jobs seen running on this node and when they ended; load(), observe(), save()."""

    def __init__(self, state_dir: str, records: Mapping[str, JobRecord] | None = None) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, HISTORY_FILE)
        self._records: dict[str, JobRecord] = dict(records or {})
        # job id -> when it was first seen idle (cgroup there, no stepd); memory only: after a
        # restart the grace starts again, which only delays an end.
        self._idle: dict[str, float] = {}
        self.problems: list[str] = []  # what load() found wrong (a corrupt file, a bad record)

    @classmethod
    def load(cls, state_dir: str) -> JobHistory:
        """Read the history; missing -> empty; corrupt -> keep a .corrupt-<ts> copy, start empty."""
        hist = cls(state_dir)
        try:
            with open(hist.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return hist
        except OSError as e:
            hist.problems.append(f"{hist.path}: cannot read: {e.strerror}")
            return hist
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or obj.get("version") != HISTORY_VERSION:
                raise ValueError(f"not a version {HISTORY_VERSION} history")
            jobs = obj.get("jobs")
            if not isinstance(jobs, dict):
                raise ValueError("jobs: expected an object")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            hist.problems.append(hist._keep_corrupt(raw, str(e).splitlines()[0]))
            return hist
        except RecursionError:  # json.loads recurses once per nested [ or {
            hist.problems.append(hist._keep_corrupt(raw, "nested too deeply"))
            return hist
        for key, rec in jobs.items():
            try:
                hist._records[key] = parse_record(rec, key)
            except ValueError as e:
                hist.problems.append(f"{hist.path}: job {key!r}: {e}; record dropped")
        return hist

    def _keep_corrupt(self, raw: bytes, why: str) -> str:
        """Save the unreadable bytes next to the file for a human; return the problem line."""
        copy = f"{self.path}.corrupt-{int(time.time())}"
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            kept = f"kept as {copy}"
        except OSError as e:
            kept = f"could not keep a copy: {e.strerror}"
        return f"{self.path}: corrupt ({why}); starting with an empty history, {kept}"

    # ------------------------------------------------------------ changes

    def observe(self, view: JobView, now: float) -> list[JobRecord]:
        """Record the view's running jobs; end (at `now`) recorded jobs the view shows ended.

        Returns the records that ended in this call. "Ended" needs evidence: the job is gone
        from the view (its cgroup removed), or its source says it ended (the epilog's state
        record). A job whose cgroup is still there with no slurmstepd in it (between steps
        without PrologFlags=contain, a step being set up, or a crashed stepd) is only idle:
        it ends once it has been idle for IDLE_GRACE, at the time it was last seen running.
        A view with problems only adds: a source that cannot be read must not make every
        job look ended. Jobs whose uid is still unknown (v2 paths with no process yet) are
        recorded once their uid is known.
        """
        running = {j.job_id: j for j in view.jobs.values() if j.running and j.uid is not None}
        for job_id, job in running.items():
            rec = self._records.get(job_id)
            if rec is None or rec.ended:
                # A job id running again after it ended is a new incarnation (ids can be reused).
                self._records[job_id] = JobRecord(
                    job_id,
                    job.uid,
                    job.start,
                    None,
                    job.user,
                    job.source,  # type: ignore[arg-type]
                )
            elif job.user and not rec.user:
                self._records[job_id] = replace(rec, user=job.user)
        if view.problems:
            return []
        ended = []
        for job_id, rec in list(self._records.items()):
            if rec.ended:
                continue
            job = view.job(job_id)
            if job is not None and job.running:
                self._idle.pop(job_id, None)
                continue
            end = now
            if job is not None and job.source != "statedir":
                # Still there, no stepd: idle. (A state-dir record that says ended is the
                # epilog's word: evidence enough.)
                since = self._idle.setdefault(job_id, now)
                if now - since < IDLE_GRACE:
                    continue
                end = since
            self._idle.pop(job_id, None)
            rec = replace(rec, end=end)
            self._records[job_id] = rec
            ended.append(rec)
        return ended

    def mark_ended(self, job_id: str, uid: int, now: float, start: float | None = None) -> None:
        """The epilog says job_id ended at `now`; an earlier recorded end is kept."""
        rec = self._records.get(job_id)
        if rec is None or (rec.ended and rec.uid != uid):
            self._records[job_id] = JobRecord(
                job_id, uid, now if start is None else start, now, None, "epilog"
            )
        elif not rec.ended:
            self._records[job_id] = replace(rec, end=now)

    def prune(self, older_than: float) -> int:
        """Forget jobs that ended before the epoch time `older_than`; return how many."""
        old = [k for k, r in self._records.items() if r.end is not None and r.end < older_than]
        for key in old:
            del self._records[key]
        return len(old)

    # ------------------------------------------------------------ queries

    def get(self, job_id: str) -> JobRecord | None:
        return self._records.get(job_id)

    def records(self) -> list[JobRecord]:
        """Every record, running and ended, oldest start first."""
        return sorted(self._records.values(), key=lambda r: (r.start, r.job_id))

    def ended(self) -> list[JobRecord]:
        """Ended jobs, earliest end first."""
        done = [r for r in self._records.values() if r.end is not None]
        return sorted(done, key=lambda r: (r.end, r.job_id))

    def last_end_for(self, uid: int) -> float | None:
        """When the uid's most recently ended job ended, or None if none is remembered."""
        ends = [r.end for r in self._records.values() if r.uid == uid and r.end is not None]
        return max(ends) if ends else None

    # ------------------------------------------------------------ persistence

    def save(self) -> None:
        """Write the history crash-safely (mode 0600 in a 0700 dir)."""
        ensure_private_dir(self.state_dir)
        remove_stale_tmp(self.state_dir, HISTORY_FILE)
        jobs = {k: asdict(r) for k, r in self._records.items()}
        write_json_atomic(self.path, {"version": HISTORY_VERSION, "jobs": jobs})
