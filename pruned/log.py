"""Operational messages: one funnel for the daemon, the event reactor and the event watcher.

Not the audit trail (pruned.act.audit writes that, and never through here). Under systemd,
where stderr is the journal's stream ($JOURNAL_STREAM names its device and inode), each
message is sent to journald as a structured entry with PRIORITY and SYSLOG_IDENTIFIER=pruned,
so `journalctl -t pruned -p warning` shows it beside the audit warnings. Anywhere else (a
terminal, a test, a cron job) it is one line `pruned: <message>` on stderr. A message never
fails its caller: if journald refuses it, it goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from enum import IntEnum

from pruned.text import printable

IDENTIFIER = "pruned"


class Priority(IntEnum):
    """syslog(3) levels, as journald's PRIORITY field takes them."""

    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6


def _stderr_is_journal() -> bool:
    """Whether fd 2 is the stream systemd connected to journald (systemd.exec(5))."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _journal_send(message: str, priority: Priority) -> bool:
    try:
        from systemd import journal
    except ImportError:
        return False
    try:
        journal.send(message, PRIORITY=str(int(priority)), SYSLOG_IDENTIFIER=IDENTIFIER)
    except Exception:  # OSError, or a value the binding will not take: stderr gets it
        return False
    return True


def emit(priority: Priority, message: str) -> None:
    """Say one line, to journald under systemd and to stderr otherwise."""
    # A message may quote a comm, a path or an exception about one: bytes that are not UTF-8
    # and control characters are shown as \xNN (pruned.text), so no encoder fails on it.
    line = printable(message.replace("\n", " "))
    if _stderr_is_journal() and _journal_send(line, priority):
        return
    with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing left to tell
        print(f"{IDENTIFIER}: {line}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    """Something failed that an admin must look at."""
    emit(Priority.ERR, message)


def bug(what: str, e: BaseException) -> None:
    """An unexpected exception pruned caught to carry on: error, with where it came from (the
    innermost frames of its traceback), so a programming error stays visible."""
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)
    )
    error(f"{what}: {type(e).__name__}: {e}" + (f" (at {where})" if where else ""))


def warning(message: str) -> None:
    """Something went wrong and pruned carries on (degraded, or with the last good state)."""
    emit(Priority.WARNING, message)


def info(message: str) -> None:
    """Worth knowing, nothing wrong."""
    emit(Priority.INFO, message)
