"""The two removals built on the fd-relative walker: a whole job directory, one uid's files.

`remove_tree` is the job-directory path (everything goes, entries by their dirent type);
`remove_owned_files` the loose-files path (one uid's entries older than min_age, each
lstat'ed). Both open their start with pruned.linux.dirfd and never leave its mount.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from pruned.linux.dirfd import O_DIR, Statx, WalkError, open_dir_path
from pruned.linux.fdwalk import Frame, RemoveStats, Walker
from pruned.linux.guards import Guards, read_guards
from pruned.linux.mounts import read_mount_points


def _free_bytes(fd: int) -> int:
    v = os.fstatvfs(fd)
    return v.f_bfree * v.f_frsize


def _mounts_if_needed(mnt: int | None) -> frozenset[str] | None:
    return read_mount_points() if mnt is None else None


# ---------------------------------------------------------------- public entry points


def remove_tree(
    parent: str | int,
    name: str,
    *,
    root_dev: int | None = None,
    dry_run: bool,
    guards: Guards | None = None,
    max_listed: int = 20,
    owners: Iterable[int] | None = None,
    allow_own_mount: bool = False,
) -> RemoveStats:
    """Remove directory `name` inside `parent` (a path opened component-wise, or a dir fd).

    Stays on `root_dev` (default: the parent's device) and the parent's mount; `owners`
    (when given) must include the directory's owner, else nothing is touched. With
    `allow_own_mount` the directory may itself be a mount (job_container dry-runs).
    Raises WalkError when the parent cannot be opened safely.
    """
    if not name or "/" in name or name in (".", ".."):
        raise WalkError(f"{name!r}: not a single path component")
    pfd = open_dir_path(parent) if isinstance(parent, str) else os.dup(parent)
    base = parent if isinstance(parent, str) else f"/proc/self/fd/{parent}"
    stats = RemoveStats()
    try:
        statx = Statx()
        pdev, pino, pmnt = statx(pfd)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return stats
        if not stat.S_ISDIR(st.st_mode):
            stats.skip(name, "not a directory")
            return stats
        if owners is not None and st.st_uid not in set(owners):
            stats.skip(name, f"owned by uid {st.st_uid}")
            return stats
        dev = pdev if root_dev is None else root_dev
        try:
            fd = os.open(name, O_DIR, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                stats.raced += 1
                stats.skip(name, "changed before it could be opened")
            else:
                stats.error(name, e.strerror or str(e))
            return stats
        fdev, fino, fmnt = statx(fd)
        root_mnt = fmnt if allow_own_mount else pmnt
        why = ""
        if (fdev, fino) != (st.st_dev, st.st_ino):
            why = "replaced before it could be opened"
            stats.raced += 1
        elif fdev != dev:
            why = "other filesystem"
        elif fmnt is not None and pmnt is not None and fmnt != pmnt and not allow_own_mount:
            why = "mount point"
        if why:
            os.close(fd)
            stats.skip(name, why)
            return stats
        walker = Walker(
            dry_run=dry_run,
            uid=None,
            cutoff=None,
            guards=guards if guards is not None else read_guards(),
            max_listed=max_listed,
            root_dev=dev,
            root_mnt=root_mnt,
            mounts=_mounts_if_needed(root_mnt),
            base_path=f"{base}/{name}",
        )
        walker.stats = stats
        parent_frame = Frame(None, "", pfd, pdev, pino, 0, False)
        top = Frame(parent_frame, name, fd, fdev, fino, st.st_mode, False)
        free_before = _free_bytes(fd)
        try:
            walker.run(top, False)
        finally:
            if top.fd is not None:
                os.close(top.fd)
        if top.clean and walker._remove(parent_frame, os.rmdir, name):
            stats.dirs += 1
            stats.removed_root = True
        if not dry_run:
            # Files are not stat'ed one by one (that halves the speed): count what the
            # filesystem got back instead. Other writers on it make this approximate.
            stats.bytes = max(0, _free_bytes(pfd) - free_before)
        return stats
    finally:
        os.close(pfd)


def remove_owned_files(
    root: str,
    uid: int,
    *,
    min_age: float,
    now: float,
    dry_run: bool,
    max_listed: int = 20,
    guards: Guards | None = None,
) -> RemoveStats:
    """Remove what `uid` owns in `root` whose mtime and ctime are older than now - min_age.

    Directories owned by uid are descended (whatever their age) and removed only once
    empty and old; entries of other uids are left, and the root itself is never removed.
    Raises WalkError when root cannot be opened safely.
    """
    fd = open_dir_path(root)
    statx = Statx()
    dev, ino, mnt = statx(fd)
    walker = Walker(
        dry_run=dry_run,
        uid=uid,
        cutoff=now - min_age,
        guards=guards if guards is not None else read_guards(),
        max_listed=max_listed,
        root_dev=dev,
        root_mnt=mnt,
        mounts=_mounts_if_needed(mnt),
        base_path=root.rstrip("/"),
    )
    frame = Frame(None, "", fd, dev, ino, 0o1777, False)
    try:
        walker.run(frame, True)
    finally:
        if frame.fd is not None:
            os.close(frame.fd)
    return walker.stats
