"""One-shot prolog and epilog for the batch system.

The epilog kills what the ended job left and removes its per-job directories:
- when it was the uid's last job on this node: every stray process of the uid;
- otherwise only what is tied to this job: members of its cgroups, and strays whose
  environment names it (SLURM_JOB_ID / PBS_JOBID: a hint that only a process of the same uid
  can forge, so a forgery can only hurt that user's own strays).
Never: processes in another running job's cgroups, processes under a live batch daemon,
whitelisted processes (admins, sshd sessions, whitelisted executables), system processes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Collection

from pruned.act import kill as actions
from pruned.act.audit import AuditSink
from pruned.exitcodes import EX_FAILED, EX_OK
from pruned.filesweep import file_outcome_record
from pruned.jobs.history import JobHistory, JobRecord
from pruned.jobs.slurm import end_job_record, write_job_record
from pruned.linux import fdwalk as fswalk
from pruned.model import Action, Decision, Policy, ProcClass, Result
from pruned.policy.load import resolve_facts
from pruned.rules import cleanplan as cleanup
from pruned.rules.decide import SweepPlan, apply_brake, rail
from pruned.sweep import Observation, SweepReport, audit_sweep, execute, new_sweep_id, observe

JOB_ENV_KEYS = (b"SLURM_JOB_ID", b"SLURM_JOBID", b"PBS_JOBID")
EPILOG_SLACK = 30.0  # seconds beyond the kill grace before the epilog gives up (bounded time)


def read_env_jobs(pid: int, proc_root: str = "/proc") -> set[str]:
    """The job ids a process's environment names (root can read any /proc/PID/environ)."""
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return set()
    out = set()
    for item in data.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key in JOB_ENV_KEYS and value:
            out.add(value.decode(errors="replace").split(".")[0])
    return out


def epilog_targets(
    obs: Observation,
    policy: Policy,
    job_id: str,
    uid: int,
    *,
    env_jobs: Callable[[int], set[str]],
    protected: Collection[int] = (),
) -> tuple[list[Decision], bool, str]:
    """Which processes the epilog of job_id kills: (decisions, last_job, why).

    Pure but for env_jobs, which is only asked about the uid's strays.
    """
    others = [j for j in obs.jobs.running_for(uid) if j.job_id != job_id]
    # With proctrack/linuxproc there are no job cgroups to see other jobs in; a process of
    # the uid under a live batch daemon is the sign that one runs.
    under_daemon = [
        pid
        for pid, v in obs.verdicts.items()
        if v.rule == "batch.daemon_lineage"
        and obs.snap.procs[pid].uid == uid
        and pid not in obs.jobs.membership
    ]
    if obs.jobs.problems:
        last, why = False, "job source has problems, so only this job's processes"
    elif others:
        last, why = False, "uid has other running jobs: " + ", ".join(j.job_id for j in others)
    elif under_daemon:
        last, why = False, f"uid has processes under a live batch daemon (pid {under_daemon[0]})"
    else:
        last, why = True, "this was the uid's last job on the node"

    out: list[Decision] = []
    for d in obs.plan.decisions:
        p, v = d.proc, d.verdict
        if p.uid != uid or v.cls in (ProcClass.SYSTEM, ProcClass.WHITELISTED):
            continue
        member = obs.jobs.membership.get(p.pid)
        if member is not None and member.job_id == job_id:
            reason = f"epilog of job {job_id}: in its cgroup ({member.cgroup})"
        elif v.cls is not ProcClass.STRAY:
            continue  # batch or adopted in another job, or under a live daemon
        elif last:
            reason = f"epilog of job {job_id}: stray of a uid whose last job ended ({why})"
        elif job_id in env_jobs(p.pid):
            reason = f"epilog of job {job_id}: stray whose environment names job {job_id}"
        else:
            continue
        held = rail(p, policy, protected)
        out.append(
            Decision(p, v, Action.KILL, reason, held=held, held_by="rail" if held else None)
        )
    return out, last, why


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
    decisions, _last, why = epilog_targets(
        obs,
        policy,
        job_id,
        uid,
        env_jobs=lambda pid: read_env_jobs(pid, proc_root),
        protected=actions.protected_pids(proc_root),
    )
    # The same brake as a sweep: an epilog that wants to kill more than max_kills_per_sweep
    # processes is more likely looking at a wrong job view than at one job's leftovers.
    plan = apply_brake(SweepPlan(tuple(decisions)), policy)
    outcomes = execute(
        plan, obs.snap, obs.jobs, policy, dry_run=dry_run, proc_root=proc_root, allow_job=job_id
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
    nodes = fswalk.container_nodes(policy.cleanup.job_container_base or "/nonexistent")
    fplan = cleanup.plan_cleanup(
        policy.cleanup,
        others,
        [record],
        set(),  # the job's own dirs go whatever else the uid runs
        facts.system_ranges,
        now,
        nodes,
    )
    dir_plan = cleanup.CleanupPlan(
        job_dirs=tuple(i for i in fplan.job_dirs if i.job_id == job_id),
        loose=(),
        held=fplan.held,
        now=now,
        min_age=fplan.min_age,
        max_listed=fplan.max_listed,
    )
    fouts = fswalk.execute_cleanup(dir_plan, dry_run)
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

