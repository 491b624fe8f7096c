"""Pidfds: a handle on one process that a reused pid cannot redirect.

Every signal pruned sends goes through a pidfd opened *before* the starttime re-check, so
a pid reused after the check can never receive it. A vanished process is data (`gone`),
not an error.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import time
from collections.abc import Hashable, Iterator, Mapping
from typing import TypeVar

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
    try:
        fd = os.pidfd_open(key.pid)
    except ProcessLookupError:
        return None  # other errors (EMFILE...) are not "gone": the caller must hear of them
    if live_stat(key, proc_root) is None:
        os.close(fd)
        return None
    return fd


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
    """poll() the pidfds; yield (key, time.monotonic()) as each process exits, until `until`."""
    poller = select.poll()
    by_fd: dict[int, K] = {}
    for key, fd in fds.items():
        poller.register(fd, select.POLLIN)
        by_fd[fd] = key
    while by_fd:
        left = until - time.monotonic()
        if left <= 0:
            return
        for fd, _ev in poller.poll(max(1, int(left * 1000))):
            key = by_fd.pop(fd, None)
            if key is not None:
                when = time.monotonic()
                poller.unregister(fd)
                yield key, when
