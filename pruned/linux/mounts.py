"""The mount table: /proc/self/mountinfo parsing, and lazy unmounting of what sits below a
path (job_container leftovers). Nothing here follows a path through user-writable dirs
except umount2, which callers first check with dirfd.open_dir_path (UMOUNT_NOFOLLOW only
guards the last component)."""

from __future__ import annotations

import ctypes
import errno
import os
import re

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")


def _unescape(field_: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for space, \\011, \\012, \\134: all the kernel
    writes); any other backslash stays as it is."""
    if "\\" not in field_:
        return field_
    raw = _OCTAL.sub(lambda m: bytes((int(m[1], 8),)), field_.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")  # lossless: the path names the real mount


def mount_points(mountinfo: str) -> list[str]:
    """Mount point paths in /proc/self/mountinfo text, in mount order."""
    out = []
    # Only "\n" ends a line and only " " separates fields: the kernel escapes space, tab,
    # newline and backslash in paths but no other character that str.splitlines() or
    # str.split() would also split at (\r, \v, \f, \x1c-\x1f, \x85, \xa0, \u2028, ...).
    for line in mountinfo.split("\n"):
        cols = line.split(" ")
        if len(cols) > 4:
            out.append(_unescape(cols[4]))
    return out


def _read_mountinfo() -> str:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def read_mount_points() -> frozenset[str]:
    """The mount point paths of this mount namespace now."""
    return frozenset(mount_points(_read_mountinfo()))


def mounts_below(path: str, mountinfo: str) -> list[str]:
    """Mount points at `path` or under it, deepest (and latest) first."""
    path = path.rstrip("/")
    found = [m for m in mount_points(mountinfo) if m == path or m.startswith(path + "/")]
    return list(reversed(found))


def detach_mounts(path: str, *, dry_run: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Lazily unmount everything mounted at or below `path`: (detached, [(mount, error)])."""
    done: list[str] = []
    errors: list[tuple[str, str]] = []
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(64):  # stacked mounts on one point come off one per pass
        todo = [m for m in mounts_below(path, _read_mountinfo()) if m not in dict(errors)]
        if not todo:
            break
        if dry_run:
            return todo, errors
        for m in todo:
            if libc.umount2(os.fsencode(m), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
                done.append(m)
            else:
                err = ctypes.get_errno()
                if err != errno.EINVAL:  # EINVAL: already gone with its parent
                    errors.append((m, os.strerror(err)))
    return done, errors
