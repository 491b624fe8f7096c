"""A realtime clock step of an hour, backwards and forwards, under the real daemon.

The daemon runs under libfaketime (Debian's faketime package), whose offset is re-read from
a file on every call: writing "-3600" steps the daemon's wall clock an hour back, as
settimeofday or a bad NTP server would, without touching this machine's clock.
CLOCK_MONOTONIC is left alone (FAKETIME_DONT_FAKE_MONOTONIC=1), as a real step leaves it.
The sweeps must keep their interval: no WATCHDOG=1 gap reaches WATCHDOG_USEC (what
systemd would kill the daemon for). Under the old APScheduler loop the step backwards
stalled every job for an hour.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest

from tests.real.test_daemon import start_daemon, write_policy  # noqa: F401

pytestmark = pytest.mark.root

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
WATCHDOG_S = 6.0  # the sweep interval is half of it; a loaded shared machine slows sweeps


def watchdog_gaps(d, since: float) -> list[float]:
    dogs = [t for t, s in d.notify.lines() if s == "WATCHDOG=1" and t >= since]
    return [b - a for a, b in itertools.pairwise(dogs)]


@pytest.mark.skipif(not os.path.exists(LIBFAKETIME), reason="needs Debian's faketime")
def test_wall_clock_steps_neither_stall_sweeps_nor_trip_the_watchdog(
    tmp_path, make_user, start_daemon  # noqa: F811
):
    user = make_user("prc")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
           "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
    d = start_daemon(write_policy(tmp_path, schedule={"sweep": "10m"}), [user.uid], env=env)
    d.ready(timeout=60)
    for step in ("-3600", "+3600", "+0"):
        t = time.monotonic()
        offset.write_text(step + "\n")
        time.sleep(3 * WATCHDOG_S)
        gaps = watchdog_gaps(d, t)
        assert len(gaps) >= 4, f"after a step to {step}: {d.notify.lines()[-6:]}"
        assert max(gaps) < WATCHDOG_S, f"after a step to {step}: gaps {gaps}"
        assert d.proc.poll() is None
    assert d.stop() == 0
