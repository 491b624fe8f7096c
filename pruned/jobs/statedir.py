"""The state-dir job source: per-job records `pruned prolog` / `pruned epilog` write.

For batch systems whose jobs leave no cgroup tree to read (Torque/PBS, HTCondor, gLExec pool
accounts): `<state_dir>/jobs/<job_id>.json` (see record_name), root-only, written crash-safely.
"""

from __future__ import annotations

import json
import os
import re

from pruned.jobs.history import parse_record
from pruned.linux.atomic import ensure_private_dir, write_json_atomic
from pruned.model import Job, JobView

DEFAULT_STATE_DIR = "/var/lib/pruned"
JOBS_SUBDIR = "jobs"
# A job id is what the batch system calls the job: Slurm "17" or a SLUID "s6T9M8T79NSN00",
# PBS/Torque "123.server" or an array's "123[4].server", HTCondor "1234.0". Any printable
# ASCII but '/' (so never a path: no '/', NUL, whitespace, '.' or '..', no leading '.'), at
# most 64 characters. In the record's file name, characters other than letters, digits, '_',
# '.' and '-' are written %XX (PBS "123[4].server" -> "123%5B4%5D.server.json"), so every
# name pruned writes decodes back to exactly one id.
_JOB_ID_RE = re.compile(r"[!-\-0-~][!-.0-~]{0,63}")
_NAME_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_NAME_RE = re.compile(r"(?:[A-Za-z0-9_.\-]|%[0-9A-F]{2})+")
RECORD_SUFFIX = ".json"


def _check_private(path: str, st: os.stat_result) -> str | None:
    """Why `path` cannot be trusted (writable by others, or not ours), or None."""
    if st.st_uid != os.geteuid():
        return f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}: not trusted"
    if st.st_mode & 0o022:
        return f"{path}: writable by group or others (mode {st.st_mode & 0o7777:o}): not trusted"
    return None


def record_name(job_id: str) -> str:
    """The file name of job_id's record (`123%5B4%5D.server.json`); ValueError for an id that
    is not a plain name."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError(
            f"job id {job_id!r}: expected at most 64 printable ASCII characters, "
            "no '/', no whitespace, not starting with '.'"
        )
    return "".join(c if c in _NAME_KEEP else f"%{ord(c):02X}" for c in job_id) + RECORD_SUFFIX


def job_id_of_record_name(name: str) -> str | None:
    """The job id a record file name stands for; None for a name record_name never writes."""
    stem = name.removesuffix(RECORD_SUFFIX)
    if stem == name or not _NAME_RE.fullmatch(stem):
        return None
    job_id = re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m[1], 16)), stem)
    try:
        return job_id if record_name(job_id) == name else None
    except ValueError:
        return None


def job_record_path(state_dir: str, job_id: str) -> str:
    """`<state_dir>/jobs/<record_name(job_id)>`; ValueError for a job id that is not a plain
    name."""
    return os.path.join(state_dir, JOBS_SUBDIR, record_name(job_id))


class StateDirSource:
    """Jobs recorded by `pruned prolog` (running: no end yet) and `pruned epilog` (ended).

    No membership: these batch systems give no cgroup to read. Problems: the directory or
    the jobs/ subdirectory is missing (the prolog never ran here, so every job process would
    look like a stray), not root-only, or a record is corrupt (named, and skipped).
    """

    name = "statedir"

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR) -> None:
        self.state_dir = state_dir

    def read(self) -> JobView:
        jobs_dir = os.path.join(self.state_dir, JOBS_SUBDIR)
        problems: list[str] = []
        jobs: dict[str, Job] = {}
        for path in (self.state_dir, jobs_dir):
            try:
                st = os.stat(path)
            except OSError as e:
                hint = " (has `pruned prolog` run on this node?)" if path == jobs_dir else ""
                problems.append(f"job records {path}: {e.strerror or e}{hint}")
                return self._view(jobs, problems)
            if why := _check_private(path, st):
                problems.append(why)
                return self._view(jobs, problems)
        try:
            names = sorted(os.listdir(jobs_dir))
        except OSError as e:
            problems.append(f"cannot read {jobs_dir}: {e.strerror or e}")
            return self._view(jobs, problems)
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue  # tmp files of a writer that crashed or is still writing
            path = os.path.join(jobs_dir, name)
            try:
                job_id = job_id_of_record_name(name)
                if job_id is None:
                    raise ValueError("the file name is not one pruned writes for a job id")
                job = self._read_record(path, job_id)
            except FileNotFoundError:
                continue  # removed by a concurrent prune
            except RecursionError:  # json nested thousands deep
                problems.append(f"{path}: corrupt job record: nested too deeply")
                continue
            except (OSError, ValueError) as e:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                problems.append(f"{path}: corrupt job record: {msg.splitlines()[0]}")
                continue
            jobs[job.job_id] = job
        return self._view(jobs, problems)

    def _read_record(self, path: str, job_id: str) -> Job:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if why := _check_private(path, os.fstat(f.fileno())):
                raise ValueError(why.removeprefix(f"{path}: "))
            rec = parse_record(json.loads(f.read()), job_id)
        if rec.job_id != job_id:
            raise ValueError(f"job_id {rec.job_id!r} does not match the file name")
        return Job(
            job_id=rec.job_id,
            uid=rec.uid,
            start=rec.start,
            source=self.name,
            running=rec.end is None,
            why_not_running="" if rec.end is None else f"epilog recorded its end at {rec.end:.0f}",
            user=rec.user,
        )

    def _view(self, jobs: dict[str, Job], problems: list[str]) -> JobView:
        return JobView(jobs=jobs, membership={}, problems=tuple(problems), sources=(self.name,))


def write_job_record(
    state_dir: str, job_id: str, uid: int, start: float, user: str | None = None
) -> str:
    """Record a starting job (`pruned prolog`); returns the record's path."""
    path = job_record_path(state_dir, job_id)
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise ValueError(f"uid {uid!r}: expected an integer >= 0")
    ensure_private_dir(state_dir)
    ensure_private_dir(os.path.dirname(path))
    rec = {"job_id": job_id, "uid": uid, "start": float(start), "end": None, "user": user}
    write_json_atomic(path, {**rec, "source": "statedir"})
    return path


def end_job_record(state_dir: str, job_id: str, end: float, uid: int | None = None) -> bool:
    """Mark a job ended (`pruned epilog`). False when it has no record and no `uid` to make one.

    With `uid`, a missing record (the prolog did not run) is created already ended.
    """
    path = job_record_path(state_dir, job_id)
    try:
        with open(path, "rb") as f:
            rec = parse_record(json.loads(f.read()), job_id)
        obj = {
            "job_id": rec.job_id, "uid": rec.uid, "start": rec.start,
            "end": rec.end if rec.end is not None else float(end), "user": rec.user,
        }  # fmt: skip
    except (OSError, ValueError, RecursionError):
        if uid is None:
            return False
        obj = {"job_id": job_id, "uid": uid, "start": float(end), "end": float(end), "user": None}
    ensure_private_dir(state_dir)
    ensure_private_dir(os.path.dirname(path))
    write_json_atomic(path, {**obj, "source": "statedir"})
    return True


def prune_job_records(state_dir: str, older_than: float) -> int:
    """Delete records of jobs that ended before epoch `older_than`; return how many."""
    jobs_dir = os.path.join(state_dir, JOBS_SUBDIR)
    removed = 0
    try:
        names = os.listdir(jobs_dir)
    except OSError:
        return 0
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = os.path.join(jobs_dir, name)
        job_id = job_id_of_record_name(name)
        if job_id is None:
            continue  # not a record name: read() reports it
        try:
            with open(path, "rb") as f:
                rec = parse_record(json.loads(f.read()), job_id)
        except (OSError, ValueError, RecursionError):
            continue  # corrupt ones stay, so the problem stays visible
        if rec.end is not None and rec.end < older_than:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed
