"""pruned.ticker: periodic jobs on the monotonic clock.

The pure deadline arithmetic, then a real Periodic thread while this process's time.time()
jumps an hour backwards and forwards: the runs keep their interval. A Periodic with an
injected clock shows it reads no other. The real daemon under a real realtime step (via
libfaketime, which also moves datetime.now()) is tests/real/test_clock_step.py.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from pruned.ticker import Periodic, next_due


@pytest.mark.parametrize(
    ("due", "interval", "now", "want"),
    [
        (10.0, 2.0, 10.5, 12.0),  # on time: keeps its phase
        (10.0, 2.0, 12.0, 14.0),  # returned exactly at the next deadline: that one is missed
        (10.0, 2.0, 17.5, 18.0),  # ran past three deadlines: coalesced into one, phase kept
        (10.0, 0.0, 11.0, 11.0),
    ],
)
def test_next_due(due, interval, now, want) -> None:
    assert next_due(due, interval, now) == want


def runs_of(job: Periodic, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while job.runs < n:
        assert time.monotonic() < deadline, f"only {job.runs} runs in {timeout}s"
        time.sleep(0.01)


def test_a_wall_clock_step_neither_stalls_nor_bunches_runs(monkeypatch) -> None:
    """time.time() steps -1h, then +2h, between runs; the gaps stay the interval."""
    stamps: list[float] = []
    step = threading.Event()
    real_time = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])

    def tick() -> None:
        stamps.append(time.monotonic())
        time.time()  # whatever the job itself reads, the ticker must not care
        if len(stamps) in (3, 6):
            offset[0] += -3600.0 if len(stamps) == 3 else 7200.0
            step.set()

    job = Periodic("t", tick, lambda: 0.1).start()
    try:
        runs_of(job, 9, 10.0)
    finally:
        job.stop()
        assert job.join(2.0)
    assert step.is_set()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(0.05 < g < 1.0 for g in gaps), gaps  # no hour-long stall, no burst of catch-ups


def test_injected_clock_is_the_only_clock() -> None:
    """With a frozen injected clock nothing is due after the first run; advancing it is."""
    now = [100.0]
    ran = threading.Event()
    count = [0]

    def tick() -> None:
        count[0] += 1
        ran.set()

    job = Periodic("c", tick, lambda: 0.1, clock=lambda: now[0]).start()
    try:
        assert ran.wait(2)
        ran.clear()
        time.sleep(0.5)  # five real intervals
        assert count[0] == 1, "a frozen monotonic clock: the next run is not due"
        now[0] += 0.1
        assert ran.wait(2)
        assert count[0] == 2
    finally:
        job.stop()
        assert job.join(2.0)


def test_kick_during_a_run_makes_one_more_run_and_a_failing_run_goes_on() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            release.wait(5)
            raise RuntimeError("one bad run")

    job = Periodic("k", tick, lambda: 3600.0).start()
    try:
        assert started.wait(2)
        job.kick()
        job.kick()  # two kicks during one run: one more run
        release.set()
        runs_of(job, 2, 5.0)
        time.sleep(0.2)
        assert len(calls) == 2
    finally:
        job.stop()
        assert job.join(2.0)


def test_reschedule_brings_a_shorter_interval_forward() -> None:
    interval = [3600.0]
    count = [0]
    job = Periodic("r", lambda: count.__setitem__(0, count[0] + 1), lambda: interval[0]).start()
    try:
        runs_of(job, 1, 2.0)
        interval[0] = 0.05
        job.reschedule()
        runs_of(job, 3, 2.0)  # not an hour from now
    finally:
        job.stop()
        assert job.join(2.0)
