"""One file sweep: learn which jobs ended, plan the cleanup (pure), carry it out, audit it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pruned import log
from pruned.act.audit import AuditRecord, AuditSink, error_text, event_record, files_record
from pruned.act.remove import CleanupOutcome, execute_cleanup
from pruned.jobs.history import JobHistory
from pruned.jobs.retention import housekeep
from pruned.jobs.source import read_jobs
from pruned.linux import procfs
from pruned.linux.dirfd import container_nodes
from pruned.linux.guards import read_guards
from pruned.linux.ipc import read_mqueues, read_sysvipc
from pruned.linux.users import user_name
from pruned.model import CleanupKind, JobView, Policy, Result
from pruned.policy.facts import NodeFacts
from pruned.rules.cleanplan import CleanupPlan, plan_cleanup
from pruned.sweep import make_sources, new_sweep_id
from pruned.text import printable


def file_outcome_record(
    fo: CleanupOutcome, sweep_id: str, dry_run: bool, rule: str, reason: str
) -> AuditRecord:
    """The audit record of one removed (or would-remove) directory or root's loose files."""
    detail = "; ".join(x for x in (fo.detail, *fo.errors[:3]) if x)
    return files_record(
        sweep_id,
        path=fo.path,
        files=fo.files + fo.dirs,
        nbytes=fo.bytes,
        dry_run=dry_run,
        reason=reason + (f"; {detail}" if detail else ""),
        rule=rule,
        uid=fo.uid,
        user=user_name(fo.uid),
        job_id=fo.job_id,
        failed=len(fo.errors),
        names=fo.listed,
    )


def execute_isolated(
    plan: CleanupPlan,
    dry_run: bool,
    on_outcome: Callable[[CleanupOutcome], None],
    ipc_roots: tuple[str, str] = ("/proc", "/dev/mqueue"),
) -> list[CleanupOutcome]:
    """execute_cleanup one item at a time, handing each outcome to `on_outcome` (the audit)
    as soon as it is known: an unexpected error (a bug) in one item makes that item a FAILED
    outcome saying why, and the items after it are still carried out."""
    guards = read_guards()  # once for all items, as execute_cleanup does
    empty = replace(plan, job_dirs=(), loose=(), ipc=())
    singles = [
        *((replace(empty, job_dirs=(i,)), CleanupKind.JOB_DIR, i.uid, i.path, i.job_id)
          for i in plan.job_dirs),
        *((replace(empty, loose=(replace(i, roots=(r,)),)), CleanupKind.LOOSE, i.uid, r, None)
          for i in plan.loose for r in i.roots),
        *((replace(empty, ipc=(o,)), CleanupKind.IPC, o.uid, o.label, None) for o in plan.ipc),
    ]  # fmt: skip
    out: list[CleanupOutcome] = []
    for one, kind, uid, path, job_id in singles:
        try:
            got = execute_cleanup(one, dry_run, guards, ipc_roots)
        except Exception as e:
            log.bug(f"cleanup of {path} failed, skipped", e)
            why = f"{path}: internal error: {error_text(e)}; skipped"
            got = [CleanupOutcome(kind, uid, path, Result.FAILED, job_id, errors=(why,))]
        for o in got:
            out.append(o)
            on_outcome(o)
    return out


def emit_file_record(
    sink: AuditSink, fo: CleanupOutcome, sweep_id: str, dry_run: bool, rule: str, reason: str
) -> None:
    """file_outcome_record out to the sink; a bug building or writing it is logged with the
    facts (what, where, result), never raised into the rest of the cleanup."""
    try:
        sink.emit(file_outcome_record(fo, sweep_id, dry_run, rule, reason))
    except Exception as e:
        log.bug(f"audit record of {fo.path} ({fo.result.value}, {fo.files} files) not "
                "written", e)


def learn_jobs(
    history: JobHistory,
    jobs: JobView,
    now: float,
    policy: Policy | None = None,
    *,
    prune: bool = False,
) -> list[str]:
    """Record running jobs; jobs seen running before and gone now have ended. Their ids.

    `prune` (the daemon's jobs refresh): also forget jobs ended jobs.keep_ended ago, in the
    history and the state dir, when due (pruned.jobs.retention); what it did is logged.
    """
    pol = policy or Policy()
    if prune:
        report = housekeep(history, pol.state_dir, now, pol.keep_ended)
        if report is not None:
            log.info(f"state: {report.summary()}")
            for problem in report.records.problems[:20]:
                log.warning(f"state: {problem}")
    if jobs.problems:
        return []  # a blind job source must not make every known job look ended
    return [r.job_id for r in history.observe(jobs, now, pol.idle_grace)]


@dataclass(slots=True)
class CleanReport:
    sweep_id: str
    dry_run: bool
    plan: CleanupPlan
    outcomes: list[CleanupOutcome] = field(default_factory=list)
    report_only: str | None = None
    newly_ended: list[str] = field(default_factory=list)
    duration: float = 0.0  # seconds, monotonic: the whole sweep (read, plan, remove, audit)

    @property
    def failed(self) -> list[CleanupOutcome]:
        return [o for o in self.outcomes if o.result is Result.FAILED]

    def lines(self) -> list[str]:
        out = []
        for o in self.outcomes:
            what = {
                CleanupKind.JOB_DIR: f"job {o.job_id} dir",
                CleanupKind.LOOSE: f"uid {o.uid} files in",
                CleanupKind.IPC: f"uid {o.uid} ipc",
            }[o.kind]
            line = f"{o.result.value:<7} {what} {o.path}: {o.files} files, {o.dirs} dirs, "
            line += f"{o.bytes} bytes"
            if o.skipped:
                line += f"; kept {len(o.skipped)}: {', '.join(o.skipped[:3])}"
            if o.errors:
                line += f"; errors: {', '.join(o.errors[:3])}"
            if o.detail:
                line += f"; {o.detail}"
            out.append(printable(line))  # file names are the users': never raw to a terminal
        for h in self.plan.held:
            out.append(f"held    {h}")
        mode = "dry-run" if self.dry_run else "enforce"
        tail = f"; REPORT-ONLY: {self.report_only}" if self.report_only else ""
        out.append(
            f"clean {self.sweep_id} ({mode}): {len(self.plan.job_dirs)} job dirs, "
            f"{len(self.plan.loose)} uids with loose files, {len(self.plan.ipc)} IPC objects, "
            f"{len(self.failed)} failed{tail}"
        )
        return out


def run_clean(
    policy: Policy,
    facts: NodeFacts,
    sink: AuditSink,
    *,
    dry_run: bool | None = None,
    history: JobHistory | None = None,
    proc_root: str = "/proc",
    mqueue: str = "/dev/mqueue",
) -> CleanReport:
    """Plan and carry out one file cleanup (job dirs, loose files, IPC objects of uids that
    are gone); report-only while the job source is in doubt."""
    dry = policy.dry_run if dry_run is None else dry_run
    t0 = time.monotonic()
    now = time.time()
    sweep_id = new_sweep_id()
    snap = procfs.snapshot(proc_root)
    jobs = read_jobs(make_sources(policy))
    hist = history if history is not None else JobHistory.load(policy.state_dir)
    ended_now = learn_jobs(hist, jobs, now, policy)
    if not dry and os.geteuid() == 0:
        hist.save()
    report_only = "; ".join(jobs.problems) or None
    live_uids = {p.uid for p in snap.procs.values() if not p.zombie}
    base = policy.cleanup.job_container_base
    plan = plan_cleanup(
        policy.cleanup,
        jobs.running(),
        hist.ended(),
        live_uids,
        facts.system_ranges,
        now,
        container_nodes(base) if base else (),
        ipc=read_sysvipc(proc_root) + read_mqueues(mqueue),
    )
    unknown = [j.job_id for j in jobs.running() if j.uid is None]
    if unknown and plan.loose:
        # A running job whose owner is not known yet could be any uid's: no loose files go.
        why = f"running job(s) {', '.join(unknown[:5])} with unknown uid: loose files kept"
        plan = replace(plan, loose=(), ipc=(), held=(*plan.held, why))
    acting_dry = dry or report_only is not None

    def audit(o: CleanupOutcome) -> None:  # each item's record as soon as it is done
        if o.result is Result.GONE:
            return
        if o.kind is CleanupKind.JOB_DIR:
            rule, reason = "cleanup.job_dir", f"job {o.job_id} ended"
        elif o.kind is CleanupKind.IPC:
            rule, reason = "cleanup.ipc", f"uid {o.uid} has no job and no process"
        else:
            rule, reason = "cleanup.loose_files", f"uid {o.uid} has no job and no process"
        emit_file_record(sink, o, sweep_id, acting_dry, rule, reason)

    outcomes = execute_isolated(plan, acting_dry, audit, ipc_roots=(proc_root, mqueue))
    report = CleanReport(sweep_id, acting_dry, plan, outcomes, report_only, ended_now)
    if report_only:
        sink.emit(event_record("report_only", f"file sweep {sweep_id} is report-only: "
                               f"{report_only}", sweep_id=sweep_id, reason=report_only))
    removed = sum(o.files + o.dirs for o in outcomes if o.result is Result.DONE)
    sink.emit(
        event_record(
            "sweep_summary",
            report.lines()[-1] + f"; {removed} entries removed",
            sweep_id=sweep_id,
            kind="files",
            dry_run="yes" if acting_dry else "no",
            files=removed,
            bytes=sum(o.bytes for o in outcomes if o.result is Result.DONE),
        )
    )
    report.duration = time.monotonic() - t0
    return report
