"""One-shot prolog and epilog for the batch system.

The epilog observes the node like a sweep, picks the ended job's leftovers
(pruned.rules.epilog says which), kills them through the same rails, brake and audit as a
sweep, records the job as ended and removes its per-job directories. The prolog records a
job start for the state-dir job source.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from pruned.act.audit import AuditSink
from pruned.act.guard import protected_pids
from pruned.act.remove import execute_cleanup
from pruned.exitcodes import EX_FAILED, EX_OK
from pruned.filesweep import file_outcome_record
from pruned.jobs.history import JobHistory, JobRecord
from pruned.jobs.slurmpath import is_sluid
from pruned.jobs.statedir import end_job_record, write_job_record
from pruned.linux import procfs
from pruned.linux.dirfd import container_nodes
from pruned.model import (
    Policy,
    Result,
    SweepPlan,
)
from pruned.policy.facts import resolve_facts
from pruned.rules import cleanplan as cleanup
from pruned.rules.decide import apply_brake
from pruned.rules.epilog import epilog_targets, job_ids_in_environ
from pruned.sweep import SweepReport, audit_sweep, execute, new_sweep_id, observe

EPILOG_SLACK = 30.0  # seconds beyond the kill grace before the epilog gives up (bounded time)


def read_env_jobs(pid: int, proc_root: str = "/proc") -> set[str]:
    """The job ids a process's environment names (root can read any /proc/PID/environ)."""
    return job_ids_in_environ(procfs.read_environ(pid, proc_root))


def _alarm(_signo, _frame) -> None:
    raise TimeoutError("epilog ran out of time")


def run_epilog(
    policy: Policy,
    job_id: str,
    uid: int,
    user: str | None,
    *,
    dry_run: bool,
    sink: AuditSink,
    proc_root: str = "/proc",
    print_fn: Callable[[str], None] = print,
) -> int:
    """Kill what job_id left, remove its per-job dirs, record it ended. 0, or 1 on failure."""
    budget = policy.kill_grace + EPILOG_SLACK
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(budget) + 1)
    try:
        return _epilog(policy, job_id, uid, user, dry_run, sink, proc_root, print_fn)
    except TimeoutError as e:
        print_fn(f"pruned epilog: job {job_id}: {e} after {budget:.0f}s")
        return EX_FAILED
    finally:
        signal.alarm(0)


def _epilog(policy, job_id, uid, user, dry_run, sink, proc_root, print_fn) -> int:
    now = time.time()
    facts = resolve_facts(policy)
    sweep_id = f"epilog-{job_id}-{new_sweep_id()[:6]}"
    t0 = time.monotonic()
    obs = observe(policy, facts, proc_root=proc_root)
    # Slurm 26.05 names the job's cgroups by its SLUID and tells the epilog both names.
    sluid = os.environ.get("SLURM_JOB_SLUID", "")
    own = (job_id, sluid) if is_sluid(sluid) else (job_id,)
    decisions, _last, why = epilog_targets(
        obs,
        policy,
        job_id,
        uid,
        env_jobs=lambda pid: read_env_jobs(pid, proc_root),
        protected=protected_pids(proc_root),
        aliases=own[1:],
    )
    # The same brake as a sweep: an epilog that wants to kill more than max_kills_per_sweep
    # processes is more likely looking at a wrong job view than at one job's leftovers.
    plan = apply_brake(SweepPlan(tuple(decisions)), policy)
    outcomes = execute(
        plan, obs.snap, obs.jobs, policy, dry_run=dry_run, proc_root=proc_root, allow_jobs=own
    )
    report = SweepReport(sweep_id, now, time.monotonic() - t0, dry_run, obs, outcomes)
    audit_sweep(report, sink)
    for o in outcomes:
        d = o.decision
        print_fn(f"{o.result.value:<7} kill pid {d.proc.pid} ({d.proc.comm}): {d.reason}: "
                 f"{o.detail}")

    # The job has ended: remember it, then remove its per-job directories.
    record = JobRecord(job_id, uid, now, now, user, "epilog")
    if not dry_run:
        history = JobHistory.load(policy.state_dir)
        prior = history.get(job_id)
        history.mark_ended(job_id, uid, now, start=prior.start if prior else None)
        history.save()
        end_job_record(policy.state_dir, job_id, now, uid=uid)
        prior = history.get(job_id)
        record = prior or record
    others = [j for j in obs.jobs.running() if j.job_id != job_id]
    nodes = container_nodes(policy.cleanup.job_container_base or "/nonexistent")
    fplan = cleanup.plan_cleanup(
        policy.cleanup,
        others,
        [record],
        set(),  # the job's own dirs go whatever else the uid runs
        facts.system_ranges,
        now,
        nodes,
        dir_grace=0.0,  # Slurm says the job ended: its own dirs go now
    )
    dir_plan = cleanup.CleanupPlan(
        job_dirs=tuple(i for i in fplan.job_dirs if i.job_id == job_id),
        loose=(),
        held=fplan.held,
        now=now,
        min_age=fplan.min_age,
        max_listed=fplan.max_listed,
    )
    fouts = execute_cleanup(dir_plan, dry_run)
    for fo in fouts:
        if fo.result is not Result.GONE:
            sink.emit(file_outcome_record(fo, sweep_id, dry_run, "cleanup.job_dir",
                                          f"job {job_id} ended (epilog)"))
            print_fn(f"{fo.result.value:<7} remove {fo.path}: {fo.files} files, {fo.bytes} bytes"
                     + (f"; {fo.detail}" if fo.detail else ""))
    failed = [o for o in outcomes if o.result is Result.FAILED]
    ffailed = [fo for fo in fouts if fo.result is Result.FAILED]
    print_fn(f"pruned epilog: job {job_id} uid {uid}: {why}; {len(outcomes)} processes, "
             f"{len(failed)} could not be killed; {len(fouts)} directories, "
             f"{len(ffailed)} failed")
    # Only processes that survived count as failure (Slurm drains the node on non-zero):
    # a directory that cannot be removed is reported but does not take the node out.
    if plan.brake:
        print_fn(f"pruned epilog: job {job_id}: {plan.brake}")
    # A tripped brake also exits 1: the node drains and an admin looks, rather than pruned
    # guessing further.
    return EX_FAILED if failed or plan.brake else EX_OK


def run_prolog(policy: Policy, job_id: str, uid: int, user: str | None) -> int:
    """Record the job start for the statedir job source (any batch system)."""
    write_job_record(policy.state_dir, job_id, uid, time.time(), user)
    return EX_OK

