"""Carry out a cleanup plan: unmount job_container leftovers, then remove job directories and
loose files through the fd-relative walker. One outcome per item, ready for the audit."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pruned.linux.dirfd import WalkError, open_dir_path
from pruned.linux.fdremove import remove_owned_files, remove_tree
from pruned.linux.fdwalk import RemoveStats
from pruned.linux.guards import Guards, read_guards
from pruned.linux.ipc import remove_ipc
from pruned.linux.mounts import detach_mounts
from pruned.model import CleanupKind, IpcObject, Result
from pruned.rules.cleanplan import CleanupPlan, JobDirItem, LooseFilesItem


@dataclass(frozen=True, slots=True)
class CleanupOutcome:
    """One plan item carried out (or, dry-run, checked): the facts an audit record needs.

    `result`: DONE/WOULD removed something, GONE nothing there to remove, SKIPPED only
    things that must stay, FAILED an error (counts still say what went).
    """

    kind: CleanupKind
    uid: int
    path: str
    result: Result
    job_id: str | None = None
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    listed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # "relpath: why", capped at max_listed
    errors: tuple[str, ...] = ()  # "relpath: strerror", capped at max_listed
    detail: str = ""


def _outcome(
    kind: CleanupKind,
    uid: int,
    path: str,
    job_id: str | None,
    s: RemoveStats,
    dry_run: bool,
    cap: int,
    detail: str = "",
) -> CleanupOutcome:
    if s.errors:
        res = Result.FAILED
    elif s.files or s.dirs:
        res = Result.WOULD if dry_run else Result.DONE
    elif s.skipped:
        res = Result.SKIPPED
    else:
        res = Result.GONE
    notes = [detail] if detail else []
    if s.more_skipped or s.more_errors:
        notes.append(f"{s.more_skipped} more skipped, {s.more_errors} more errors")
    return CleanupOutcome(
        kind=kind,
        uid=uid,
        path=path,
        result=res,
        job_id=job_id,
        files=s.files,
        dirs=s.dirs,
        bytes=s.bytes,
        listed=tuple(s.listed[:cap]),
        skipped=tuple(f"{p}: {w}" for p, w in s.skipped[:cap]),
        errors=tuple(f"{p}: {w}" for p, w in s.errors[:cap]),
        detail="; ".join(notes),
    )


def _job_dir(item: JobDirItem, dry_run: bool, guards: Guards, cap: int) -> CleanupOutcome:
    parent, _, name = item.path.rstrip("/").rpartition("/")
    owners = (item.uid, 0)
    detail = ""
    kind = CleanupKind.JOB_DIR
    try:
        if item.container:
            try:
                os.lstat(item.path)  # root-only BasePath: a plain path is fine for a probe
            except FileNotFoundError:
                return CleanupOutcome(kind, item.uid, item.path, Result.GONE, item.job_id)
            # umount2 takes a path: refuse one that runs through a symlink (UMOUNT_NOFOLLOW
            # guards only the last component).
            os.close(open_dir_path(item.path))
            detached, errs = detach_mounts(item.path, dry_run=dry_run)
            if errs:
                s = RemoveStats(errors=[(m, e) for m, e in errs])
                return _outcome(
                    kind,
                    item.uid,
                    item.path,
                    item.job_id,
                    s,
                    dry_run,
                    cap,
                    "could not unmount",
                )
            if detached:
                verb = "would detach" if dry_run else "detached"
                detail = f"{verb} {len(detached)} mounts: {' '.join(detached[:cap])}"
        s = remove_tree(
            parent or "/",
            name,
            dry_run=dry_run,
            guards=guards,
            max_listed=cap,
            owners=owners,
            allow_own_mount=item.container and dry_run,
        )
    except WalkError as e:
        s = RemoveStats(errors=[(item.path, str(e))])
    except OSError as e:
        s = RemoveStats(errors=[(item.path, e.strerror or str(e))])
    return _outcome(kind, item.uid, item.path, item.job_id, s, dry_run, cap, detail)


def execute_cleanup(
    plan: CleanupPlan,
    dry_run: bool,
    guards: Guards | None = None,
    ipc_roots: tuple[str, str] = ("/proc", "/dev/mqueue"),
) -> list[CleanupOutcome]:
    """Carry out (or, dry-run, walk without removing) every item of `plan`, one outcome each
    (per root for loose files). One failing item never stops the others."""
    g = guards if guards is not None else read_guards()
    cap = plan.max_listed
    out: list[CleanupOutcome] = []
    for item in plan.job_dirs:
        out.append(_job_dir(item, dry_run, g, cap))
    for loose in plan.loose:
        out.extend(_loose(loose, plan, dry_run, g, cap))
    out.extend(_ipc(obj, dry_run, ipc_roots) for obj in plan.ipc)
    return out


def _ipc(obj: IpcObject, dry_run: bool, roots: tuple[str, str]) -> CleanupOutcome:
    """Remove one IPC object of a uid that is gone (re-checked right before: same object,
    unattached)."""
    why = None if dry_run else remove_ipc(obj, *roots)
    if why is None:
        res = Result.WOULD if dry_run else Result.DONE
    elif why == "gone":
        res = Result.GONE
    elif why.startswith(("attached", "changed")):
        res = Result.SKIPPED
    else:
        res = Result.FAILED
    detail = f"{obj.kind} key {obj.key:#x}, {obj.size} bytes"
    return CleanupOutcome(
        CleanupKind.IPC, obj.uid, obj.label, res, files=1 if why is None else 0,
        bytes=obj.size if why is None else 0,
        errors=(f"{obj.label}: {why}",) if res is Result.FAILED else (),
        skipped=(f"{obj.label}: {why}",) if res is Result.SKIPPED else (),
        detail=detail,
    )  # fmt: skip


def _loose(
    item: LooseFilesItem, plan: CleanupPlan, dry_run: bool, g: Guards, cap: int
) -> list[CleanupOutcome]:
    out = []
    for root in item.roots:
        try:
            s = remove_owned_files(
                root,
                item.uid,
                min_age=plan.min_age,
                now=plan.now,
                dry_run=dry_run,
                max_listed=cap,
                guards=g,
            )
        except WalkError as e:
            s = RemoveStats(errors=[(root, str(e))])
        except OSError as e:
            s = RemoveStats(errors=[(root, e.strerror or str(e))])
        out.append(_outcome(CleanupKind.LOOSE, item.uid, root, None, s, dry_run, cap))
    return out
