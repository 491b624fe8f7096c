"""Periodic jobs on the monotonic clock, one thread per job.

Why not APScheduler (which the daemon used before): its scheduler decides what is due and
how long to sleep from `datetime.now()`, the wall clock (apscheduler/schedulers/base.py
`_process_jobs`), and offers no clock hook. A realtime step of an hour backwards left every
job's next run an hour in the future: no sweep, no WATCHDOG=1, systemd kills the daemon;
a trigger of our own cannot help, the scheduler's wait is computed outside it. Here a job's
next run is a CLOCK_MONOTONIC deadline, and the waits are `threading.Event.wait`, which
CPython 3.11+ takes on CLOCK_MONOTONIC too (sem_clockwait, glibc >= 2.30).

One thread per job gives what the daemon needs without a pool: a job never overlaps
itself (the next run waits for the last to return), late runs coalesce into one, and a job
stuck in the kernel (a file walk on a hung filesystem) holds only its own thread, never the
process sweep's or the job refresh's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pruned import log


def next_due(due: float, interval: float, now: float) -> float:
    """The next deadline after a run that was due at `due` and returned at `now`. Pure.

    Runs keep their phase (due + k*interval) while on time; one that ran past one or more
    deadlines coalesces them: the next run is the first deadline still ahead of `now`.
    """
    if interval <= 0:
        return now
    nxt = due + interval
    if nxt <= now:
        nxt += ((now - nxt) // interval + 1) * interval
    return nxt


class Periodic:
    """Run `fn` now (or after `delay`) and then every `interval()` seconds in its own thread.

    `interval` is read after every run, so a reload that changes it takes effect at the next
    deadline. An exception in `fn` is logged and the job goes on. `clock` is injectable
    for tests; it must be monotonic.
    """

    def __init__(self, name: str, fn: Callable[[], object], interval: Callable[[], float],
                 *, delay: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.fn = fn
        self.interval = interval
        self.clock = clock
        self._due = clock() + delay
        self._wake = threading.Event()
        self._kicked = False
        self._stopping = False
        self.running_since: float | None = None  # clock() when the current run began
        self.native_id: int | None = None  # the worker's kernel tid (for /proc/self/task)
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name=f"pruned-{name}", daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def kick(self) -> None:
        """Run as soon as the current run (if any) returns; kicks meanwhile make one run."""
        self._kicked = True
        self._wake.set()

    def reschedule(self) -> None:
        """Re-read the interval now (a reload changed it): the next run is at most one new
        interval away, never later than it was."""
        self._due = min(self._due, self.clock() + self.interval())
        self._wake.set()

    def stop(self) -> None:
        """Ask the loop to end; a running `fn` is not interrupted."""
        self._stopping = True
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        self.native_id = threading.get_native_id()
        while not self._stopping:
            wait = self._due - self.clock()
            if wait > 0 and not self._kicked:
                self._wake.wait(wait)
                self._wake.clear()
                continue  # re-check: a stop, a kick, or the deadline
            kicked, self._kicked = self._kicked, False
            self.running_since = self.clock()
            try:
                self.fn()
            except Exception as e:  # one failed run must not end the job
                log.error(f"{self.name}: {type(e).__name__}: {e}")
            finally:
                self.running_since = None
                self.runs += 1
            now = self.clock()
            # A kicked run may come early: the next is one interval after it, not later.
            self._due = now + self.interval() if kicked else next_due(self._due,
                                                                       self.interval(), now)
