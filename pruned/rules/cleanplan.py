"""Which files of ended jobs to remove: a pure plan, shared by dry-run and real runs.

`plan_cleanup` reads nothing and changes nothing; `pruned.act.remove.execute_cleanup` carries a
plan out (or reports what it would do) by walking directory file descriptors.

Loose files are planned only for uids pruned *knows* ran jobs here: a uid that never had a
job on this node (a service account, a login-only user) is never touched, whatever it owns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from pruned.model import CleanupPolicy, IpcObject, Job
from pruned.rules.trust import is_system_uid

# What may be substituted into a path: no "/", no leading "." (so never "." or ".."), no NUL.
# "[" and "]" appear in Torque/PBS array job ids (123[4].server).
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_+@=\[\]-][A-Za-z0-9_.+@=\[\]-]*")


class EndedJob(Protocol):
    """What the plan needs from an ended job record (pruned.jobs.history.JobRecord fits)."""

    @property
    def job_id(self) -> str: ...
    @property
    def uid(self) -> int: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float | None: ...
    @property
    def user(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class JobDirItem:
    """Remove the directory `path` that ended job `job_id` of `uid` left.

    `container` marks a job_container/tmpfs directory: its mounts are detached first and
    the directory itself may be owned by root.
    """

    job_id: str
    uid: int
    path: str
    reason: str
    container: bool = False


@dataclass(frozen=True, slots=True)
class LooseFilesItem:
    """Remove files owned by `uid` older than `min_age` at the top of each of `roots`."""

    uid: int
    roots: tuple[str, ...]
    reason: str
    last_job: str = ""
    last_end: float = 0.0


@dataclass(frozen=True, slots=True)
class CleanupPlan:
    """Everything one file sweep would remove, and why some uids/jobs were held back."""

    job_dirs: tuple[JobDirItem, ...]
    loose: tuple[LooseFilesItem, ...]
    held: tuple[str, ...]  # one line per ended job / uid deliberately left alone
    now: float
    min_age: float
    max_listed: int
    ipc: tuple[IpcObject, ...] = ()  # IPC objects of the loose-files uids, unattached

    @property
    def items(self) -> tuple[JobDirItem | LooseFilesItem, ...]:
        return (*self.job_dirs, *self.loose)


def safe_token(value: str) -> bool:
    """True when `value` can be put into a path as one component (no '/', '..', NUL)."""
    return bool(_SAFE_TOKEN.fullmatch(value))


def expand_pattern(pattern: str, job_id: str, uid: int, user: str | None) -> str | None:
    """The path `pattern` names for one job, or None when it cannot be filled safely."""
    if "{user}" in pattern and (user is None or not safe_token(user)):
        return None
    if not safe_token(job_id):
        return None
    path = (
        pattern.replace("{job_id}", job_id).replace("{uid}", str(uid)).replace("{user}", user or "")
    )
    return path if _clean_abs(path) else None


def _clean_abs(path: str) -> bool:
    """Absolute, normalised, at least two components deep, no '.'/'..' and no braces left."""
    if not path.startswith("/") or "{" in path or "}" in path or "\0" in path:
        return False
    parts = path.split("/")[1:]
    return len(parts) >= 2 and all(p not in ("", ".", "..") for p in parts)


def plan_cleanup(
    policy: CleanupPolicy,
    running: Sequence[Job],
    ended: Sequence[EndedJob],
    live_uids: Set[int],
    system_ranges: Sequence[tuple[int, int]],
    now: float,
    nodes: Sequence[str] = (),
    dir_grace: float | None = None,
    ipc: Sequence[IpcObject] = (),
) -> CleanupPlan:
    """The cleanup plan for one sweep.

    `running` are the node's running jobs, `ended` the remembered job records (records
    with `end is None` count as not ended), `live_uids` the uids owning any live process,
    `nodes` the node names under `job_container_base` (Slurm's BasePath/<node>/<job>).
    `dir_grace`: how long after its end a job's directories wait (default the policy's
    min_age, as loose files do: an end seen from the outside may be a job between steps);
    the epilog, which is told the job ended, passes 0. `ipc`: the node's IPC objects; those
    of a uid whose loose files go (no job, no process, its last job ended min_age ago) go
    too, unless attached.
    """
    grace = policy.min_age if dir_grace is None else dir_grace
    held: list[str] = []
    running_ids = {j.job_id for j in running}
    running_uids = {j.uid for j in running if j.uid is not None}
    dirs: dict[str, JobDirItem] = {}
    last: dict[int, EndedJob] = {}
    unknown_end: set[int] = set()

    for rec in ended:
        if rec.end is None:
            unknown_end.add(rec.uid)
            continue
        if is_system_uid(rec.uid, system_ranges):
            held.append(f"job {rec.job_id}: uid {rec.uid} is a system uid")
            continue
        if rec.job_id in running_ids:
            held.append(f"job {rec.job_id}: running again (requeued?)")
            continue
        prev = last.get(rec.uid)
        if prev is None or (rec.end, rec.job_id) > (prev.end or 0.0, prev.job_id):
            last[rec.uid] = rec
        if not policy.enabled:
            continue
        if now - rec.end < grace:
            held.append(
                f"job {rec.job_id}: ended {now - rec.end:.0f}s ago; its dirs wait {grace:g}s"
            )
            continue
        busy_uid = rec.uid in running_uids or rec.uid in live_uids
        for path, container, per_job in _job_paths(policy, rec, nodes):
            if path is None:
                held.append(f"job {rec.job_id}: cannot fill a job_dirs pattern safely")
            elif not per_job and busy_uid:
                # A pattern without {job_id} names a per-user dir: other jobs may use it.
                held.append(f"job {rec.job_id}: {path} is per-user and uid {rec.uid} is active")
            elif path not in dirs:
                why = f"job {rec.job_id} of uid {rec.uid} ended at {rec.end:.0f}"
                dirs[path] = JobDirItem(rec.job_id, rec.uid, path, why, container)

    loose: list[LooseFilesItem] = []
    if policy.enabled and policy.loose_files and policy.roots:
        for uid in sorted(last):
            rec = last[uid]
            end = rec.end or 0.0
            if uid in running_uids:
                held.append(f"uid {uid}: has a running job")
            elif uid in live_uids:
                held.append(f"uid {uid}: has a live process")
            elif uid in unknown_end:
                held.append(f"uid {uid}: a job without a known end")
            elif now - end < policy.min_age:
                held.append(f"uid {uid}: last job {rec.job_id} ended {now - end:.0f}s ago")
            else:
                why = (
                    f"uid {uid}: no running job, no live process, last job {rec.job_id} "
                    f"ended {now - end:.0f}s ago"
                )
                loose.append(LooseFilesItem(uid, tuple(policy.roots), why, rec.job_id, end))

    gone_uids = {item.uid for item in loose}
    ipc_items = []
    for obj in ipc:
        if obj.uid not in gone_uids:
            continue
        if obj.nattch:
            held.append(f"uid {obj.uid}: {obj.label} is attached by {obj.nattch} process(es)")
        else:
            ipc_items.append(obj)
    return CleanupPlan(
        job_dirs=tuple(dirs.values()),
        loose=tuple(loose),
        held=tuple(held),
        now=now,
        min_age=policy.min_age,
        max_listed=policy.max_listed,
        ipc=tuple(ipc_items),
    )


def _job_paths(
    policy: CleanupPolicy, rec: EndedJob, nodes: Sequence[str]
) -> list[tuple[str | None, bool, bool]]:
    """(path or None when unsafe, is-container, names-the-job) for each per-job directory."""
    out: list[tuple[str | None, bool, bool]] = [
        (expand_pattern(p, rec.job_id, rec.uid, rec.user), False, "{job_id}" in p)
        for p in policy.job_dirs
    ]
    base = policy.job_container_base
    if base:
        base = base.rstrip("/")
        out.append((expand_pattern(base + "/{job_id}", rec.job_id, rec.uid, rec.user), True, True))
        for node in nodes:
            if safe_token(node):
                pat = f"{base}/{node}/{{job_id}}"
                out.append((expand_pattern(pat, rec.job_id, rec.uid, rec.user), True, True))
    return out
