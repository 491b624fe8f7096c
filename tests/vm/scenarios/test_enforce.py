"""The daemon enforcing under its own unit (systemd/pruned.service with all its sandboxing):
none of kill, freeze, adopt, or its journald records is blocked. Each is done by the daemon
itself -- the scene's strays are still there from the report-mode scenarios -- and checked by
its outcome and by its record, whose _SYSTEMD_UNIT says who wrote it.
(File cleanup under the unit: test_cleanup.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Daemon
from scene import Scene
from vmlib import (
    LONG,
    Proc,
    alive,
    in_job_dir,
    journal_after,
    read_proc,
    sh,
    wait_for,
    wait_procs,
)

# No job for any of these users: adopt_fallback kill.
KILLED_ROLES = ("stray_outside", "bypass_daemon", "crash_left", "linger_manager", "linger_unit")


def daemon_records(d: Daemon, **match: str) -> list[dict]:
    return journal_after(d.cursor, SYSLOG_IDENTIFIER="pruned", _SYSTEMD_UNIT="pruned.service",
                         **match)


def record_of(recs: list[dict], p: Proc) -> dict | None:
    for r in recs:
        if str(p.pid) == r.get("PRUNED_PID") or str(p.pid) in r.get("PRUNED_TREE", "").split():
            return r
    return None


def wait_for_or_last(fn, last, timeout: float) -> list[dict]:
    """fn's value once truthy; after timeout, last() (the tests then say what is missing)."""
    try:
        return wait_for("the daemon's process_killed records", fn, timeout=timeout)
    except AssertionError:
        return last()


@pytest.fixture(scope="module")
def kills(scene: Scene, enforcing: Daemon) -> dict[str, list[tuple[Proc, dict | None]]]:
    """The scene's strays with no job to adopt them into, once the daemon has killed them."""
    targets = [(role, p) for role in KILLED_ROLES for p in scene.roles[role]]
    wait_for("the scene's strays killed", lambda: not any(alive(p) for _r, p in targets),
             timeout=120)

    def recorded() -> list[dict] | None:
        # A sweep writes its records once all its kills are done: after the deaths.
        recs = daemon_records(enforcing, PRUNED_EVENT="process_killed")
        return recs if all(record_of(recs, p) for _r, p in targets) else None

    recs = wait_for_or_last(recorded, lambda: daemon_records(
        enforcing, PRUNED_EVENT="process_killed"), timeout=60)
    out: dict[str, list[tuple[Proc, dict | None]]] = {}
    for role, p in targets:
        out.setdefault(role, []).append((p, record_of(recs, p)))
    return out


@pytest.mark.parametrize("role", KILLED_ROLES)
def test_daemon_killed(role: str, kills) -> None:
    for p, rec in kills[role]:
        assert rec is not None, f"{p.label()}: dead, but no process_killed record of the daemon"
        assert rec["PRUNED_DRY_RUN"] == "no" and "SIGTERM" in rec["PRUNED_SIGNAL"], rec
        assert rec["PRUNED_CLASS"] == "stray", rec


def test_kill_freezes_and_contains_in_a_quarantine_cgroup(kills) -> None:
    # Every tree is moved into a quarantine cgroup of pruned's own and frozen before the
    # signals: ProtectControlGroups= would have made that "sigstop" (README, unit comments).
    for role, entries in kills.items():
        for _p, rec in entries:
            assert rec is not None
            assert rec["PRUNED_FROZE"] != "none", (role, rec)
            assert rec.get("PRUNED_CONTAINED", "").startswith(
                "contained in cgroup.freeze:/sys/fs/cgroup/pruned_quarantine_"), (role, rec)


def test_daemon_adopts_a_stray_of_a_user_with_a_job(scene: Scene, enforcing: Daemon) -> None:
    sh("runuser", "-u", "alice", "--", "setsid", "-f", "bash", "-c",
       f"exec -a vm_alice_late sleep {LONG} </dev/null >/dev/null 2>&1")
    stray = wait_procs("vm_alice_late")[0]
    assert not in_job_dir(stray, scene.alice_dir), stray.label()
    wait_for(f"{stray.label()} adopted into {scene.alice_dir}",
             lambda: (p := read_proc(stray.pid)) and in_job_dir(p, scene.alice_dir), timeout=90)
    assert alive(stray)
    rec = record_of(daemon_records(enforcing, PRUNED_EVENT="process_adopted"), stray)
    assert rec is not None and rec["PRUNED_JOB_ID"] in (scene.alice_job, scene.alice_dir), rec


def test_records_go_to_journald_not_the_fallback_file(kills, enforcing: Daemon) -> None:
    summaries = daemon_records(enforcing, PRUNED_EVENT="sweep_summary")
    assert summaries, "no sweep_summary from pruned.service"
    assert {r["_TRANSPORT"] for r in summaries} == {"journal"}  # structured, native protocol
    fallback = Path("/var/log/pruned/audit.jsonl")
    assert not fallback.exists() or fallback.stat().st_size == 0, fallback.read_text()[:2000]


def test_daemon_still_running_clean(enforcing: Daemon) -> None:
    st = sh("systemctl", "show", "pruned.service", "-p", "ActiveState", "-p", "MainPID").stdout
    assert f"MainPID={enforcing.pid}" in st and "ActiveState=active" in st, st
    warnings = [r["MESSAGE"] for r in daemon_records(enforcing)
                if int(r.get("PRIORITY", "6")) <= 4]
    assert not warnings, warnings
