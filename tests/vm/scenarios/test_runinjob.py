"""pruned-epilog under `PrologFlags=Contain,RunInJob` (Slurm 23.11+; 24.11 and 26.05 here).

With RunInJob the epilog no longer runs from slurmd: the job's extern slurmstepd runs it,
inside the job's own cgroup. pruned-epilog then shares a cgroup with the job it cleans up
after and is a descendant of that job's slurmstepd. It must still kill what the job left (the
daemon test_epilog's escape script starts through the user's `systemd --user`), and none of
itself, its cgroup's root processes or its parent slurmstepd: the job completes (not stuck
COMPLETING), the witness epilog after pruned's runs, the node is not drained.

The daemon is stopped for this phase (the epilog alone, as in test_epilog) and Slurm set back
to PrologFlags=Contain after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Daemon
from test_epilog import killed, kills_of, run_escape_job, witnesses
from vmlib import (
    alive,
    journal_after,
    node_state,
    set_slurm_conf,
    sh,
    slurm_version,
    wait_for,
)


@pytest.fixture(scope="module")
def run_in_job(enforcing: Daemon) -> Iterator[None]:
    if slurm_version() < (23, 11):
        pytest.skip(f"PrologFlags=RunInJob is not in Slurm {'.'.join(map(str, slurm_version()))}")
    sh("systemctl", "stop", "pruned.service", timeout=120)
    set_slurm_conf(PrologFlags="Contain,RunInJob")
    try:
        yield
    finally:
        set_slurm_conf(PrologFlags="Contain")
        sh("systemctl", "start", "pruned.service", timeout=300)


@pytest.fixture(scope="module")
def escaped(run_in_job: None):
    return run_escape_job("r")


def test_epilog_runs_in_the_jobs_extern_step(escaped) -> None:
    job, daemon, _managers, cursor = escaped
    # Both witnesses ran inside the job: RunInJob took effect (else this tests nothing).
    lines = witnesses(job)
    cgroups = [w.split(" cg=", 1)[1] for w in lines if " cg=" in w]
    assert len(cgroups) == 2 and all("/step_extern" in cg for cg in cgroups), lines
    rec = killed(kills_of(cursor, job), daemon)
    assert rec is not None, f"no process_killed of pid {daemon.pid}"
    assert "/step_extern" in rec.get("_SYSTEMD_CGROUP", ""), rec


def test_epilog_in_the_job_kills_the_daemon_and_spares_itself(escaped) -> None:
    job, daemon, managers, cursor = escaped
    wait_for(f"{daemon.label()} killed", lambda: not alive(daemon), timeout=60)
    rec = killed(kills_of(cursor, job), daemon)
    assert rec is not None and rec.get("PRUNED_JOB_ID") == job, rec
    assert managers and not any(alive(m) for m in managers), [m.label() for m in managers]
    # Nothing of root's was signalled: not the epilog, not its slurmstepd, not the witnesses.
    root = [r for r in journal_after(cursor, SYSLOG_IDENTIFIER="pruned")
            if r.get("PRUNED_EVENT") in ("process_killed", "kill_failed", "process_survived")
            and r.get("PRUNED_UID") == "0"]
    assert not root, root
    # The chain went on after pruned-epilog (the witness that runs after it saw the daemon
    # dead), the job completed, and the node takes jobs.
    assert sorted(ln.split()[2] for ln in witnesses(job)) == ["daemons=0", "daemons=1"]
    state = node_state()
    assert "DRAIN" not in state and "FAIL" not in state and "COMPLETING" not in state, state
    assert not journal_after(cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="epilog_error")
