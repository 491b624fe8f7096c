"""Pidfds: a handle on one process that a reused pid cannot redirect.

Every signal pruned sends goes through a pidfd opened *before* the starttime re-check, so
a pid reused after the check can never receive it. A vanished process is data (`gone`),
not an error.
"""

from __future__ import annotations

import fcntl
import os
import resource
import select
import signal
import struct
import time
from collections.abc import Hashable, Iterator, Mapping
from typing import NamedTuple, TypeVar

from pruned.linux.procfs import StatFields, read_stat
from pruned.model import ProcKey, Result

K = TypeVar("K", bound=Hashable)


def raise_nofile() -> None:
    """Lift the soft fd limit to the hard one: a fork bomb needs one pidfd per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def live_stat(key: ProcKey, proc_root: str = "/proc") -> StatFields | None:
    """The stat of key's process if it is still that process and not a zombie, else None."""
    st = read_stat(key.pid, proc_root)
    if st is None or st.starttime != key.starttime or st.zombie:
        return None
    return st


def open_verified(key: ProcKey, proc_root: str = "/proc") -> int | None:
    """A pidfd for key's process, or None if it is gone, a zombie or its pid was reused.

    The pidfd is opened first and starttime checked after: if the check passes, the fd
    pins that very process and a later reuse of the pid cannot redirect its signals.
    """
    got = open_verified_stat(key, proc_root)
    return None if got is None else got[0]


def open_verified_stat(key: ProcKey, proc_root: str = "/proc") -> tuple[int, StatFields] | None:
    """open_verified, with the stat that verified it (ppid, session: the tree's walk needs them)."""
    try:
        fd = os.pidfd_open(key.pid)
    except ProcessLookupError:
        return None  # other errors (EMFILE...) are not "gone": the caller must hear of them
    st = live_stat(key, proc_root)
    if st is None:
        os.close(fd)
        return None
    return fd, st


# PIDFD_GET_INFO (Linux 6.13): _IOWR(0xFF, 11, struct pidfd_info) on its first 64 bytes
# (PIDFD_INFO_SIZE_VER0: mask, cgroupid, pid, tgid, ppid, ruid, ...). The credentials and
# v2 cgroup of the very process the fd pins, in one ioctl instead of formatting all of
# /proc/PID/status.
_PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
_INFO_CREDS = 2
_INFO_CGROUPID = 4
_INFO_ASK = 1 | _INFO_CREDS | _INFO_CGROUPID  # PIDFD_INFO_PID | CREDS | CGROUPID
_info_offered = True


class PidfdInfo(NamedTuple):
    """What PIDFD_GET_INFO tells of a process."""

    ruid: int
    cgroupid: int | None  # the v2 cgroup's id (its inode number); None when not reported


def pidfd_info(fd: int) -> PidfdInfo | None:
    """Real uid and v2 cgroup id of the pidfd's process; None when the kernel has no
    PIDFD_GET_INFO (the caller reads /proc). ProcessLookupError when it has exited."""
    global _info_offered
    if not _info_offered:
        return None
    buf = bytearray(64)
    struct.pack_into("Q", buf, 0, _INFO_ASK)
    try:
        fcntl.ioctl(fd, _PIDFD_GET_INFO, buf)
    except ProcessLookupError:
        raise
    except OSError:  # ENOTTY/EINVAL before 6.13
        _info_offered = False
        return None
    mask, cgroupid, _pid, _tgid, _ppid, ruid = struct.unpack_from("QQIIII", buf)
    if not mask & _INFO_CREDS:
        return None
    return PidfdInfo(ruid, cgroupid if mask & _INFO_CGROUPID else None)


def send_signal(fd: int, sig: int) -> str | None:
    """Signal through a pidfd; None on success, else the reason (Result.GONE or the error)."""
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return Result.GONE
    except OSError as e:
        return f"{signal.Signals(sig).name}: {os.strerror(e.errno or 0)}"
    return None


def wait_exits(fds: Mapping[K, int], until: float) -> Iterator[tuple[K, float]]:
    """Wait on the pidfds; yield (key, time.monotonic()) as each process exits, until `until`.

    epoll, not poll(): each wake-up costs the processes that exited, not all that are
    registered (a thousand pidfds that exit in batches made poll() quadratic)."""
    by_fd: dict[int, K] = {}
    with select.epoll(max(1, len(fds))) as ep:
        for key, fd in fds.items():
            ep.register(fd, select.EPOLLIN)
            by_fd[fd] = key
        while by_fd:
            left = until - time.monotonic()
            if left <= 0:
                return
            for fd, _ev in ep.poll(max(0.001, left)):
                key = by_fd.pop(fd, None)
                if key is not None:
                    ep.unregister(fd)
                    yield key, time.monotonic()
