"""pruned-epilog as Slurm's Epilog= (a glob over /etc/slurm/epilog.d, guest/setup.sh), with the
node's enforcing policy and the daemon stopped: the epilog alone.

Under proctrack/cgroup a setsid'd, double-forked daemon inside the job dies with the job's
cgroup; what really outlives a job is a daemon it started through the user's own
`systemd --user` (linger): a double-forked child of a transient user unit, outside every job
cgroup. When the job was the user's last on the node, the epilog kills it (and the user's
manager with it), writes process_killed records that name the job, and exits 0: the node is
not drained. A broken policy fragment changes none of that: the epilog runs with the last
good policy (policy_fallback) and exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmlib import (
    LONG,
    Proc,
    alive,
    by_argv0,
    job_state,
    journal_after,
    journal_cursor,
    node_state,
    sbatch,
    sh,
    wait_for,
    wait_running,
)

USER = "grace"
WITNESS_LOG = Path("/run/pruned-vm-epilog.log")
BROKEN = Path("/etc/pruned/policy.d/70-vm-broken.yaml")


def escape_script(tag: str) -> str:
    # --remain-after-exit: the unit's main process exits right after the double fork; without
    # it systemd --user would stop the unit and kill the daemon itself.
    return f"""#!/bin/bash
export XDG_RUNTIME_DIR=/run/user/$(id -u)
export DBUS_SESSION_BUS_ADDRESS=unix:path=$XDG_RUNTIME_DIR/bus
systemd-run --user --quiet --remain-after-exit --collect bash -c \\
    "setsid -f bash -c 'exec -a vm_epi_daemon_{tag} sleep {LONG}' </dev/null >/dev/null 2>&1"
for i in $(seq 60); do pgrep -f '^vm_epi_daemon_{tag}' >/dev/null && break; sleep 0.5; done
sleep 2
"""


def user_manager(uid: str) -> None:
    """grace's systemd --user running (linger; started again after an epilog killed it)."""
    sh("loginctl", "enable-linger", USER)
    sh("systemctl", "start", f"user@{uid}.service", timeout=120)


def witnesses(job: str) -> list[str]:
    """The witness epilogs' lines for job, in the order they ran."""
    text = WITNESS_LOG.read_text() if WITNESS_LOG.exists() else ""
    return [line for line in text.splitlines() if f" job={job} " in line]


def run_escape_job(tag: str) -> tuple[str, Proc, list[Proc], str]:
    """(job, the escaped daemon, grace's user manager processes, journal cursor): the job ran
    and ended, and every epilog script of it finished."""
    uid = sh("id", "-u", USER).stdout.strip()
    user_manager(uid)
    cursor = journal_cursor()
    job = sbatch(USER, escape_script(tag))
    wait_running(job)
    name = f"vm_epi_daemon_{tag}"
    daemon = wait_for(name, lambda: by_argv0(name), timeout=90)[0]
    assert f"/user@{uid}.service/" in daemon.cgroup_path, daemon.label()
    assert "slurmstepd.scope" not in daemon.cgroup_path, daemon.label()
    managers = [p for p in by_argv0("/lib/systemd/systemd") + by_argv0("/usr/lib/systemd/systemd")
                if str(p.uid) == uid]
    wait_for(f"job {job} gone", lambda: job_state(job) == "", timeout=120)
    wait_for(f"both witness epilogs of job {job}", lambda: len(witnesses(job)) == 2, timeout=120)
    return job, daemon, managers, cursor


@pytest.fixture(scope="module")
def epilog_only(enforce_policy: Path) -> None:
    sh("systemctl", "stop", "pruned.service", timeout=120)


@pytest.fixture(scope="module")
def escaped(epilog_only: None) -> tuple[str, Proc, list[Proc], str]:
    return run_escape_job("a")


def kills_of(cursor: str, job: str) -> list[dict]:
    return [r for r in journal_after(cursor, SYSLOG_IDENTIFIER="pruned",
                                     PRUNED_EVENT="process_killed")
            if r.get("PRUNED_SWEEP_ID", "").startswith(f"epilog-{job}-")]


def killed(recs: list[dict], p: Proc) -> dict | None:
    for r in recs:
        if str(p.pid) == r.get("PRUNED_PID") or str(p.pid) in r.get("PRUNED_TREE", "").split():
            return r
    return None


def test_epilog_kills_the_daemon_the_job_left(escaped) -> None:
    job, daemon, managers, cursor = escaped
    wait_for(f"{daemon.label()} killed", lambda: not alive(daemon), timeout=60)
    recs = kills_of(cursor, job)
    rec = killed(recs, daemon)
    assert rec is not None, f"no process_killed of pid {daemon.pid}: {recs}"
    # The epilog's records answer `journalctl -t pruned PRUNED_JOB_ID=J` (README).
    assert rec.get("PRUNED_JOB_ID") == job, rec
    assert rec["PRUNED_DRY_RUN"] == "no" and "last job" in rec["PRUNED_DECISION"], rec
    # And the user's manager, a stray of a uid whose last job ended, went with it.
    assert managers and not any(alive(m) for m in managers), [m.label() for m in managers]


def test_node_not_drained_and_the_chain_went_on(escaped) -> None:
    job, _daemon, _managers, _cursor = escaped
    state = node_state()
    assert "DRAIN" not in state and "FAIL" not in state, state
    lines = witnesses(job)
    # One witness sorts before 10-pruned and one after: one ran before the kill (the daemon
    # alive), one after (dead). Which is which says the order this Slurm runs epilogs in.
    assert sorted(ln.split()[2] for ln in lines) == ["daemons=0", "daemons=1"], lines
    (Path("/run/pruned-vm/results") / "epilog-order.txt").write_text("\n".join(lines) + "\n")


def test_epilog_runs_from_slurmd(escaped) -> None:
    # PrologFlags=Contain without RunInJob (guest/setup.sh says why): slurmd runs the epilog.
    job, daemon, _managers, cursor = escaped
    rec = killed(kills_of(cursor, job), daemon)
    assert rec is not None
    assert rec.get("_SYSTEMD_CGROUP", "").startswith("/system.slice/slurmd.service"), rec


def test_broken_policy_fragment_falls_back_and_does_not_drain(escaped) -> None:
    BROKEN.write_text("version: 1\nmode: sometimes\n")
    try:
        job, daemon, _managers, cursor = run_escape_job("b")
    finally:
        BROKEN.unlink()
    fb = journal_after(cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="policy_fallback",
                       PRUNED_JOB_ID=job)
    assert fb, "no policy_fallback record"
    assert fb[0]["PRUNED_RESULT"] == "fallback" and BROKEN.name in fb[0]["PRUNED_REASON"], fb[0]
    wait_for(f"{daemon.label()} killed", lambda: not alive(daemon), timeout=60)
    assert killed(kills_of(cursor, job), daemon) is not None
    state = node_state()
    assert "DRAIN" not in state and "FAIL" not in state, state
    assert len(witnesses(job)) == 2
