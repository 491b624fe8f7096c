"""(c) The shipped unit under real systemd: `systemctl start pruned` returns once pruned said
READY=1, which it does only after its self-check; the journal has its records."""

from __future__ import annotations

import pytest
from vmlib import journal, journal_cursor, read_proc, sh

# systemd's catalog id of "Started <unit>" (SD_MESSAGE_UNIT_STARTED): logged by PID 1 when the
# start job completes, i.e. for Type=notify when READY=1 arrived.
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def _ours(cursor: str) -> list[dict]:
    """Every journal entry of the unit's processes after cursor."""
    return journal("--after-cursor", cursor, "_SYSTEMD_UNIT=pruned.service")


def _brief(entries: list[dict]) -> str:
    keys = ("SYSLOG_IDENTIFIER", "_TRANSPORT", "PRUNED_EVENT", "MESSAGE_ID", "MESSAGE")
    return "\n".join(str({k: e.get(k) for k in keys}) for e in entries)


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", "pruned.service", *(f"-p{p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def started() -> str:
    """pruned started by systemctl, as a site admin starts it; the journal cursor before."""
    sh("systemctl", "stop", "pruned.service")
    cursor = journal_cursor()
    sh("systemctl", "start", "pruned.service", timeout=300)
    return cursor


def test_start_reaches_active_through_notify(started: str) -> None:
    st = show("Type", "ActiveState", "SubState", "MainPID", "NRestarts", "UnitFileState")
    assert (st["Type"], st["ActiveState"], st["SubState"]) == ("notify", "active", "running"), st
    assert st["UnitFileState"] == "enabled", st
    assert st["NRestarts"] == "0", st
    p = read_proc(int(st["MainPID"]))
    assert p is not None and "run" in p.argv and any("pruned" in a for a in p.argv), p
    assert p.cgroup_path == "/system.slice/pruned.service", p.label()


def test_ready_only_after_the_self_check(started: str) -> None:
    # pruned logs daemon_started after its self-check sweep and before READY=1; systemd logs
    # "Started" when READY=1 arrives. So daemon_started must come first.
    ours = journal("--after-cursor", started, "-t", "pruned", "PRUNED_EVENT=daemon_started")
    assert ours, ("no daemon_started record in journalctl -t pruned; the unit logged:\n"
                  + _brief(_ours(started)))
    pid1 = journal("--after-cursor", started, "_PID=1", f"MESSAGE_ID={UNIT_STARTED}",
                   "UNIT=pruned.service")
    assert pid1, "systemd logged no 'Started pruned.service'"
    assert int(ours[0]["__REALTIME_TIMESTAMP"]) <= int(pid1[0]["__REALTIME_TIMESTAMP"])


def test_journal_shows_daemon_started(started: str) -> None:
    recs = journal("--after-cursor", started, "-t", "pruned")
    events = [r.get("PRUNED_EVENT") for r in recs]
    assert "daemon_started" in events, _brief(_ours(started))
    rec = next(r for r in recs if r.get("PRUNED_EVENT") == "daemon_started")
    assert rec["_SYSTEMD_UNIT"] == "pruned.service", rec
    assert "mode report" in rec["MESSAGE"], rec["MESSAGE"]


def test_stop_is_clean(started: str) -> None:
    cursor = journal_cursor()
    sh("systemctl", "stop", "pruned.service", timeout=120)
    st = show("ActiveState", "Result", "ExecMainStatus")
    got = (st["ActiveState"], st["Result"], st["ExecMainStatus"])
    assert got == ("inactive", "success", "0"), st
    events = [r.get("PRUNED_EVENT") for r in journal("--after-cursor", cursor, "-t", "pruned")]
    assert "daemon_stopped" in events, _brief(_ours(cursor))
