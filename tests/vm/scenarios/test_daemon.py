"""(c) The shipped unit under real systemd: `systemctl start pruned` returns once pruned said
READY=1, which it does only after its self-check; the journal has its records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from vmlib import journal_after, journal_cursor, read_proc, sh, wait_for

# systemd's catalog id of "Started <unit>" (SD_MESSAGE_UNIT_STARTED): logged by PID 1 when the
# start job completes, i.e. for Type=notify when READY=1 arrived.
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def _ours(cursor: str) -> list[dict]:
    """Every journal entry of the unit's processes after cursor."""
    return journal_after(cursor, _SYSTEMD_UNIT="pruned.service")


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
    ours = journal_after(started, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="daemon_started")
    assert ours, ("no daemon_started record in journalctl -t pruned; the unit logged:\n"
                  + _brief(_ours(started)))
    pid1 = journal_after(started, _PID="1", MESSAGE_ID=UNIT_STARTED, UNIT="pruned.service")
    assert pid1, "systemd logged no 'Started pruned.service'"
    assert int(ours[0]["__REALTIME_TIMESTAMP"]) <= int(pid1[0]["__REALTIME_TIMESTAMP"])


def test_journal_shows_daemon_started(started: str) -> None:
    recs = journal_after(started, SYSLOG_IDENTIFIER="pruned")
    events = [r.get("PRUNED_EVENT") for r in recs]
    assert "daemon_started" in events, _brief(_ours(started))
    rec = next(r for r in recs if r.get("PRUNED_EVENT") == "daemon_started")
    assert rec["_SYSTEMD_UNIT"] == "pruned.service", rec
    assert "mode report" in rec["MESSAGE"], rec["MESSAGE"]


BAD = Path("/etc/pruned/policy.d/60-bad.yaml")
# YAML 1.2 core: "sometimes" is no mode (tests/policies_bad/13-unknown-enum.yaml).
BAD_TEXT = "version: 1\nmode: sometimes\n"


def test_reload_with_a_bad_policy_keeps_the_old_one(started: str) -> None:
    pid = show("MainPID")["MainPID"]
    cursor = journal_cursor()
    # The unit's ExecReload= `pruned reload` waits for the daemon's verdict, so the reload
    # itself fails on a rejected policy (a bare `kill -HUP` could not tell).
    waits = "pruned reload" in show("ExecReload")["ExecReload"]
    BAD.write_text(BAD_TEXT)
    try:
        reload = sh("systemctl", "reload", "pruned.service", check=False)
        assert (reload.returncode != 0) == waits, (waits, reload)
        rejected = wait_for("config_rejected in the journal", lambda: journal_after(
            cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="config_rejected"), timeout=60)
    finally:
        BAD.unlink()
    assert "60-bad.yaml" in rejected[0]["MESSAGE"], rejected[0]["MESSAGE"]
    st = show("ActiveState", "MainPID", "NRestarts")
    assert (st["ActiveState"], st["MainPID"], st["NRestarts"]) == ("active", pid, "0"), st
    # And a good policy is taken again on the next reload.
    cursor = journal_cursor()
    sh("systemctl", "reload", "pruned.service")
    wait_for("config_loaded in the journal", lambda: journal_after(
        cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="config_loaded"), timeout=60)


def test_stop_is_clean(started: str) -> None:
    cursor = journal_cursor()
    sh("systemctl", "stop", "pruned.service", timeout=120)
    st = show("ActiveState", "Result", "ExecMainStatus")
    got = (st["ActiveState"], st["Result"], st["ExecMainStatus"])
    assert got == ("inactive", "success", "0"), st
    events = [r.get("PRUNED_EVENT")
              for r in journal_after(cursor, SYSLOG_IDENTIFIER="pruned")]
    assert "daemon_stopped" in events, _brief(_ours(cursor))


def test_bad_policy_exits_78_and_is_not_restarted() -> None:
    # RestartPreventExitStatus=78: restarting cannot fix a policy; the journal says why.
    sh("systemctl", "stop", "pruned.service")
    BAD.write_text(BAD_TEXT)
    try:
        start = sh("systemctl", "start", "pruned.service", check=False, timeout=300)
        assert start.returncode != 0
        st = show("ActiveState", "Result", "ExecMainStatus", "NRestarts", "RestartUSec")
        assert (st["ActiveState"], st["ExecMainStatus"]) == ("failed", "78"), st
        # Longer than RestartSec=10: a restart would have happened by now.
        time.sleep(15)
        st = show("ActiveState", "NRestarts")
        assert (st["ActiveState"], st["NRestarts"]) == ("failed", "0"), st
    finally:
        BAD.unlink()
        sh("systemctl", "reset-failed", "pruned.service", check=False)
