"""Directory file descriptors opened safely: component by component, never through a symlink.

The building blocks of the fd-relative walker (pruned.linux.fdwalk) and of anything that must
open a path in a directory users can write to: `open_dir_path` from / with O_NOFOLLOW, and
`Statx` for the identity and mount id of an open fd (what was opened is what was listed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC = 0x7FF
_STATX_MNT_ID = 0x1000


class WalkError(Exception):
    """A root or parent path cannot be opened safely; the message is one line."""


# ---------------------------------------------------------------- statx on an open fd


class Statx:
    """statx(fd, "", AT_EMPTY_PATH) through libc: identity and mount id of an open directory."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(256)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.fn = libc.statx
            self.fn.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.c_void_p,
            ]
        except (AttributeError, OSError):
            self.fn = None

    def __call__(self, fd: int) -> tuple[int, int, int | None]:
        """(st_dev, st_ino, mount id or None when the kernel cannot say)."""
        if self.fn is not None:
            rc = self.fn(
                fd,
                b"",
                _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW,
                _STATX_BASIC | _STATX_MNT_ID,
                self.buf,
            )
            if rc == 0:
                raw = self.buf.raw
                mask = struct.unpack_from("=I", raw, 0)[0]
                ino = struct.unpack_from("=Q", raw, 32)[0]
                major, minor = struct.unpack_from("=II", raw, 136)
                mnt = struct.unpack_from("=Q", raw, 144)[0] if mask & _STATX_MNT_ID else None
                return os.makedev(major, minor), ino, mnt
        st = os.fstat(fd)
        return st.st_dev, st.st_ino, None


# ---------------------------------------------------------------- opening a path safely


def open_dir_path(path: str) -> int:
    """An O_RDONLY fd of directory `path`, opened component by component from / with
    O_NOFOLLOW: a symlink anywhere in the path is refused (WalkError), never followed."""
    if not path.startswith("/"):
        raise WalkError(f"{path}: not an absolute path")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise WalkError(f"{path}: '.' or '..' in path")
    fd = os.open("/", O_DIR)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, O_DIR, dir_fd=fd)
            except OSError as e:
                where = "/" + "/".join(parts[: i + 1])
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise WalkError(f"{where}: not a directory (or a symlink)") from None
                raise WalkError(f"{where}: {e.strerror}") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def container_nodes(base: str) -> list[str]:
    """Names of the real subdirectories of a job_container BasePath (its node names)."""
    try:
        fd = open_dir_path(base)
    except (WalkError, OSError):
        return []
    try:
        with os.scandir(fd) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    finally:
        os.close(fd)
