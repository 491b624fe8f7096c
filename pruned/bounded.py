"""Run a one-shot body in a forked child that the caller can abandon at a deadline.

Why a child and not SIGALRM or a thread: a process blocked on a hung filesystem (a FUSE
daemon that never answers, NFS `hard`) sleeps in the kernel; a caught signal does not end
the wait (fs/fuse/dev.c request_wait_answer: after an interrupt it waits for fatal signals
only, and for a request the daemon has read, for nothing at all), so a Python handler
never runs. A thread stuck that way keeps its whole process from exiting. A child can be
left behind: the parent stops reading at the deadline, SIGKILLs it (it dies whenever the
kernel lets go) and returns. The child's stdin, stdout and stderr are not the caller's —
Slurm reads the epilog's output until EOF, which a stuck child holding it would never send.

The child reports through a pipe, one JSON object per line: `print` lines and audit
`record`s (emitted by the parent into the real sink, so a child abandoned mid-way cannot
write records after the parent's verdict), then `exit` with the body's result or `error`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from pruned.act.audit import AuditRecord, AuditSink
from pruned.linux.blocked import blocked_in


class ChildError(Exception):
    """The body raised in the child: type, message and the child's traceback."""

    def __init__(self, what: str, trace: str) -> None:
        super().__init__(what)
        self.trace = trace


@dataclass(frozen=True, slots=True)
class Abandoned:
    """The deadline passed before the child finished: what it was doing, if known."""

    pid: int
    elapsed: float
    where: str  # "in newfstatat() on /tmp/x, waiting in request_wait_answer", or ""


class _PipeSink:
    def __init__(self, send: Callable[[dict], None]) -> None:
        self._send = send

    def emit(self, record: AuditRecord) -> None:
        self._send({"record": [record.event, record.priority, dict(record.fields),
                               record.message]})


def _child(w: int, body: Callable[[AuditSink, Callable[[str], None]], int]) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def send(obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(w, data):]

    code = 70
    try:
        send({"exit": body(_PipeSink(send), lambda line: send({"print": line}))})
        code = 0
    except BaseException as e:  # report anything; the parent decides
        with contextlib.suppress(BaseException):
            send({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    finally:
        os._exit(code)


def run_bounded(
    body: Callable[[AuditSink, Callable[[str], None]], int],
    deadline: float,
    sink: AuditSink,
    print_fn: Callable[[str], None],
    on_record: Callable[[AuditSink, AuditRecord], None] | None = None,
) -> int | Abandoned:
    """Run body(sink, print_fn) in a forked child until the monotonic `deadline`.

    Its records and lines are passed on as they come. Returns the body's int, or Abandoned
    when the deadline passed first (the child got SIGKILL). Raises ChildError when the
    body raised, RuntimeError when the child died without a word.
    """
    emit = on_record or (lambda s, r: s.emit(r))
    r, w = os.pipe2(os.O_CLOEXEC)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(r)
        _child(w, body)
    os.close(w)
    buf = b""
    result: int | None = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                blocked = blocked_in(pid, pid)
                where = blocked.describe() if blocked else ""
                os.kill(pid, signal.SIGKILL)
                _reap(pid, 0.5)
                return Abandoned(pid, time.monotonic() - t0, where)
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break  # EOF: the child finished (or died)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "print" in msg:
                    print_fn(msg["print"])
                elif "record" in msg:
                    event, prio, fields, message = msg["record"]
                    emit(sink, AuditRecord(event, prio, fields, message))
                elif "exit" in msg:
                    result = int(msg["exit"])
                elif "error" in msg:
                    raise ChildError(msg["error"], msg.get("trace", ""))
    except BaseException:  # a ChildError, or the caller's own alarm: leave no child behind
        os.kill(pid, signal.SIGKILL)
        _reap(pid, 0.5)
        raise
    finally:
        os.close(r)
    status = _reap(pid, max(0.5, deadline - time.monotonic()))
    if result is None:
        raise RuntimeError(f"the epilog's worker (pid {pid}) ended without a result "
                           f"(wait status {status})")
    return result


def _reap(pid: int, timeout: float) -> int | None:
    """waitpid without blocking past `timeout`; the status, or None if it is still there
    (a child stuck in the kernel after SIGKILL: init reaps it when it finally dies)."""
    end = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() >= end:
            return None
        time.sleep(0.01)
