"""The state-dir job source: per-job records `pruned prolog` / `pruned epilog` write.

For batch systems whose jobs leave no cgroup tree to read (Torque/PBS, HTCondor, gLExec pool
accounts): `<state_dir>/jobs/<job_id>.json` (see record_name), root-only, written crash-safely.
The epilog writes one on every node, so the daemon prunes records of long-ended jobs
(prune_records, called through pruned.jobs.retention).

Reading is cached per directory, so that a sweep costs the same with 20 or 100,000 records:
- the writers append each record name they wrote to `jobs/.changes` (after the rename, under
  an flock of jobs/ that the prune takes too); a read finds the directory (inode, mtime,
  ctime) and the log (inode, size) unchanged and returns the last view, or reads only the
  names logged since: cost by changes, not by records. The prune replaces the log hourly.
- anything else (the directory changed but the log did not grow: a writer without the log,
  a hand edit; a log replaced or unreadable) is a scan: every name lstat'ed, and parsed only
  if its lstat changed. A scan that saw a timestamp within RACY seconds is not trusted for
  the next read (timestamps are coarser than the changes), and every RESCAN seconds the next
  read parses everything afresh (an in-place edit by hand that changed no timestamp).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pruned.jobs.history import parse_record
from pruned.linux.atomic import TMP_MARK, ensure_private_dir, write_json_atomic
from pruned.linux.dirfd import WalkError, open_dir_path
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
RACY = 2.0
RESCAN = 600.0
LOCK_WAIT = 5.0  # a writer waits at most this long for a prune to let go of the directory
_STALE_TMP_AGE = 600.0


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


@dataclass(slots=True)
class _DirCache:
    """The last read of one jobs/ directory. `jobs` is the dict the view handed out: replaced,
    never changed, once handed out (a later read copies it first)."""

    key: tuple[int, int, int, int]  # the directory's dev, inode, mtime, ctime
    racy: bool  # something changed within RACY of the read: do not trust `key` alone
    log: tuple[int, int] | None  # the change log's inode and size when this read began
    idents: dict[str, tuple[int, ...]]  # record name -> its lstat when parsed
    jobs: dict[str, Job]
    problems: dict[str, str]  # record name -> its problem line
    view: JobView
    full_at: float  # when every record was last parsed afresh

    def put(self, name: str, ident: tuple[int, ...], got: Job | str) -> None:
        self.idents[name] = ident
        if isinstance(got, str):
            self.problems[name] = got
        else:
            self.jobs[got.job_id] = got

    def drop(self, name: str) -> None:
        self.idents.pop(name, None)
        self.problems.pop(name, None)
        if (job_id := job_id_of_record_name(name)) is not None:
            self.jobs.pop(job_id, None)


CHANGES = ".changes"  # in jobs/: the names of records written since the last prune, one a line
_O_LOG = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _log_changes(jobs_dir: str | int, names: list[str]) -> None:
    """Append the names to the change log, after the change itself (a reader that sees the
    line sees the change). Best effort: without it, a reader sees the change at its next
    full scan of a changed directory or within RESCAN."""
    if not names:
        return
    with contextlib.suppress(OSError):
        if isinstance(jobs_dir, int):
            fd = os.open(CHANGES, _O_LOG, 0o600, dir_fd=jobs_dir)
        else:
            fd = os.open(os.path.join(jobs_dir, CHANGES), _O_LOG, 0o600)
        try:
            os.write(fd, "".join(f"{n}\n" for n in names).encode())
        finally:
            os.close(fd)


def _log_ident(jobs_dir: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(os.path.join(jobs_dir, CHANGES))
    except OSError:
        return None
    return (st.st_ino, st.st_size) if stat.S_ISREG(st.st_mode) else None


def _logged_names(jobs_dir: str, start: int, end: int) -> set[str] | None:
    """The names logged between byte offsets start and end; None if that cannot be read
    whole (the caller scans instead)."""
    try:
        fd = os.open(os.path.join(jobs_dir, CHANGES), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(data) != end - start or not data.endswith(b"\n"):
        return None  # a line still being written, or a log replaced meanwhile
    try:
        return set(data.decode().split("\n")[:-1])
    except UnicodeDecodeError:
        return None


def _reset_log(dfd: int) -> None:
    """A fresh, empty change log (a new inode: cached readers notice and scan once)."""
    tmp = f"{CHANGES}{TMP_MARK}{os.getpid()}"
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        os.close(fd)
        os.rename(tmp, CHANGES, src_dir_fd=dfd, dst_dir_fd=dfd)


_CACHE: dict[str, _DirCache] = {}
_CACHE_MAX = 8  # directories remembered (one in the daemon; tests make many)
_CACHE_LOCK = threading.Lock()  # sweeps, the jobs refresh and the event path all read


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
        with _CACHE_LOCK:
            return self._read_cached(jobs_dir, st)

    def _read_cached(self, jobs_dir: str, dir_st: os.stat_result) -> JobView:
        now = time.time()
        key = (dir_st.st_dev, dir_st.st_ino, dir_st.st_mtime_ns, dir_st.st_ctime_ns)
        log = _log_ident(jobs_dir)  # before the listing: a line written during it is read again
        old = _CACHE.get(jobs_dir)
        if old is not None and 0 <= now - old.full_at < RESCAN and not old.racy:
            if old.key == key and old.log == log:
                return old.view
            if log and old.log and log[0] == old.log[0] and log[1] > old.log[1]:
                names = _logged_names(jobs_dir, old.log[1], log[1])
                if names is not None:
                    return self._apply(jobs_dir, old, key, log, names)
        return self._scan(jobs_dir, key, log, now, old)

    def _scan(
        self,
        jobs_dir: str,
        key: tuple[int, int, int, int],
        log: tuple[int, int] | None,
        now: float,
        old: _DirCache | None,
    ) -> JobView:
        """Every record: parsed again if its lstat changed (all of them every RESCAN)."""
        keep = old is not None and 0 <= now - old.full_at < RESCAN
        racy = key[2] / 1e9 > now - RACY or key[3] / 1e9 > now - RACY
        new = _DirCache(key, racy, log, {}, {}, {}, JobView({}, {}), old.full_at if keep else now)
        try:
            names = sorted(os.listdir(jobs_dir))
        except OSError as e:
            return self._view({}, [f"cannot read {jobs_dir}: {e.strerror or e}"])
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue  # tmp files of a writer that crashed or is still writing
            path = os.path.join(jobs_dir, name)
            try:
                lst = os.lstat(path)
            except FileNotFoundError:
                continue  # removed by a concurrent prune
            except OSError as e:
                new.problems[name] = f"{path}: corrupt job record: {e.strerror or e}"
                continue
            ident = (lst.st_ino, lst.st_size, lst.st_mtime_ns, lst.st_ctime_ns, lst.st_mode)
            if lst.st_ctime_ns / 1e9 > now - RACY:
                new.racy = True  # may change again within its timestamp's granularity
            if keep and old is not None and old.idents.get(name) == ident:
                got: Job | str | None = old.problems.get(name) or old.jobs.get(
                    job_id_of_record_name(name) or ""
                )
            else:
                got = self._parse(path, name)
            if got is not None:
                new.put(name, ident, got)
        return self._store(jobs_dir, new)

    def _apply(
        self,
        jobs_dir: str,
        old: _DirCache,
        key: tuple[int, int, int, int],
        log: tuple[int, int],
        names: set[str],
    ) -> JobView:
        """The last read plus the records the change log names: cost by changes, not records."""
        new = _DirCache(
            key, False, log, old.idents, dict(old.jobs), old.problems, old.view, old.full_at
        )
        for name in names:
            if "/" in name or name.startswith(".") or not name.endswith(".json"):
                continue  # never a record's name (only root writes the log, but still)
            new.drop(name)
            path = os.path.join(jobs_dir, name)
            try:
                lst = os.lstat(path)
            except OSError:
                continue  # written, then removed since
            got = self._parse(path, name)
            if got is not None:
                ident = (lst.st_ino, lst.st_size, lst.st_mtime_ns, lst.st_ctime_ns, lst.st_mode)
                new.put(name, ident, got)
        return self._store(jobs_dir, new)

    def _store(self, jobs_dir: str, new: _DirCache) -> JobView:
        new.view = self._view(new.jobs, [new.problems[n] for n in sorted(new.problems)])
        if len(_CACHE) >= _CACHE_MAX and jobs_dir not in _CACHE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[jobs_dir] = new
        return new.view

    def _parse(self, path: str, name: str) -> Job | str | None:
        """The record's Job, the problem line naming why not, or None when it is gone."""
        try:
            job_id = job_id_of_record_name(name)
            if job_id is None:
                raise ValueError("the file name is not one pruned writes for a job id")
            return self._read_record(path, job_id)
        except FileNotFoundError:
            return None  # removed by a concurrent prune
        except RecursionError:  # json nested thousands deep
            return f"{path}: corrupt job record: nested too deeply"
        except (OSError, ValueError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return f"{path}: corrupt job record: {msg.splitlines()[0]}"

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
    with _locked(os.path.dirname(path)):
        write_json_atomic(path, {**rec, "source": "statedir"})
        _log_changes(os.path.dirname(path), [os.path.basename(path)])
    return path


def end_job_record(state_dir: str, job_id: str, end: float, uid: int | None = None) -> bool:
    """Mark a job ended (`pruned epilog`). False when it has no record and no `uid` to make one.

    With `uid`, a missing record (the prolog did not run) is created already ended.
    """
    path = job_record_path(state_dir, job_id)
    ensure_private_dir(state_dir)
    ensure_private_dir(os.path.dirname(path))
    with _locked(os.path.dirname(path)):  # no prune between the read and the write
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
            obj = {
                "job_id": job_id, "uid": uid, "start": float(end), "end": float(end), "user": None
            }  # fmt: skip
        write_json_atomic(path, {**obj, "source": "statedir"})
        _log_changes(os.path.dirname(path), [os.path.basename(path)])
    return True


@contextlib.contextmanager
def _locked(directory: str | int) -> Iterator[None]:
    """flock the jobs/ directory (a path or an open fd): writers against a prune deciding.

    Waits at most LOCK_WAIT, then goes on unlocked: a prolog must not hang on a stuck daemon,
    and without the lock the worst case is a prune racing one rewrite, which the prune's
    inode check narrows to a few instructions.
    """
    fd = directory if isinstance(directory, int) else os.open(directory, _O_DIR)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        locked = False
        while not locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if not isinstance(directory, int):
            os.close(fd)


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_RECORD = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class RecordPrune:
    """What one prune of the jobs/ directory did."""

    removed: tuple[str, ...] = ()  # job ids whose records went
    tmp_removed: int = 0  # tmp files a crashed writer left
    kept_running: int = 0
    kept_young: int = 0
    problems: tuple[str, ...] = ()  # records that cannot be judged: kept, and named


def _stale_tmp_of_record(name: str) -> bool:
    """`.<record name>.tmp.<pid>.<ns>`: the tmp file write_atomic makes for a record."""
    if not name.startswith("."):
        return False
    head, sep, tail = name[1:].partition(TMP_MARK)
    pid, _, ns = tail.partition(".")
    return bool(sep) and job_id_of_record_name(head) is not None and pid.isdigit() and ns.isdigit()


def prune_records(state_dir: str, older_than: float, now: float | None = None) -> RecordPrune:
    """Remove the records of jobs that ended before epoch `older_than`.

    Only names pruned writes (record_name, and its writers' stale tmp files) are touched, all
    through an fd of jobs/ opened without following a symlink anywhere in its path. A record
    without an end (a running job) or ended at or after `older_than` stays. A record that is a
    symlink, not a regular file, not root-only, or cannot be parsed stays and is named in
    `problems`. Just before the unlink the name must still be the file that was judged (a
    writer may have replaced it), under the writers' lock.
    """
    now = time.time() if now is None else now
    jobs_dir = os.path.join(state_dir, JOBS_SUBDIR)
    if not os.path.lexists(jobs_dir):
        return RecordPrune()  # no prolog or epilog has run here
    try:
        dfd = open_dir_path(jobs_dir)
    except (WalkError, OSError) as e:
        return RecordPrune(problems=(f"job records {jobs_dir}: cannot prune: {e}",))
    removed: list[str] = []
    problems: list[str] = []
    tmp_removed = running = young = 0
    try:
        if why := _check_private(jobs_dir, os.fstat(dfd)):
            return RecordPrune(problems=(f"{why}: not pruned",))
        with os.scandir(dfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path = os.path.join(jobs_dir, name)
            if _stale_tmp_of_record(name):
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_mtime < now - _STALE_TMP_AGE:
                        os.unlink(name, dir_fd=dfd)
                        tmp_removed += 1
                continue
            job_id = job_id_of_record_name(name)
            if job_id is None:
                continue  # not a name pruned writes: never touched (read() reports it)
            try:
                fd = os.open(name, _O_RECORD, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as e:
                why = "a symlink" if e.errno == errno.ELOOP else e.strerror
                problems.append(f"{path}: not pruned: {why}")
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    problems.append(f"{path}: not pruned: not a regular file")
                    continue
                if why := _check_private(path, st):
                    problems.append(f"{why}: not pruned")
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    rec = parse_record(json.loads(f.read()), job_id)
            except RecursionError:
                problems.append(f"{path}: corrupt job record: nested too deeply; not pruned")
                continue
            except (OSError, ValueError) as e:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                problems.append(f"{path}: corrupt job record: {msg.splitlines()[0]}; not pruned")
                continue
            finally:
                os.close(fd)
            if rec.end is None:
                running += 1
                continue
            if rec.end >= older_than:
                young += 1
                continue
            with _locked(dfd):
                try:
                    cur = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                        continue  # rewritten since it was read (a reused job id): judge it later
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    problems.append(f"{path}: cannot remove: {e.strerror}")
                    continue
            removed.append(job_id)
        # The log only grows between prunes: start it afresh (readers scan once), under the
        # writers' lock so that no line of theirs is lost in the swap.
        with _locked(dfd):
            _reset_log(dfd)
    finally:
        os.close(dfd)
    return RecordPrune(tuple(removed), tmp_removed, running, young, tuple(problems))


def prune_job_records(state_dir: str, older_than: float) -> int:
    """prune_records, counting the records removed."""
    return len(prune_records(state_dir, older_than).removed)
