"""Attacks on min_age and on adoption, with real processes of users the fixture made (every
sweep and every reactor is scoped to those uids).

A re-forker is a stray that forks its next generation and exits about every half second, so
each of its processes is younger than min_age (3 s here) whenever a sweep looks. Without
the lineage memory it would live forever; with it, the full sweep and the event path each
leave nothing of it, while a genuinely new process of another session of the same uid is
still held by min_age. An adoption the kernel refuses (a v1 cpuset step_extern without
cpus: ENOSPC) gets actions.adopt_failure once, with a record, and is never retried.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pruned.act.adopt import AdoptFailures
from pruned.act.audit import ListSink
from pruned.jobs.slurm import SlurmCgroupSource
from pruned.jobs.source import read_jobs
from pruned.lineage import LineageMemory
from pruned.linux.connector import EventWatcher, probe
from pruned.model import Action, CleanupPolicy, HeldBy, Policy, Result, SlurmSource
from pruned.policy.facts import resolve_facts
from pruned.reactor import Reactor
from pruned.sweep import SweepReport, make_sources, run_sweep
from tests.fixtures.cgdirs import rmdir_cgroups
from tests.fixtures.paths import REPO
from tests.fixtures.users import (
    User,
    alive,
    daemon_as,
    kill_uid_processes,
    pids_of_uid,
    setsid_as,
    wait_for_pid,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for users and kills"),
]

MIN_AGE = 3.0
# One generation: live half a second, start the next one in the background, exit. Its
# child is reparented; its session (that of the first generation, led by nobody once that
# one exits) stays.
REFORKER = "#!/bin/bash\nsleep 0.5\n\"$0\" &\nexit 0\n"


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def live_pids(uid: int, *, but: tuple[int, ...] = ()) -> list[int]:
    return [p for p in pids_of_uid(uid) if p not in but and alive(p)]


def none_left(uid: int, *, but: tuple[int, ...] = ()) -> bool:
    """No live process of uid (but `but`) in several listings over a second: one listing of
    /proc can miss a generation born after the listing began while its parent exits."""
    for _ in range(10):
        if live_pids(uid, but=but):
            return False
        time.sleep(0.1)
    return True


def start_reforker(user: User) -> None:
    script = Path(user.home, "reforker.sh")
    script.write_text(REFORKER)
    script.chmod(0o755)
    os.chown(script, user.uid, user.gid)
    setsid_as(user, f"exec {script}")
    assert wait_until(lambda: bool(live_pids(user.uid)), 5), "the re-forker did not start"


def policy_for(tmp: Path) -> Policy:
    state = tmp / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700, exist_ok=True)
    return Policy(dry_run=False, min_age=MIN_AGE, kill_grace=1.0, job_sources=("statedir",),
                  state_dir=str(state), cleanup=CleanupPolicy(enabled=False),
                  audit_fallback=str(tmp / "audit.jsonl"), events=True)  # fmt: skip


def decisions_of(report: SweepReport, uid: int):
    return [d for d in report.observation.plan.decisions if d.proc.uid == uid]


@pytest.fixture
def reforker_user(make_user) -> Iterator[User]:
    user = make_user("prl")
    try:
        yield user
    finally:
        kill_uid_processes(user.uid)


# ------------------------------------------------------------------ the full sweep


def test_sweep_leaves_nothing_of_a_reforker_but_holds_a_new_session(tmp_path, reforker_user):
    user = reforker_user
    policy = policy_for(tmp_path)
    facts, sink, mem = resolve_facts(policy), ListSink(), LineageMemory()
    start_reforker(user)
    first = run_sweep(policy, facts, sink, uids={user.uid}, lineage=mem)
    mine = decisions_of(first, user.uid)
    assert mine and all(d.held_by is HeldBy.YOUNG for d in mine), mine
    assert not first.outcomes
    time.sleep(MIN_AGE + 0.5)
    # The attack works without the memory: every generation is young at every sweep.
    blind = run_sweep(policy, facts, ListSink(), uids={user.uid})
    assert not blind.outcomes and live_pids(user.uid)
    # The control: a new process of the same uid in a session of its own, just started.
    setsid_as(user, "exec -a prl_new_login sleep 600")
    control = wait_for_pid(user.uid, "prl_new_login")
    reports = []
    for _ in range(2):  # one sweep; a second for a generation forked during the kill
        reports.append(run_sweep(policy, facts, sink, uids={user.uid}, lineage=mem))
        if wait_until(lambda: none_left(user.uid, but=(control,)), 3):
            break
    assert none_left(user.uid, but=(control,)), "a generation of the re-forker survived"
    assert alive(control), "the new young process of another session was killed"
    held = [d for r in reports for d in r.observation.plan.decisions if d.proc.pid == control]
    assert held and all(d.held_by is HeldBy.YOUNG for d in held)
    killed = [o for r in reports for o in r.outcomes
              if o.decision.proc.uid == user.uid and o.result is Result.DONE]  # fmt: skip
    assert killed, [o.detail for r in reports for o in r.outcomes]
    assert all(o.decision.proc.pid != control for r in reports for o in r.outcomes)
    ev = " ".join(e for o in killed for e in o.decision.verdict.evidence)
    assert "young" in ev and "has been stray since" in ev and "lineage." in ev
    rec = [r for r in sink.records if r.event == "process_killed"
           and r.fields["PRUNED_UID"] == str(user.uid)]  # fmt: skip
    assert rec and any("lineage." in r.fields.get("PRUNED_EVIDENCE", "") for r in rec)


# ------------------------------------------------------------------ the event path


def test_event_path_leaves_nothing_of_a_reforker_but_holds_a_new_session(
    tmp_path, reforker_user
):
    why = probe()
    if why is not None:
        pytest.skip(why)
    user = reforker_user
    policy = policy_for(tmp_path)
    facts, sink = resolve_facts(policy), ListSink()
    reactor = Reactor(lambda: (policy, facts, sink),
                      lambda _fresh: read_jobs(make_sources(policy)), threading.Lock(),
                      uids={user.uid}, lineage=LineageMemory()).start()  # fmt: skip
    watcher = EventWatcher(reactor.on_pids, lambda _why: None).start()
    try:
        start_reforker(user)
        # No full sweep runs: only fork events and re-checks of young processes.
        assert wait_until(lambda: none_left(user.uid), 30), "the re-forker lives on"
        rec = [r for r in sink.records if r.event == "process_killed"
               and r.fields["PRUNED_UID"] == str(user.uid)]  # fmt: skip
        assert rec and all(r.fields["PRUNED_SWEEP_ID"].startswith("event-") for r in rec)
        assert any("lineage." in r.fields.get("PRUNED_EVIDENCE", "") for r in rec), rec
        # The control: a new session of the same uid is held until it is min_age old.
        pid = daemon_as(user, "prl_new_login")
        assert wait_until(lambda: pid in {p for _t, p in list(reactor.recheck)}, 5), \
            "the new process was not held for a re-check at min_age"
        assert alive(pid)
        assert not any(r.fields.get("PRUNED_PID") == str(pid) for r in list(sink.records))
    finally:
        watcher.stop()
        reactor.stop()


def test_event_path_follows_a_reforker_that_setsids_every_generation(tmp_path, reforker_user):
    """Each generation makes a new session (and process group) and exits right after the
    fork, so no session, group or live parent links them: only the kernel's fork events
    (the parent at fork time) do."""
    why = probe()
    if why is not None:
        pytest.skip(why)
    user = reforker_user
    policy = policy_for(tmp_path)
    facts, sink = resolve_facts(policy), ListSink()
    reactor = Reactor(lambda: (policy, facts, sink),
                      lambda _fresh: read_jobs(make_sources(policy)), threading.Lock(),
                      uids={user.uid}, lineage=LineageMemory()).start()  # fmt: skip
    watcher = EventWatcher(reactor.on_pids, lambda _why: None, parents=True).start()
    try:
        script = Path(user.home, "reforker.sh")
        script.write_text("#!/bin/bash\nsleep 0.5\nsetsid \"$0\" &\nexit 0\n")
        script.chmod(0o755)
        os.chown(script, user.uid, user.gid)
        setsid_as(user, f"exec {script}")
        assert wait_until(lambda: none_left(user.uid), 30), "the re-forker lives on"
        rec = [r for r in sink.records if r.event == "process_killed"
               and r.fields["PRUNED_UID"] == str(user.uid)]  # fmt: skip
        assert any("which forked it and exited" in r.fields.get("PRUNED_EVIDENCE", "")
                   for r in rec), [r.fields.get("PRUNED_EVIDENCE") for r in rec]
    finally:
        watcher.stop()
        reactor.stop()


# ------------------------------------------------------------------ adoption refused

CG = "/sys/fs/cgroup"


@pytest.fixture
def refusing_job(make_user) -> Iterator[tuple[User, str, SlurmCgroupSource, str]]:
    """A running fake Slurm job of a new user in the v1 cpuset hierarchy only: a root
    "slurmstepd" (a copy of sleep) in step_batch, and a step_extern with no cpus, so the
    kernel refuses every task written to it (ENOSPC). Yields (user, job id, source, extern)."""
    if not os.path.isdir(f"{CG}/cpuset") or os.path.exists(f"{CG}/cgroup.controllers"):
        pytest.skip("needs the cgroup v1 cpuset hierarchy")
    user = make_user("pra")
    bins = tempfile.mkdtemp(prefix="prl-bins-")
    os.chmod(bins, 0o755)
    stepd, slurmd = f"{bins}/slurmstepd", f"{bins}/slurmd"
    for b in (stepd, slurmd):
        shutil.copy2("/usr/bin/sleep", b)
    job = str(7_000_000 + secrets.randbelow(2_000_000))
    top = f"{CG}/cpuset/slurm_prl{secrets.token_hex(3)}"
    job_dir = f"{top}/uid_{user.uid}/job_{job}"
    made = [top, f"{top}/uid_{user.uid}", job_dir, f"{job_dir}/step_batch"]
    procs: list[subprocess.Popen] = []
    try:
        for d in made:
            os.mkdir(d)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                Path(d, knob).write_text(Path(os.path.dirname(d), knob).read_text())
        extern = f"{job_dir}/step_extern"
        os.mkdir(extern)
        made.append(extern)
        assert Path(extern, "cpuset.cpus").read_text().strip() == ""
        procs.append(subprocess.Popen([stepd, "600"], start_new_session=True))
        procs.append(subprocess.Popen([slurmd, "600"], start_new_session=True))
        Path(job_dir, "step_batch", "cgroup.procs").write_text(str(procs[0].pid))
        src = SlurmCgroupSource(CG, (stepd,), slurmd_paths=(slurmd,), slurmd_pidfiles=(),
                                search_v2=False, find_outside_stepds=False)  # fmt: skip
        assert wait_until(lambda: (j := src.read().jobs.get(job)) is not None and j.running, 5)
        yield user, job, src, extern
    finally:
        kill_uid_processes(user.uid)
        for p in procs:
            p.kill()
            p.wait()
        rmdir_cgroups(*reversed(made))
        shutil.rmtree(bins, ignore_errors=True)


def adopt_policy(tmp: Path, fallback: Action, stepd: str) -> Policy:
    return Policy(dry_run=False, stray_action=Action.ADOPT, adopt_failure=fallback,
                  min_age=0.0, kill_grace=1.0, job_sources=("slurm",),
                  slurm=SlurmSource(CG, (stepd,)), cleanup=CleanupPolicy(enabled=False),
                  audit_fallback=str(tmp / "audit.jsonl"), events=False)  # fmt: skip


def about(sink: ListSink, pid: int):
    return [r for r in sink.records if r.fields.get("PRUNED_PID") == str(pid)]


@pytest.mark.parametrize("fallback", [Action.KILL, Action.IGNORE])
def test_refused_adoption_gets_adopt_failure_once(tmp_path, refusing_job, fallback):
    user, job, src, extern = refusing_job
    policy = adopt_policy(tmp_path, fallback, next(iter(src.stepd_paths)))
    facts, sink, failures = resolve_facts(policy), ListSink(), AdoptFailures()
    pid = daemon_as(user, f"prl_adopt_{fallback}")

    def sweep() -> SweepReport:
        return run_sweep(policy, facts, sink, uids={user.uid}, sources=[src],
                         adopt_failures=failures)  # fmt: skip

    first = sweep()
    recs = about(sink, pid)
    failed = [r for r in recs if r.event == "adopt_failed"]
    assert len(failed) == 1, [(r.event, r.message) for r in recs]
    f = failed[0].fields
    assert f["PRUNED_JOB_ID"] == job and f["PRUNED_ADOPT_FAILURE"] == fallback.value
    assert "No space left on device" in f["PRUNED_ADOPT_ERROR"], f
    assert f"adopt_failure {fallback.value}" in f["PRUNED_DETAIL"]
    assert str(pid) not in Path(extern, "cgroup.procs").read_text().split()
    if fallback is Action.KILL:
        assert wait_until(lambda: not alive(pid), 10), "the fallback kill did not happen"
        assert [r.event for r in recs] == ["adopt_failed", "process_killed"]
        assert "adopt_failure kill" in about(sink, pid)[-1].fields["PRUNED_DECISION"]
    else:
        assert alive(pid)
    assert any(o.result is Result.FAILED for o in first.outcomes)
    # Applied once: later sweeps neither retry the adoption nor record the process again.
    n = len(sink.records)
    for _ in range(2):
        later = sweep()
        assert all(o.decision.proc.pid != pid for o in later.outcomes)
    assert not about(replace_records(sink, n), pid)
    if fallback is Action.IGNORE:
        assert alive(pid) and str(pid) not in Path(extern, "cgroup.procs").read_text().split()
        d = next(d for d in later.observation.plan.decisions if d.proc.pid == pid)
        assert d.action is Action.IGNORE and "not retried" in d.reason


def replace_records(sink: ListSink, start: int) -> ListSink:
    """A sink holding only the records after the first `start`."""
    out = ListSink()
    out.records = sink.records[start:]
    return out


# ------------------------------------------------------------------ scan and explain


def test_scan_and_explain_show_the_lineage_rule_and_evidence(tmp_path, reforker_user):
    """A stray shell 5.5 s old (min_age 5s) starts a child: the child is young, but its
    parent and session are not; scan and explain say so (read-only: mode report)."""
    user = reforker_user
    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nmode: report\nmin_age: 5s\nevents: false\n"
                      f"jobs:\n  sources: [statedir]\n  state_dir: {state}\n"
                      "cleanup:\n  enabled: false\n")  # fmt: skip
    setsid_as(user, "sleep 5.5; (exec -a prl_young sleep 600) & exec -a prl_old sleep 600")
    young = wait_for_pid(user.uid, "prl_young", timeout=15)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "pruned.cli"]
    scan = subprocess.run([*argv, "scan", "--json", "--policy", str(policy)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert scan.returncode == 0, scan.stderr
    row = next(r for r in map(json.loads, scan.stdout.splitlines()) if r["pid"] == young)
    # Not held for its youth (the machine's other strays may trip the brake of this scan).
    assert row["class"] == "stray" and row["action"] == "kill", row
    assert "min_age" not in (row["held"] or ""), row
    assert row["age"] < 5.0  # the premise: the child itself is younger than min_age
    line = next(e for e in row["evidence"] if e.startswith("lineage."))
    assert "young" in line and "has been stray since" in line and ">= min_age 5s" in line
    assert line in row["reason"]
    explain = subprocess.run([*argv, "explain", str(young), "--policy", str(policy)], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert explain.returncode == 0, explain.stderr
    assert f"evidence: {line.split(' (')[0]}" in explain.stdout, explain.stdout
    assert "judged later" not in explain.stdout
