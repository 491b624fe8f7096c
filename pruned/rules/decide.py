"""Decision: class -> action, with the safety rails applied last. PURE.

Only `stray` can be acted on. A decision that the rails, the process's youth, the mass-kill
brake or report-only mode hold back keeps its intended action but carries `held` with the
reason, so scan, dry-run and the audit trail all show what *would* have happened and why not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pruned.jobs.slurm import root_exe_matches
from pruned.model import (
    UID_RAIL,
    Action,
    Decision,
    JobView,
    Policy,
    Proc,
    ProcClass,
    Snapshot,
    Verdict,
)
from pruned.rules.classify import is_genuine_root, resolved


@dataclass(frozen=True, slots=True)
class SweepPlan:
    decisions: tuple[Decision, ...]  # one per process of the snapshot, pid order
    report_only: tuple[str, ...] = ()  # why nothing may act this sweep (job source problems)
    brake: str | None = None  # set when the mass-kill brake tripped

    def actionable(self) -> list[Decision]:
        """Decisions that act (or would, in dry-run): not ignore, not held."""
        return [d for d in self.decisions if d.action is not Action.IGNORE and d.held is None]

    def reported(self) -> list[Decision]:
        """Decisions worth an audit record: those that act, would act, or that the brake or
        report-only mode stopped. Rails, youth and --uid scope hold quietly every sweep."""
        return [
            d
            for d in self.decisions
            if d.action is not Action.IGNORE and d.held_by in (None, "report_only", "brake")
        ]


def rail(proc: Proc, policy: Policy, protected: Collection[int]) -> str | None:
    """The hard rail that forbids acting on proc, if any. No policy can lift these."""
    if proc.pid in (1, 2) or proc.kthread or proc.ppid == 2:
        return "rail: pid 1, pid 2 and kernel threads are never touched"
    if proc.uid < UID_RAIL:
        return f"rail: uid {proc.uid} < {UID_RAIL}"
    if proc.pid in protected:
        return "rail: pruned itself or one of its ancestors"
    # Only a root-owned daemon is protected by its path: a user can run (or LD_PRELOAD into)
    # a copy of /usr/sbin/slurmstepd, and that must not make their process untouchable.
    if is_genuine_root(proc) and root_exe_matches(
        proc.exe, resolved((*policy.batch_daemons, *policy.slurm.stepd))
    ):
        return f"rail: batch daemon executable {proc.exe}"
    if proc.zombie:
        return "zombie: already dead, waiting to be reaped"
    return None


def choose_action(proc: Proc, verdict: Verdict, jobs: JobView, policy: Policy) -> Decision:
    """The policy's action for one classified process, before rails and brakes."""
    if verdict.cls is not ProcClass.STRAY:
        return Decision(proc, verdict, Action.IGNORE, f"class {verdict.cls}: never acted on")
    action = policy.stray_action
    if action is Action.ADOPT:
        job = jobs.newest_for(proc.uid)
        if job is not None:
            return Decision(
                proc,
                verdict,
                Action.ADOPT,
                f"adopt into uid {proc.uid}'s newest running job {job.job_id}",
                target_job=job.job_id,
            )
        fallback = policy.adopt_fallback
        return Decision(
            proc,
            verdict,
            fallback,
            f"uid {proc.uid} has no running job to adopt into: fallback {fallback}",
        )
    if action is Action.KILL:
        return Decision(proc, verdict, Action.KILL, "policy: strays are killed")
    return Decision(proc, verdict, Action.IGNORE, "policy: strays are ignored")


def _held(d: Decision, why: str, by: str) -> Decision:
    return Decision(d.proc, d.verdict, d.action, d.reason, d.target_job, held=why, held_by=by)


def decide(
    snap: Snapshot,
    verdicts: Mapping[int, Verdict],
    jobs: JobView,
    policy: Policy,
    *,
    protected: Collection[int] = (),
    uids: Collection[int] | None = None,
) -> SweepPlan:
    """Turn verdicts into decisions; rails, min_age, scope, report-only and the brake come last.

    `protected`: pids that must never be touched (pruned and its ancestors).
    `uids`: when given, only processes of these uids may be acted on.
    """
    out: list[Decision] = []
    for pid in sorted(verdicts):
        proc = snap.procs[pid]
        d = choose_action(proc, verdicts[pid], jobs, policy)
        if d.action is not Action.IGNORE:
            why, by = rail(proc, policy, protected), "rail"
            if why is None and uids is not None and proc.uid not in uids:
                why, by = "outside the --uid scope of this sweep", "scope"
            if why is None and snap.age(proc) < policy.min_age:
                why, by = f"younger than min_age {policy.min_age:g}s: judged later", "young"
            if why is not None:
                d = _held(d, why, by)
        out.append(d)

    report_only = tuple(jobs.problems)
    if report_only:
        why = "report-only: " + "; ".join(report_only)
        out = [
            _held(d, why, "report_only") if d.action is not Action.IGNORE and d.held is None else d
            for d in out
        ]

    return apply_brake(SweepPlan(tuple(out), report_only, None), policy)


def apply_brake(plan: SweepPlan, policy: Policy, already: int = 0) -> SweepPlan:
    """The mass-kill brake: more kills than max_kills_per_sweep means none at all.

    `already`: kills spent since the last full sweep (the event path acts in small batches,
    which together must stay within the same budget as one sweep).
    """
    kills = [d for d in plan.decisions if d.action is Action.KILL and d.held is None]
    if already + len(kills) <= policy.max_kills_per_sweep:
        return plan
    since = f" (+{already} since the last sweep)" if already else ""
    brake = (
        f"mass-kill brake: {len(kills)} kills{since} exceed "
        f"max_kills_per_sweep={policy.max_kills_per_sweep}; nothing was killed"
    )
    held = tuple(
        _held(d, brake, "brake") if d.action is Action.KILL and d.held is None else d
        for d in plan.decisions
    )
    return SweepPlan(held, plan.report_only, brake)
