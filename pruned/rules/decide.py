"""Decision: class -> action, with the safety rails applied last. PURE.

Only `stray` can be acted on. A decision that the rails, the process's youth, the mass-kill
brake or report-only mode hold back keeps its intended action but carries `held` with the
reason, so scan, dry-run and the audit trail all show what *would* have happened and why not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from pruned.model import (
    UID_RAIL,
    Action,
    Decision,
    HeldBy,
    JobView,
    KnownExes,
    Policy,
    Proc,
    ProcClass,
    ProcKey,
    Result,
    Snapshot,
    SweepPlan,
    Verdict,
)
from pruned.rules.lineage import LineageMark, evidence
from pruned.rules.trust import is_kernel, is_root_daemon


def rail(
    proc: Proc, policy: Policy, protected: Collection[int], exes: KnownExes | None = None
) -> str | None:
    """The hard rail that forbids acting on proc, if any. No policy can lift these."""
    if is_kernel(proc):
        return "rail: pid 1, pid 2 and kernel threads are never touched"
    if proc.uid < UID_RAIL:
        return f"rail: uid {proc.uid} < {UID_RAIL}"
    if proc.pid in protected:
        return "rail: pruned itself or one of its ancestors"
    # Only a root-owned daemon is protected by its path: a user can run (or LD_PRELOAD into)
    # a copy of /usr/sbin/slurmstepd, and that must not make their process untouchable.
    daemons = (exes if exes is not None else KnownExes.of(policy)).daemons
    if is_root_daemon(proc, daemons):
        return f"rail: batch daemon executable {proc.exe}"
    if proc.zombie:
        return "zombie: already dead, waiting to be reaped"
    return None


# One reason string per class, not one per process (most of a sweep's decisions are these).
_NEVER = {c: f"class {c}: never acted on" for c in ProcClass}


def choose_action(proc: Proc, verdict: Verdict, jobs: JobView, policy: Policy) -> Decision:
    """The policy's action for one classified process, before rails and brakes."""
    if verdict.cls is not ProcClass.STRAY:
        return Decision(proc, verdict, Action.IGNORE, _NEVER[verdict.cls])
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


def held(d: Decision, why: str, by: HeldBy) -> Decision:
    """d, held back by guard `by` for the reason `why` (it keeps the action it would take)."""
    return replace(d, held=why, held_by=by)


def decide(
    snap: Snapshot,
    verdicts: Mapping[int, Verdict],
    jobs: JobView,
    policy: Policy,
    *,
    protected: Collection[int] = (),
    uids: Collection[int] | None = None,
    exes: KnownExes | None = None,
    lineage: Mapping[int, LineageMark] | None = None,
    adopt_failed: Mapping[ProcKey, str] | None = None,
    known: Mapping[int, Decision] | None = None,
) -> SweepPlan:
    """Turn verdicts into decisions; rails, min_age, scope, report-only and the brake come last.

    `protected`: pids that must never be touched (pruned and its ancestors).
    `uids`: when given, only processes of these uids may be acted on.
    `lineage`: pid -> the stray lineage it belongs to (pruned.rules.lineage.trace); a young
    stray whose lineage has been stray for min_age is judged with it.
    `adopt_failed`: processes whose adoption the kernel refused before, with the error:
    their adoption is not retried, the policy's adopt_failure applies instead.
    `known`: earlier decisions (the last sweep's, rules.steady). One is taken as it is when
    it was made for the very same record and verdict objects and is not a stray's: a
    non-stray is ignored whatever else holds. A stray is always decided here (min_age is
    time; the lineage, scope, adoption failures and the brake move).
    """
    out: list[Decision] = []
    get = known.get if known else None
    for pid in sorted(verdicts):
        proc = snap.procs[pid]
        if get is not None and (k := get(pid)) is not None and k.proc is proc \
                and k.verdict is verdicts[pid] and k.verdict.cls is not ProcClass.STRAY:
            out.append(k)
            continue
        d = choose_action(proc, verdicts[pid], jobs, policy)
        if d.action is Action.ADOPT and adopt_failed and proc.key in adopt_failed:
            fb = policy.adopt_failure
            d = replace(d, action=fb, target_job=None,
                        reason=f"adoption failed before ({adopt_failed[proc.key]}): "
                        f"adopt_failure {fb}, not retried")  # fmt: skip
        if d.action is not Action.IGNORE:
            why, by = rail(proc, policy, protected, exes), HeldBy.RAIL
            if why is None and uids is not None and proc.uid not in uids:
                why, by = "outside the --uid scope of this sweep", HeldBy.SCOPE
            if why is None and (age := snap.age(proc)) < policy.min_age:
                mark = lineage.get(pid) if lineage else None
                grown = snap.taken_at - mark.since if mark is not None else 0.0
                if mark is not None and grown >= policy.min_age:
                    # Young, but of a lineage that is not: min_age shields a new login or
                    # step, never the fresh child of a stray that re-forks and exits.
                    line = evidence(mark, age, grown, policy.min_age)
                    v = d.verdict
                    g = mark.group
                    group = (g.kind, g.gid, mark.since) if g is not None else None
                    d = replace(d, verdict=replace(v, evidence=(*v.evidence, line)),
                                reason=f"{d.reason}; {line}", lineage_group=group)  # fmt: skip
                else:
                    why = f"younger than min_age {policy.min_age:g}s: judged later"
                    by = HeldBy.YOUNG
            if why is not None:
                d = held(d, why, by)
        out.append(d)

    report_only = tuple(jobs.problems)
    if report_only:
        why = "report-only: " + "; ".join(report_only)
        out = [
            held(d, why, HeldBy.REPORT_ONLY)
            if d.action is not Action.IGNORE and d.held is None
            else d
            for d in out
        ]

    return apply_brake(SweepPlan(tuple(out), report_only, None), policy)


def _listed(items: Sequence[object], limit: int = 10) -> str:
    """"a, b, c" or "a, b, c and 7 more": names for a one-line message."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def apply_brake(plan: SweepPlan, policy: Policy, already: Collection[int] = ()) -> SweepPlan:
    """The mass-kill brake: kills of more than brake_max_uids distinct uids mean none at all.

    It stops a blind job source, which makes every user with a process a stray at once, so it
    counts users, not processes: all of one uid's kills (a fork bomb of 400, or 60 old strays)
    are one target, and one user's strays can never hold the brake for another's.
    `already`: uids the event path killed since the last full sweep; its small batches
    together stay within the budget of one sweep.
    """
    kills = [d for d in plan.decisions if d.action is Action.KILL and d.held is None]
    uids = sorted({d.proc.uid for d in kills} | set(already))
    if not kills or len(uids) <= policy.brake_max_uids:
        return plan
    jobs = sorted({d.verdict.job_id for d in kills if d.verdict.job_id is not None})
    earlier = sorted(set(already))
    since = f"; {_listed(earlier)} since the last full sweep" if earlier else ""
    in_jobs = f", in jobs {_listed(jobs)}" if jobs else ""
    brake = (
        f"mass-kill brake: kills of {len(uids)} uids ({_listed(uids)}{since}){in_jobs} "
        f"exceed kill.brake.max_uids={policy.brake_max_uids}; nothing was killed"
    )
    decisions = tuple(
        held(d, brake, HeldBy.BRAKE) if d.action is Action.KILL and d.held is None else d
        for d in plan.decisions
    )
    return replace(plan, decisions=decisions, brake=brake, brake_uids=tuple(uids),
                   brake_jobs=tuple(jobs))


def recheck(
    d: Decision,
    fresh: Proc | None,
    fresh_jobs: Sequence[tuple[str | None, str]],
    jobs: JobView,
    allow_jobs: Collection[str] = (),
) -> tuple[Result, str] | None:
    """A reason not to act on d after all, or None to go ahead.

    Judged on `fresh`, a full re-read just before acting (None if gone), and `fresh_jobs`,
    the (job id, cgroup line) pairs its cgroup lines name (job id None: a cgroup in Slurm's
    tree that the path grammar does not know). The snapshot may be a few hundred
    ms old: the process may be gone, its pid reused, its uid changed, or it may have been
    adopted into a running job since. `allow_jobs`: the epilog's own job (its id and
    SLUID), whose cgroup members it may act on.
    """
    if fresh is None or fresh.starttime != d.proc.starttime:
        return Result.GONE, "gone (or pid reused) before acting"
    if fresh.zombie:
        return Result.GONE, "exited before acting"
    if fresh.uid != d.proc.uid:
        return Result.SKIPPED, f"real uid changed to {fresh.uid} since the snapshot: not acted on"
    for job_id, line in fresh_jobs:
        if job_id is None:
            why = f"now in a Slurm cgroup pruned does not know ({line}): not acted on"
            return Result.SKIPPED, why
        job = jobs.job(job_id)
        own = job_id in allow_jobs or jobs.canonical(job_id) in allow_jobs
        if not own and (job is None or job.running):
            return Result.SKIPPED, f"now in job {job_id}'s cgroup ({line}): not acted on"
    return None
