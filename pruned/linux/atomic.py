"""Crash-safe file writes: a reader (or a reboot) sees the old file or the new one, never half.

One writer for every file pruned replaces: the job history, the state-dir job records and the
node_exporter textfile. The temp file is made beside the target (a rename across filesystems
is not atomic) with O_EXCL|O_NOFOLLOW, so a user cannot pre-plant it or point it elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

DIR_MODE = 0o700
FILE_MODE = 0o600
TMP_MARK = ".tmp."


def ensure_private_dir(path: str) -> None:
    """Create `path` (and parents) as a 0700 directory; tighten it if we own it and it is looser."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.stat(path)
    # Only fix a directory we own: chmod-ing somebody else's dir would hide a misconfiguration.
    if st.st_uid == os.geteuid() and st.st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)


def write_atomic(path: str, data: bytes, mode: int = FILE_MODE, *, durable: bool = True) -> None:
    """Replace `path` with `data`: temp file in the same dir, (fsync,) rename, (fsync of the dir).

    `durable=False` skips both fsyncs: for files rewritten every sweep whose loss in a crash
    costs nothing (metrics), where a per-sweep fsync would only load the disk.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}.{time.monotonic_ns()}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)


def write_json_atomic(path: str, obj: Any, mode: int = FILE_MODE) -> None:
    """write_atomic of `obj` as indented, key-sorted JSON."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", mode)


def remove_stale_tmp(directory: str, name: str, min_age: float = 600.0) -> None:
    """Remove temp files a crashed writer of `name` left in `directory`.

    Only files older than `min_age`: a younger one may belong to a writer still running.
    """
    prefix = f".{name}{TMP_MARK}"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    cutoff = time.time() - min_age
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        path = os.path.join(directory, entry)
        try:
            if os.lstat(path).st_mtime < cutoff:
                os.unlink(path)
        except OSError:
            pass
