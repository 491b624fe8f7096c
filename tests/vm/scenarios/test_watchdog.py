"""systemd's watchdog restarts a hung daemon. pruned sends WATCHDOG=1 only at the end of a
completed process sweep; a daemon whose sweeps stop -- here SIGSTOPped, so nothing of it
runs -- misses the watchdog, systemd aborts it (WatchdogSignal, SIGABRT) and Restart=on-failure
starts it again, which then sweeps again. (WatchdogSec=10s by conftest's drop-in for this test
only, then 60 s again; the shipped unit has 180 s.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from conftest import Daemon, main_pid, watchdog_dropin
from vmlib import journal_after, journal_cursor, read_proc, sh, wait_for


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", "pruned.service", *(f"-p{p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def short_watchdog(enforcing: Daemon) -> Iterator[None]:
    watchdog_dropin(10)
    yield
    watchdog_dropin(60)


def test_a_hung_daemon_is_restarted_and_sweeps_again(short_watchdog: None) -> None:
    before = show("NRestarts", "MainPID", "WatchdogUSec")
    assert before["WatchdogUSec"] in ("10s", "10000000"), before
    pid = main_pid()
    old = read_proc(pid)
    assert old is not None
    cursor = journal_cursor()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("a restart", lambda: int(show("NRestarts")["NRestarts"])
                 > int(before["NRestarts"]), timeout=120)
    finally:
        # Only if the restart never came: the stopped process must not outlive the test.
        if (p := read_proc(pid)) is not None and p.starttime == old.starttime:
            os.kill(pid, signal.SIGCONT)
    pid1 = journal_after(cursor, _PID="1", UNIT="pruned.service")
    assert any("watchdog timeout" in e.get("MESSAGE", "").lower() for e in pid1), \
        [e.get("MESSAGE") for e in pid1]
    new = wait_for("the restarted daemon", lambda: (p := main_pid()) and p != pid and p, 60)
    wait_for("a sweep of the restarted daemon", lambda: journal_after(
        cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="sweep_summary", _PID=str(new)),
        timeout=90)
    st = show("ActiveState", "SubState")
    assert (st["ActiveState"], st["SubState"]) == ("active", "running"), st
    assert read_proc(pid) is None or read_proc(pid).starttime != old.starttime
