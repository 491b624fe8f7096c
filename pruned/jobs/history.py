"""pruned's memory of jobs across sweeps and restarts, in a root-only state directory.

The history maps job -> (uid, start, end) so that files left behind can be tied to a job
that has ended, and "the uid's last job ended N seconds ago" can be answered.

Stored as a snapshot, `<state_dir>/history.json`, plus a journal of the changes since,
`history.journal` (one JSON line per changed or forgotten job). A save appends only what
changed since the last save, so a jobs refresh costs the same with 100 or 100,000 remembered
jobs; once the journal holds more lines than there are jobs, the next save writes a new
snapshot and an empty journal (amortised: each change is rewritten about once). Both files are
replaced crash-safely (tmp file in the same dir, fsync, rename, fsync of the dir); a journal
names the snapshot generation it follows, so a journal left by a crash between the two
replacements is ignored rather than replayed over a newer snapshot. A torn last journal line
(a crash mid-append) is dropped and reported; a leftover tmp file is removed by a later save.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pruned.linux.atomic import FILE_MODE, ensure_private_dir, remove_stale_tmp, write_atomic
from pruned.model import Job, JobView

HISTORY_FILE = "history.json"
JOURNAL_FILE = "history.journal"
# The default of jobs.idle_grace: how long a job's cgroup may stay without a slurmstepd before
# the job counts as ended (the pause between two steps without PrologFlags=contain).
IDLE_GRACE = 600.0
HISTORY_VERSION = 1
# A journal may grow to max(this, number of jobs) lines before a save compacts it.
JOURNAL_MIN = 1000


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
        self.journal_path = os.path.join(state_dir, JOURNAL_FILE)
        self._records: dict[str, JobRecord] = {}
        self._open: set[str] = set()  # keys of records without an end: what observe() walks
        self._ended: list[JobRecord] | None = None  # ended(), kept until the next change
        # Changes not saved yet: key -> new record, None for a forgotten one.
        self._pending: dict[str, JobRecord | None] = {}
        self._generation = 0  # the snapshot's (random); the journal must name it to be replayed
        self._journal_lines = 0
        self._compact_next = True  # nothing on disk is known to match: write a snapshot
        for key, rec in (records or {}).items():
            self._put(key, rec)
        # job id -> when it was first seen idle (cgroup there, no stepd); memory only: after a
        # restart the grace starts again, which only delays an end.
        self._idle: dict[str, float] = {}
        self._seen_jobs: object = None  # the view.jobs observe() last walked
        # job id -> the SLUID its 26.05 cgroup is named by, learnt while its stepd ran (only
        # the stepd's argv says the number): once the stepds are gone the view shows the
        # job under its SLUID, and it is the same job, idle, not a job that ended. Kept until
        # the record is forgotten (or, for a job not recorded yet, while its cgroup is in the
        # view), so a lingering cgroup is no new job either.
        self._sluid: dict[str, str] = {}
        self.problems: list[str] = []  # what load() found wrong (a corrupt file, a bad record)
        # Housekeeping (pruned.jobs.retention): when it last pruned, and how many were left.
        self.pruned_at: float | None = None
        self.size_after_prune = 0

    def __len__(self) -> int:
        return len(self._records)

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
            generation = obj.get("journal", 0)
            if not isinstance(generation, int) or isinstance(generation, bool):
                raise ValueError("journal: expected an integer")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            hist.problems.append(hist._keep_corrupt(raw, str(e).splitlines()[0]))
            return hist
        except RecursionError:  # json.loads recurses once per nested [ or {
            hist.problems.append(hist._keep_corrupt(raw, "nested too deeply"))
            return hist
        for key, rec in jobs.items():
            try:
                hist._put(key, parse_record(rec, key))
            except ValueError as e:
                hist.problems.append(f"{hist.path}: job {key!r}: {e}; record dropped")
        hist._generation = generation
        hist._replay_journal()
        hist._pending.clear()  # what was read is on disk already
        return hist

    def _replay_journal(self) -> None:
        """Apply the journal of this snapshot's generation; any other is stale and ignored."""
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return  # a history from before the journal: the next save writes one
        except OSError as e:
            self.problems.append(f"{self.journal_path}: cannot read: {e.strerror}")
            return
        lines = raw.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline, as every append does
        try:
            header = json.loads(lines[0]) if lines else None
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or header.get("journal") != self._generation:
            return  # a crash between snapshot and journal: the snapshot has it all
        for n, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                    raise ValueError("expected an object with a string key")
                key, rec = entry["key"], entry.get("rec")
                if rec is None:
                    self._forget(key)
                else:
                    self._put(key, parse_record(rec, key))
            except (ValueError, RecursionError) as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.problems.append(f"{self.journal_path}:{n}: {why}; change dropped")
        if torn:
            self.problems.append(
                f"{self.journal_path}:{len(lines) + 1}: torn last line (a crash while "
                "appending?); change dropped"
            )
        self._journal_lines = len(lines) - 1
        self._compact_next = bool(torn)  # never append behind a torn line

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

    def _put(self, key: str, rec: JobRecord) -> None:
        self._records[key] = rec
        self._pending[key] = rec
        if rec.end is None:
            self._open.add(key)
        else:
            self._open.discard(key)
        self._ended = None

    def _forget(self, key: str) -> None:
        if self._records.pop(key, None) is not None:
            self._pending[key] = None
        self._open.discard(key)
        self._idle.pop(key, None)
        self._sluid.pop(key, None)
        self._ended = None

    def observe(self, view: JobView, now: float, idle_grace: float = IDLE_GRACE) -> list[JobRecord]:
        """Record the view's running jobs (and jobs first seen idle in their cgroups); end (at
        `now`) recorded jobs the view shows ended.

        Returns the records that ended in this call. "Ended" needs evidence: the job is gone
        from the view (its cgroup removed), or its source says it ended (the epilog's state
        record). A job whose cgroup is still there with no slurmstepd in it (between steps
        without PrologFlags=contain, a step being set up, or a crashed stepd) is only idle:
        it ends once it has been idle for `idle_grace` (jobs.idle_grace), at the time it was
        first seen idle. A view with problems only adds: a source that cannot be read must
        not make every job look ended. Jobs whose uid is still unknown (v2 paths with no
        process yet) are recorded once their uid is known. Only the view's jobs and the
        records without an end are looked at: ended records cost nothing here.
        """
        # The same jobs mapping as last time (the state-dir source hands out its cached one
        # while nothing changed): its running jobs are recorded already, and only the open
        # records below can change. Holding the mapping keeps its identity from being reused.
        same = view.jobs is self._seen_jobs
        self._seen_jobs = view.jobs
        for sluid, number in view.aliases.items():
            self._sluid[number] = sluid
        number_of = {sluid: number for number, sluid in self._sluid.items()}
        # A job first seen idle in its cgroup (its slurmstepds died before any look at it
        # with its owner's processes in it: a crash right after its start, or while pruned
        # was down) is recorded too, by its number when a stepd once named it (26.05: the
        # cgroup is the SLUID's, the dirs the number's); it ends after the same idle_grace,
        # or its directories would never be cleaned. Only when unknown: an ended job's
        # lingering cgroup must not start it over. (A state-dir job that is not running has
        # ended by the epilog's word, which marks the history itself.)
        seen: dict[str, Job] = {}
        for j in () if same else view.jobs.values():
            if j.uid is None:
                continue
            if j.running:
                seen[j.job_id] = j
            elif j.source != "statedir":
                key = number_of.get(j.job_id, j.job_id)
                if key not in self._records:
                    seen[key] = j
        for job_id, job in seen.items():
            rec = self._records.get(job_id)
            if rec is None or rec.ended:
                # A job id running again after it ended is a new incarnation (ids can be reused).
                self._put(
                    job_id,
                    JobRecord(
                        job_id,
                        job.uid,  # type: ignore[arg-type]
                        job.start,
                        None,
                        job.user,
                        job.source,
                    ),
                )
            elif job.user and not rec.user:
                self._put(job_id, replace(rec, user=job.user))
        if view.problems:
            return []
        ended = []
        for job_id in sorted(self._open):
            rec = self._records[job_id]
            job = view.job(job_id)
            if job is None and job_id in self._sluid:
                job = view.job(self._sluid[job_id])  # its stepds gone: named by SLUID again
            if job is not None and job.running:
                self._idle.pop(job_id, None)
                continue
            end = now
            if job is not None and job.source != "statedir":
                # Still there, no stepd: idle. (A state-dir record that says ended is the
                # epilog's word: evidence enough.)
                since = self._idle.setdefault(job_id, now)
                if now - since < idle_grace:
                    continue
                end = since
            self._idle.pop(job_id, None)
            rec = replace(rec, end=end)
            self._put(job_id, rec)
            ended.append(rec)
        return ended

    def mark_ended(self, job_id: str, uid: int, now: float, start: float | None = None) -> None:
        """The epilog says job_id ended at `now`; an earlier recorded end is kept."""
        rec = self._records.get(job_id)
        if rec is None or (rec.ended and rec.uid != uid):
            self._put(
                job_id, JobRecord(job_id, uid, now if start is None else start, now, None, "epilog")
            )
        elif not rec.ended:
            self._put(job_id, replace(rec, end=now))

    def prune(self, older_than: float) -> int:
        """Forget jobs that ended before the epoch time `older_than`; return how many.

        A job without an end (still running, or idle within its grace) is never forgotten.
        """
        old = [k for k, r in self._records.items() if r.end is not None and r.end < older_than]
        for key in old:
            self._forget(key)
        # Aliases of jobs never recorded (their uid not known yet) stay while their cgroup
        # is in the view (by number or SLUID): a stepd seen before the owner's first process
        # still names the job once the stepds are gone.
        seen = self._seen_jobs if isinstance(self._seen_jobs, Mapping) else {}
        for key in [k for k, sluid in self._sluid.items()
                    if k not in self._records and k not in seen and sluid not in seen]:
            del self._sluid[key]
        return len(old)

    # ------------------------------------------------------------ queries

    def get(self, job_id: str) -> JobRecord | None:
        return self._records.get(job_id)

    def records(self) -> list[JobRecord]:
        """Every record, running and ended, oldest start first."""
        return sorted(self._records.values(), key=lambda r: (r.start, r.job_id))

    def ended(self) -> list[JobRecord]:
        """Ended jobs, earliest end first (sorted once per change, not once per call)."""
        if self._ended is None:
            done = [r for r in self._records.values() if r.end is not None]
            self._ended = sorted(done, key=lambda r: (r.end, r.job_id))
        return list(self._ended)

    def last_end_for(self, uid: int) -> float | None:
        """When the uid's most recently ended job ended, or None if none is remembered."""
        ends = [r.end for r in self._records.values() if r.uid == uid and r.end is not None]
        return max(ends) if ends else None

    # ------------------------------------------------------------ persistence

    def save(self) -> None:
        """Write what changed since the last save (mode 0600 in a 0700 dir); nothing if nothing
        did. Appends to the journal, or writes a new snapshot once the journal is longer than
        the history itself."""
        if not self._pending and not self._compact_next:
            return
        ensure_private_dir(self.state_dir)
        limit = max(JOURNAL_MIN, len(self._records))
        if self._compact_next or self._journal_lines + len(self._pending) > limit:
            self._compact()
        else:
            self._append()
        self._pending.clear()

    def remove_stale_tmp(self) -> None:
        """Tmp files a crashed writer of the snapshot or the journal left (older than 10 min)."""
        for name in (HISTORY_FILE, JOURNAL_FILE):
            remove_stale_tmp(self.state_dir, name)

    def _compact(self) -> None:
        """A new snapshot of every record, then an empty journal that names it."""
        self.remove_stale_tmp()
        # Random, not a counter: the epilog compacts too, and two writers counting from the
        # same snapshot would both name their journal G+1.
        generation = self._generation
        while generation in (self._generation, 0):
            generation = int.from_bytes(os.urandom(6), "big")
        jobs = {k: asdict(r) for k, r in self._records.items()}
        snapshot = {"version": HISTORY_VERSION, "journal": generation, "jobs": jobs}
        write_atomic(self.path, json.dumps(snapshot, separators=(",", ":")).encode() + b"\n")
        write_atomic(self.journal_path, _line({"journal": generation}))
        self._generation = generation
        self._journal_lines = 0
        self._compact_next = False

    def _append(self) -> None:
        """The pending changes as journal lines, in one write, fsync'ed."""
        data = b"".join(
            _line({"key": k, "rec": None if r is None else asdict(r)})
            for k, r in self._pending.items()
        )
        try:
            fd = os.open(
                self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except FileNotFoundError:  # removed behind our back: start over from a snapshot
            self._compact()
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            # Part of a line may be in the file (ENOSPC): never append behind it; the changes
            # stay pending for a snapshot at the next save.
            self._compact_next = True
            raise
        finally:
            os.close(fd)
        self._journal_lines += len(self._pending)


def _line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
