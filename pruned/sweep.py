"""One sweep: observe the node, decide, act, audit. Where the layers meet.

Order matters: the /proc snapshot is taken *before* the job cgroups are read. A process
can only enter a job cgroup (slurmstepd placing a task, pam_slurm_adopt adopting a login),
never leave one on its own, so reading membership second means every snapshot process that
belongs to a job is seen in it. The reverse order would miss a login adopted in between and
call it a stray.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache

from pruned import log
from pruned.act.adopt import AdoptFailures, adopt, failure_reason
from pruned.act.audit import (
    AuditRecord,
    AuditSink,
    error_text,
    event_record,
    group_held,
    held_record,
    outcome_fallback_record,
    record_for_outcome,
    summary_record,
    tally,
)
from pruned.act.freeze import freeze_and_kill
from pruned.act.guard import Refused, protected_pids
from pruned.act.kill import REMIND_EVERY, Survivors, held_by_kernel, kill_many, read_wchan
from pruned.jobs.slurm import SlurmCgroupSource
from pruned.jobs.slurmpath import slurm_lines, unknown_lines
from pruned.jobs.source import JobSource, read_jobs
from pruned.jobs.statedir import StateDirSource
from pruned.lineage import LineageMemory
from pruned.linux import exeid, procfs
from pruned.linux.proccache import ProcCache
from pruned.linux.users import user_name
from pruned.model import (
    Action,
    Decision,
    HeldBy,
    JobView,
    KnownExes,
    Observation,
    Outcome,
    Policy,
    Proc,
    ProcKey,
    Result,
    Snapshot,
    SweepPlan,
)
from pruned.policy.facts import NodeFacts
from pruned.rules.classify import classify
from pruned.rules.decide import apply_brake, decide, recheck
from pruned.rules.lineage import trace
from pruned.rules.steady import Basis, VerdictMemo, carry, remember


def make_sources(policy: Policy, cache: ProcCache | None = None) -> list[JobSource]:
    """The job sources the policy names, in its order. `cache`: the ProcCache of the
    snapshot just taken (its memo spares the Slurm source's walk for unchanged processes)."""
    out: list[JobSource] = []
    for name in policy.job_sources:
        if name == "slurm":
            memo = None if cache is None else (cache.unchanged, cache.memo("slurm"))
            out.append(SlurmCgroupSource(policy.slurm.cgroup_root, policy.slurm.stepd, memo=memo,
                                         pids=None if cache is None else cache.listed))
        elif name == "statedir":
            out.append(StateDirSource(policy.state_dir))
    return out


@lru_cache(maxsize=8)
def known_exes(policy: Policy) -> KnownExes:
    """The policy's trusted executables plus their symlink targets, cached between full
    observations: the event path classifies many small batches, and resolving the links
    for each one cost ~15% of a batch. observe() clears the cache, so a changed link (an
    alternatives switch) is seen by the next sweep."""
    return KnownExes.of(policy, procfs.exe_link_targets, exeid.host_ids)


def pin_host_exes(snap: Snapshot, exes: KnownExes, proc_root: str = "/proc") -> Snapshot:
    """Mark the processes whose exe names a whitelisted path *and* is the host's file there
    (Proc.exe_host): the classifier trusts a whitelisted exe only then. Costs one stat of
    /proc/PID/exe per process that names such a path, nothing for the rest."""
    if not exes.whitelist:
        return snap
    procs = dict(snap.procs)
    for pid, p in snap.procs.items():
        exe = p.exe
        if exe is None or exe.removesuffix(exeid.DELETED) not in exes.whitelist:
            continue
        if exeid.exe_is_host_file(pid, exe, exes.whitelist_ids, proc_root):
            procs[pid] = replace(p, exe_host=True)
    return replace(snap, procs=procs)


def observe(
    policy: Policy,
    facts: NodeFacts,
    *,
    uids: Collection[int] | None = None,
    sources: Sequence[JobSource] | None = None,
    proc_root: str = "/proc",
    lineage: LineageMemory | None = None,
    adopt_failures: AdoptFailures | None = None,
    cache: ProcCache | None = None,
) -> Observation:
    """Read the node and decide, without acting: what scan, explain and every sweep start with.

    `lineage`: the daemon's memory of stray lineages (without it, only what this snapshot
    shows: a stray parent, a session with an older stray); `adopt_failures`: processes whose
    adoption was refused before (not retried); `cache`: the daemon's ProcCache (steady-state
    sweeps re-read only what changed).
    """
    known_exes.cache_clear()  # re-resolve configured exe symlinks once per full observation
    exes = known_exes(policy)
    exe_all = bool(policy.whitelist.exe)
    raw = (procfs.snapshot(proc_root, exe_all=exe_all) if cache is None
           else cache.snapshot(proc_root, exe_all=exe_all))  # fmt: skip
    snap = pin_host_exes(raw, exes, proc_root)
    jobs = read_jobs(make_sources(policy, cache) if sources is None else sources)
    memo = verdict_memo(cache)
    basis = Basis(policy, facts, exes)
    with _gc_paused():  # pure work allocating a record or two per process: see _gc_paused
        carried = carry(memo, snap.procs, jobs, basis) if memo is not None else None
        verdicts = classify(snap, jobs, policy, facts, exes,
                            known=carried.verdict if carried is not None else None)
        if lineage is not None:
            marks = lineage.observe(snap, verdicts, full=True)
        else:
            marks = trace(snap, verdicts, {}, {})[0]
        failed = None
        if adopt_failures is not None:
            adopt_failures.prune(LiveKeys(snap.procs))
            failed = adopt_failures.view()
        plan = decide(
            snap,
            verdicts,
            jobs,
            policy,
            protected=protected_pids(proc_root),
            uids=uids,
            exes=exes,
            lineage=marks,
            adopt_failed=failed,
            known=memo.decisions if memo is not None else None,
        )
        if memo is not None:
            remember(memo, basis, plan, snap.procs, jobs, carried)
    return Observation(snap, jobs, verdicts, plan, exes)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile (as in procfs.snapshot). Judging 100,000
    processes allocates a verdict and a decision each: enough young objects for a full
    collection that walks every record of the snapshot and the memories, ~10% of a full
    sweep. These records hold no cycles; reference counting frees them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def verdict_memo(cache: ProcCache | None) -> VerdictMemo | None:
    """The memo of the last sweep's verdicts (rules.steady) while `cache` holds its records:
    kept in the cache's memo store, so a full read, lost events or a detach empty it."""
    if cache is None or cache.listed() is None:
        return None
    store = cache.memo("verdicts")
    memo = store.get("memo")
    if memo is None:
        memo = store["memo"] = VerdictMemo()
    return memo


class LiveKeys(Collection[ProcKey]):
    """The ProcKeys of a snapshot's processes, without building them: the memories that
    forget what a snapshot no longer shows (adopt failures, survivors) ask only `in`, a few
    times, where a set cost a ProcKey per process per sweep."""

    __slots__ = ("procs",)

    def __init__(self, procs: Mapping[int, Proc]) -> None:
        self.procs = procs

    def __len__(self) -> int:
        return len(self.procs)

    def __iter__(self) -> Iterator[ProcKey]:
        return (p.key for p in self.procs.values())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, ProcKey):
            return False
        p = self.procs.get(key.pid)
        return p is not None and p.starttime == key.starttime


# ---------------------------------------------------------------- acting


def reverify(
    d: Decision, jobs: JobView, proc_root: str = "/proc", allow_jobs: Collection[str] = ()
) -> tuple[Result, str] | None:
    """Re-read one target in full just before acting (rules.decide.recheck judges it)."""
    fresh = procfs.read_proc(d.proc.pid, proc_root)
    lines = fresh.cgroups if fresh is not None else ()
    in_jobs = [(sp.job_id, line) for line, sp in slurm_lines(lines)]
    in_jobs += [(None, line) for line in unknown_lines(lines)]
    return recheck(d, fresh, in_jobs, jobs, allow_jobs)


def _descendants(roots: Sequence[Proc], snap: Snapshot, members: set[int]) -> dict[int, list[int]]:
    """For each root, its descendants among `members` (the other strays acted on the same way)."""
    children: dict[int, list[int]] = {}
    for p in snap.procs.values():
        if p.pid in members:
            children.setdefault(p.ppid, []).append(p.pid)
    out: dict[int, list[int]] = {}
    for r in roots:
        acc: list[int] = []
        stack = list(children.get(r.pid, ()))
        while stack:
            pid = stack.pop()
            acc.append(pid)
            stack.extend(children.get(pid, ()))
        out[r.pid] = acc
    return out


def execute(
    plan: SweepPlan,
    snap: Snapshot,
    jobs: JobView,
    policy: Policy,
    *,
    dry_run: bool,
    proc_root: str = "/proc",
    allow_jobs: Collection[str] = (),
    failures: AdoptFailures | None = None,
    already: Collection[int] = (),
    survivors: Survivors | None = None,
) -> list[Outcome]:
    """Carry out the plan: one Outcome per reported decision, acted or not.

    `allow_jobs`: the epilog's own job (id and SLUID), whose cgroup members it may kill.
    `failures`: the memory of refused adoptions (actions.adopt_failure is applied once);
    `already`: uids the event path killed since the last full sweep (the brake's count).
    `survivors` (the daemon's memory across sweeps): a kill target that outlived SIGKILL
    before is not acted on again, and has no outcome but an hourly reminder.
    """
    outcomes: list[Outcome] = []
    todo: list[Decision] = []
    for d in plan.reported():
        if survivors is not None and d.action is Action.KILL and d.proc.key in survivors:
            if survivors.reminder_due(d.proc.key):
                state = held_by_kernel(d.proc.key, proc_root) or d.proc.state
                fields = (("PRUNED_SURVIVED", "reminder"), ("PRUNED_STATE", state),
                          ("PRUNED_WCHAN", read_wchan(d.proc.pid, proc_root) or "unknown"))
                outcomes.append(Outcome(d, Result.FAILED, "still alive after SIGKILL; not "
                                        "signalled again", fields=fields))
            continue
        if d.held is not None:
            outcomes.append(Outcome(d, Result.SKIPPED, d.held))
            continue
        try:
            why = None if dry_run else reverify(d, jobs, proc_root, allow_jobs)
        except Exception as e:  # a bug re-reading this one process: skip it, not the sweep
            log.bug(f"re-check of pid {d.proc.pid} failed, skipped", e)
            outcomes.append(internal_error_outcome(d, "re-check", e))
            continue
        if why is not None:
            outcomes.append(Outcome(d, why[0], why[1]))
            continue
        todo.append(d)

    outcomes += _act(todo, snap, jobs, policy, dry_run, proc_root)
    if survivors is not None and not dry_run:
        outcomes = _note_survivors(outcomes, survivors, proc_root)
    if not dry_run:
        outcomes += _follow_lineages(plan, outcomes, snap, jobs, policy, proc_root)
        outcomes = _after_adopt_failures(
            outcomes, plan, snap, jobs, policy, proc_root, failures, already
        )
    return outcomes


def _follow_lineages(
    plan: SweepPlan,
    done: Sequence[Outcome],
    snap: Snapshot,
    jobs: JobView,
    policy: Policy,
    proc_root: str,
) -> list[Outcome]:
    """Kill the current members of each stray session or process group that a kill judged
    by lineage (Decision.lineage_group), until a pass finds none.

    A re-forker's generation may have exited between the snapshot and the kill, and its
    child, reparented, is no descendant of anything killed: the re-walk of act/tree follows
    only sessions led by a member. The group was judged a stray lineage of that uid in this
    snapshot, and the kernel does not reuse its id while it has members, so a process of the
    same real uid in it, started since the lineage began, descends from it. Each is re-read
    and re-checked like any target (gone, uid changed, now in a job: left alone). They are
    of uids the plan already kills, so the brake (which counts uids) is not moved.
    """
    # (kind, id) -> uid -> (start of the lineage in ticks, a decision judged by it)
    groups: dict[tuple[str, int], dict[int, tuple[int, Decision]]] = {}
    for d in plan.actionable():
        if d.action is Action.KILL and d.lineage_group is not None:
            kind, gid, since = d.lineage_group
            ticks = int((since - snap.boot_time) * snap.clk_tck) - 1
            per_uid = groups.setdefault((kind, gid), {})
            if d.proc.uid not in per_uid or ticks < per_uid[d.proc.uid][0]:
                per_uid[d.proc.uid] = (ticks, d)
    if not groups:
        return []
    acted = {k for o in done for k in (o.decision.proc.key, *o.signalled)}
    protected = protected_pids(proc_root)
    out: list[Outcome] = []
    for _ in range(3):
        todo: list[Decision] = []
        for pid, st in procfs.read_stats(proc_root).items():
            key = ProcKey(pid, st.starttime)
            if key in acted or pid in protected or st.zombie or st.kthread:
                continue
            for kind, gid in (("session", st.session), ("pgroup", st.pgrp)):
                per_uid = groups.get((kind, gid))
                if per_uid is None:
                    continue
                fresh = procfs.read_proc(pid, proc_root)
                hit = per_uid.get(fresh.uid) if fresh is not None else None
                if hit is None or fresh is None or fresh.starttime != st.starttime \
                        or st.starttime < hit[0]:
                    continue
                base = hit[1]
                reason = (f"{base.reason}; found in that {kind} {gid} when its member "
                          f"{base.proc.pid} was killed")  # fmt: skip
                todo.append(replace(base, proc=fresh, reason=reason))
                acted.add(key)
                break
        if not todo:
            break
        new = _act_reverified(todo, snap, jobs, policy, proc_root)
        acted |= {k for o in new for k in o.signalled}
        out += new
    return out


def _act(
    todo: Sequence[Decision], snap: Snapshot, jobs: JobView, policy: Policy, dry_run: bool,
    proc_root: str,
) -> list[Outcome]:  # fmt: skip
    """Act on verified decisions, grouped by (action, target job, uid): a tree is acted on
    as one, rooted at its topmost member."""
    outcomes: list[Outcome] = []
    groups: dict[tuple[Action, str | None, int], list[Decision]] = {}
    for d in todo:
        groups.setdefault((d.action, d.target_job, d.proc.uid), []).append(d)
    for (action, target, uid), ds in groups.items():
        by_pid = {d.proc.pid: d for d in ds}
        roots = [d.proc for d in ds if d.proc.ppid not in by_pid]
        desc = _descendants(roots, snap, set(by_pid))
        trees = (roots, desc)
        if action is Action.KILL:
            # One kill per job the uid's trees sit in; should it fail, the original trees
            # are tried one by one, so a bad tree never takes the others with it.
            trees = _merge_trees(roots, desc, by_pid)
            extra = _gone_leaders(*trees, by_pid, snap, protected_pids(proc_root))

            def run(rs, ds, by_pid=by_pid, uid=uid, extra=extra):
                return _kill(rs, ds, by_pid, uid, policy, dry_run, proc_root, extra)
        elif action is Action.ADOPT:
            def run(rs, ds, by_pid=by_pid, uid=uid, target=target):
                return _adopt(rs, ds, by_pid, jobs, target, uid, dry_run, proc_root)
        else:
            continue
        outcomes += _act_isolated(action, trees, by_pid, run, split=(roots, desc))
    return outcomes


def _gone_leaders(
    roots: Sequence[Proc],
    desc: dict[int, list[int]],
    by_pid: dict[int, Decision],
    snap: Snapshot,
    protected: frozenset[int],
) -> dict[int, list[ProcKey]]:
    """root pid -> the gone leaders of the stray groups its members were judged by.

    Handed to the kill as members that are already gone, they make its re-walk (act/tree:
    a session or process group whose leader is gone is followed for the tree's own uid,
    for processes started after the leader) take in, stop and kill whatever the group holds
    now: the re-forker's next generation, reparented before the first signal. The start
    given is that of the lineage, which the leader's cannot be later than.
    """
    out: dict[int, list[ProcKey]] = {}
    for r in roots:
        for pid in (r.pid, *desc[r.pid]):
            g = by_pid[pid].lineage_group
            if g is None or g[1] in snap.procs or g[1] in protected:
                continue
            ticks = max(0, int((g[2] - snap.boot_time) * snap.clk_tck) - 1)
            key = ProcKey(g[1], ticks)
            if key not in out.get(r.pid, ()):
                out.setdefault(r.pid, []).append(key)
    return out


def _after_adopt_failures(
    outcomes: list[Outcome],
    plan: SweepPlan,
    snap: Snapshot,
    jobs: JobView,
    policy: Policy,
    proc_root: str,
    failures: AdoptFailures | None,
    already: Collection[int],
) -> list[Outcome]:
    """Apply actions.adopt_failure to each process whose adoption failed, once.

    Each failure is remembered (by pid and starttime) so no later sweep retries it: decide()
    turns its adopt into the fallback. `kill` kills it now when that keeps the kills within
    the brake (kill.brake.max_uids distinct uids with the planned kills and `already`, the
    event path's since the last sweep), else it is left to the next sweep, where the brake
    judges it like any kill. The adopt_failed record says which, with the kernel's error.
    """
    failed = [i for i, o in enumerate(outcomes)
              if o.decision.action is Action.ADOPT and o.result is Result.FAILED
              and not o.detail.startswith("refused:")]  # fmt: skip
    if not failed:
        return outcomes
    fb = policy.adopt_failure
    uids = {d.proc.uid for d in plan.actionable() if d.action is Action.KILL} | set(already)
    uids |= {outcomes[i].decision.proc.uid for i in failed}
    kill_now = fb is Action.KILL and len(uids) <= policy.brake_max_uids
    out = list(outcomes)
    kills: list[Decision] = []
    for i in failed:
        o = out[i]
        d = o.decision
        why = dict(o.fields).get("PRUNED_ADOPT_ERROR") or o.detail
        if failures is not None:
            failures.remember(d.proc.key, why)
        if fb is Action.IGNORE:
            applied = "ignore: left alone, adoption not retried"
        elif kill_now:
            applied = "kill: killed now"
            kills.append(replace(d, action=Action.KILL, target_job=None,
                                 reason=f"adoption into job {d.target_job} failed ({why}): "
                                 "adopt_failure kill"))  # fmt: skip
        else:
            applied = (f"kill: deferred to the next sweep (kills of {len(uids)} uids would "
                       f"exceed kill.brake.max_uids={policy.brake_max_uids})")
        out[i] = replace(o, detail=f"{o.detail}; adopt_failure {applied}",
                         fields=(*o.fields, ("PRUNED_ADOPT_FAILURE", fb.value)))  # fmt: skip
    return out + _act_reverified(kills, snap, jobs, policy, proc_root)


def _act_reverified(ds: Sequence[Decision], snap: Snapshot, jobs: JobView, policy: Policy,
                    proc_root: str) -> list[Outcome]:
    """Follow-up kills: each decision re-read first (reverify), acted on only if it holds."""
    out: list[Outcome] = []
    todo: list[Decision] = []
    for d in ds:
        stop = reverify(d, jobs, proc_root)
        if stop is not None:
            out.append(Outcome(d, stop[0], stop[1]))
        else:
            todo.append(d)
    return out + _act(todo, snap, jobs, policy, False, proc_root)


INTERNAL_ERROR_FIELD = "PRUNED_INTERNAL_ERROR"  # on an outcome a bug cut short: not a survivor


def internal_error_outcome(d: Decision, step: str, e: Exception) -> Outcome:
    """The FAILED outcome of a decision an unexpected error (a bug) cut short: the process
    is skipped and its record says what and why (the caller logs the error, once)."""
    text = error_text(e)
    return Outcome(d, Result.FAILED, f"internal error in {step}: {text}; skipped", (),
                   ((INTERNAL_ERROR_FIELD, text),))  # fmt: skip


def _act_isolated(action: Action, trees: tuple[Sequence[Proc], dict[int, list[int]]],
                  by_pid: dict[int, Decision], run,
                  split: tuple[Sequence[Proc], dict[int, list[int]]] | None = None,
                  ) -> list[Outcome]:
    """run(roots, desc) for one group; on an unexpected error each tree (of `split` if given:
    the trees before merging) is tried alone (a tree already acted on comes back gone), so one
    bad tree is skipped, never the group."""
    roots, desc = trees
    try:
        return run(roots, desc)
    except Exception as e:
        alone = split if split is not None and len(split[0]) > 1 else trees
        if len(alone[0]) > 1:
            log.bug(f"{action.value} of {len(alone[0])} trees failed; acting on each alone", e)
            return [o for r in alone[0]
                    for o in _act_isolated(action, ([r], alone[1]), by_pid, run)]
        r = roots[0]
        log.bug(f"{action.value} of pid {r.pid}'s tree failed, skipped", e)
        return [internal_error_outcome(by_pid[p], action.value, e) for p in (r.pid, *desc[r.pid])]


def _merge_trees(
    roots: Sequence[Proc], desc: dict[int, list[int]], by_pid: dict[int, Decision]
) -> tuple[list[Proc], dict[int, list[int]]]:
    """One uid's kill trees as one per job they sit in (None: in none), rooted at the oldest.

    A uid is one target: a fork bomb reparents most of its members to init, and killing
    each as a tree of its own meant one quarantine and one /proc walk per member (minutes
    for a few hundred). Trees of different jobs stay apart: the kill's re-walk leaves a late
    member alone when it sits in a job cgroup its root is not in.
    """
    by_job: dict[str | None, list[Proc]] = {}
    for r in roots:
        by_job.setdefault(by_pid[r.pid].verdict.job_id, []).append(r)
    out_roots: list[Proc] = []
    out_desc: dict[int, list[int]] = {}
    for rs in by_job.values():
        top = min(rs, key=lambda p: (p.starttime, p.pid))
        out_roots.append(top)
        out_desc[top.pid] = [p for r in rs for p in (r.pid, *desc[r.pid]) if p != top.pid]
    return out_roots, out_desc


def _per_process(
    roots: Sequence[Proc],
    desc: dict[int, list[int]],
    by_pid: dict[int, Decision],
    result_of,
) -> list[Outcome]:
    out: list[Outcome] = []
    for r in roots:
        try:
            res, detail, touched, fields = result_of(r)
        except Exception as e:  # the action ran; its result could not be read: say so
            log.bug(f"result of pid {r.pid}'s tree not read", e)
            out += [internal_error_outcome(by_pid[p], "reading the result", e)
                    for p in (r.pid, *desc[r.pid])]  # fmt: skip
            continue
        for pid in (r.pid, *desc[r.pid]):
            d = by_pid[pid]
            out.append(Outcome(d, res(d.proc.key), detail, touched, fields))
    return out


def _classifier(
    dry_run: bool,
    ok: bool,
    *,
    failed: Collection[ProcKey],
    done: Collection[ProcKey],
    gone: Collection[ProcKey],
):
    """key -> Result for one action's members; checked in this order, failure first."""
    failed, done, gone = set(failed), set(done), set(gone)

    def res_of(key: ProcKey) -> Result:
        if dry_run:
            return Result.WOULD
        if key in failed:
            return Result.FAILED
        if key in done:
            return Result.DONE
        if key in gone:
            return Result.GONE
        return Result.DONE if ok else Result.FAILED

    return res_of


def _kill(roots, desc, by_pid, uid, policy, dry_run, proc_root, extra=None) -> list[Outcome]:
    extra = extra or {}
    trees = [(r.key, [*(by_pid[p].proc.key for p in desc[r.pid]), *extra.get(r.pid, ())])
             for r in roots]  # fmt: skip
    try:
        # Each tree is contained in a quarantine cgroup before its first SIGTERM: what it
        # forks while it handles the signal cannot get away (pruned.act.contain).
        results = kill_many(
            trees, grace=policy.kill_grace, dry_run=dry_run, uid=uid, proc_root=proc_root,
            contain="auto", cgroup_root=policy.slurm.cgroup_root,
        )  # fmt: skip
    except Refused as e:  # the last-line guard refused
        return [Outcome(by_pid[p], Result.FAILED, f"refused: {e}") for p in by_pid]
    # A tree that survived SIGKILL is forking faster than we signal: freeze it and kill again.
    final = []
    for r, res in zip(roots, results, strict=True):
        # Not for survivors the kernel holds (D state): they fork nothing, and the freeze
        # rounds would only add seconds to every sweep they are met in.
        if not dry_run and res.survivors and not all(held_by_kernel(k, proc_root)
                                                     for k in res.survivors):
            try:
                res = freeze_and_kill(
                    r.key,
                    list(res.survivors),
                    uid=uid,
                    dry_run=False,
                    cgroup_root=policy.slurm.cgroup_root,
                    proc_root=proc_root,
                )
            except Exception as e:  # keep what the kill did: its survivors are recorded
                log.bug(f"freeze and kill of pid {r.pid}'s survivors failed", e)
        final.append(res)
    by_root = {r.pid: res for r, res in zip(roots, final, strict=True)}

    def result_of(r: Proc):
        res = by_root[r.pid]
        res_of = _classifier(dry_run, res.ok, failed=res.survivors, done=res.signalled,
                             gone=res.gone_before)
        fields = tuple(res.audit_fields().items())
        return res_of, res.describe(), tuple(res.signalled or res.would), fields

    return _per_process(roots, desc, by_pid, result_of)


def _note_survivors(outcomes: list[Outcome], survivors: Survivors,
                    proc_root: str) -> list[Outcome]:
    """Remember the processes that outlived SIGKILL, and mark their outcome (once) for a
    `process_survived` record with their state and kernel wait."""
    out = []
    for o in outcomes:
        key = o.decision.proc.key
        kill_failed = (o.decision.action is Action.KILL and o.result is Result.FAILED
                       and INTERNAL_ERROR_FIELD not in dict(o.fields))  # a bug is no survivor
        state = held_by_kernel(key, proc_root) if kill_failed else None
        if state is None:
            out.append(o)
            continue
        survivors.remember(key)
        extra = (("PRUNED_SURVIVED", "first"), ("PRUNED_STATE", state),
                 ("PRUNED_WCHAN", read_wchan(key.pid, proc_root) or "unknown"))
        out.append(replace(o, fields=(*o.fields, *extra)))
    return out


def _adopt(roots, desc, by_pid, jobs, target, uid, dry_run, proc_root) -> list[Outcome]:
    job = jobs.jobs.get(target) if target else None
    if job is None or not job.extern_dirs:
        why = f"job {target} has no extern step cgroup to adopt into"
        return [Outcome(d, Result.FAILED, why) for d in by_pid.values()]
    results = {}
    for r in roots:
        keys = [by_pid[p].proc.key for p in desc[r.pid]]
        try:
            results[r.pid] = adopt(
                r.key, keys, job.extern_dirs, dry_run=dry_run, uid=uid, proc_root=proc_root
            )
        except Refused as e:
            results[r.pid] = e

    def result_of(r: Proc):
        res = results[r.pid]
        if isinstance(res, Refused):
            return (lambda _k: Result.FAILED), f"refused: {res}", (), ()
        res_of = _classifier(dry_run, res.ok, failed=res.failed, done=res.moved, gone=res.gone)
        fields = tuple(res.audit_fields().items())
        if res.failed:  # the kernel's refusal, for the adopt_failure memory and the record
            fields += (("PRUNED_ADOPT_ERROR", failure_reason(res, res.failed[0])),)
        return res_of, res.describe(), tuple(res.moved or res.would), fields

    return _per_process(roots, desc, by_pid, result_of)


# ---------------------------------------------------------------- the sweep


@dataclass(slots=True)
class SweepReport:
    sweep_id: str
    started: float
    duration: float
    dry_run: bool
    observation: Observation
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def by_class(self) -> Counter[str]:
        return Counter(v.cls.value for v in self.observation.verdicts.values())

    @property
    def by_action_result(self) -> Counter[tuple[str, str]]:
        return Counter((o.decision.action.value, o.result.value) for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result is Result.FAILED]

    def summary(self) -> str:
        """One line: what STATUS= and the summary record say."""
        plan = self.observation.plan
        cls = ", ".join(f"{n} {c}" for c, n in sorted(self.by_class.items()))
        acts = ", ".join(f"{a} {r}: {n}" for (a, r), n in sorted(self.by_action_result.items()))
        mode = "dry-run" if self.dry_run else "enforce"
        extra = ""
        if plan.report_only:
            extra += "; REPORT-ONLY: " + "; ".join(plan.report_only)
        if plan.brake:
            extra += "; BRAKE: " + plan.brake
        return (
            f"sweep {self.sweep_id} ({mode}) {self.duration * 1000:.0f} ms: "
            f"{len(self.observation.snap.procs)} processes ({cls}); "
            f"{acts or 'no action'}{extra}"
        )


def new_sweep_id() -> str:
    return uuid.uuid4().hex[:12]


def run_sweep(
    policy: Policy,
    facts: NodeFacts,
    sink: AuditSink,
    *,
    dry_run: bool | None = None,
    uids: Collection[int] | None = None,
    sources: Sequence[JobSource] | None = None,
    proc_root: str = "/proc",
    lineage: LineageMemory | None = None,
    adopt_failures: AdoptFailures | None = None,
    survivors: Survivors | None = None,
    cache: ProcCache | None = None,
) -> SweepReport:
    """Observe, decide, act (or would), and write one audit record per decision + a summary.

    `lineage`, `adopt_failures`: memories kept across sweeps (the daemon's, shared with its
    event path); without them each sweep knows only what it sees.
    """
    dry = policy.dry_run if dry_run is None else dry_run
    t0 = time.monotonic()
    started = time.time()
    sweep_id = new_sweep_id()
    obs = observe(policy, facts, uids=uids, sources=sources, proc_root=proc_root,
                  lineage=lineage, adopt_failures=adopt_failures, cache=cache)  # fmt: skip
    if survivors is not None:
        survivors.retain(LiveKeys(obs.snap.procs))
        obs = replace(obs, plan=spare_survivors(obs.plan, survivors, policy))
    outcomes = execute(obs.plan, obs.snap, obs.jobs, policy, dry_run=dry, proc_root=proc_root,
                       failures=adopt_failures, survivors=survivors)  # fmt: skip
    report = SweepReport(sweep_id, started, time.monotonic() - t0, dry, obs, outcomes)
    audit_sweep(report, sink)
    return report


def spare_survivors(plan: SweepPlan, survivors: Survivors, policy: Policy) -> SweepPlan:
    """The plan judged by the mass-kill brake without the known survivors.

    They are not killed again (execute skips them), so they must not count as kills
    either: a user who leaves max_kills_per_sweep processes stuck on a hung mount of their
    own (or many users' processes on one dead NFS server) would otherwise trip the brake
    every sweep and stop every kill on the node.
    """
    if plan.brake is None or not any(d.action is Action.KILL and d.proc.key in survivors
                                     for d in plan.decisions):
        return plan
    decisions = []
    for d in plan.decisions:
        if d.held_by is HeldBy.BRAKE:  # the brake held only decisions nothing else held
            d = replace(d, held=None, held_by=None)
        if d.action is Action.KILL and d.held is None and d.proc.key in survivors:
            d = replace(d, held="outlived SIGKILL before: left alone")
        decisions.append(d)
    return apply_brake(replace(plan, decisions=tuple(decisions), brake=None, brake_uids=(),
                               brake_jobs=()), policy)


def survived_record(o: Outcome, sweep_id: str, *, reminder: bool, **fields: str):
    """The `process_survived` record: a process that outlived SIGKILL, reported once (and
    then hourly) instead of re-killed every sweep."""
    p = o.decision.proc
    state, wchan = fields.get("PRUNED_STATE", "D"), fields.get("PRUNED_WCHAN", "unknown")
    what = "still alive" if reminder else "survived SIGKILL"
    msg = (f"pid {p.pid} ({p.comm}, uid {p.uid}) {what}: state {state}, waiting in the kernel "
           f"({wchan}); SIGKILL stays pending and takes effect when the kernel lets go. Later "
           f"sweeps do not signal or freeze it again (reminder every "
           f"{REMIND_EVERY / 3600:g}h); a hung filesystem is the usual cause")
    return event_record("process_survived", msg, sweep_id=sweep_id, pid=p.pid,
                        starttime=p.starttime, uid=p.uid, comm=p.comm, state=state,
                        wchan=wchan, reminder="yes" if reminder else "no")


def audit_sweep(report: SweepReport, sink: AuditSink, *, job_id: str | None = None) -> None:
    """One record per reported outcome (one per uid for what the brake or report-only mode
    held), the brake and report-only warnings, one summary.

    `job_id`: the job the whole sweep is about (an epilog's): outcomes whose verdict names no
    job (a stray outside every job cgroup) are recorded with it, so that
    `journalctl PRUNED_JOB_ID=J` shows everything the epilog of J did."""
    obs, sid, dry = report.observation, report.sweep_id, report.dry_run

    def job_of(o: Outcome) -> dict[str, str]:
        named = o.decision.target_job or o.decision.verdict.job_id
        return {"PRUNED_JOB_ID": job_id} if job_id and not named else {}

    single, held_groups = group_held(report.outcomes)
    records: list[AuditRecord] = []
    for o in single:
        fields = dict(o.fields)
        survived = fields.pop("PRUNED_SURVIVED", None)
        if survived is not None:
            try:
                r = survived_record(o, sid, reminder=survived == "reminder", **fields)
            except Exception as e:
                log.bug(f"process_survived record of pid {o.decision.proc.pid} not built", e)
            else:
                records.append(r)
                _emit(sink, r)
            if survived == "reminder":
                continue
            o = replace(o, fields=tuple(fields.items()))  # without the PRUNED_SURVIVED mark
        try:
            r = record_for_outcome(
                o,
                sid,
                dry,
                user_name(o.decision.proc.uid),
                boot_time=obs.snap.boot_time,
                clk_tck=obs.snap.clk_tck,
                extra={**job_of(o), **dict(o.fields)},
            )
        except Exception as e:  # a bug in a builder: the deciding facts still go out
            log.bug(f"audit record of pid {o.decision.proc.pid} not built in full", e)
            r = outcome_fallback_record(o, sid, dry, e)
        records.append(r)
        _emit(sink, r)
    for g in held_groups:
        try:
            rs = [held_record(g, sid, dry, user_name(g[0].decision.proc.uid),
                              boot_time=obs.snap.boot_time, clk_tck=obs.snap.clk_tck)]
        except Exception as e:
            log.bug(f"held record of uid {g[0].decision.proc.uid} not built in full", e)
            rs = [outcome_fallback_record(o, sid, dry, e) for o in g]
        for r in rs:
            records.append(r)
            _emit(sink, r)
    plan = obs.plan
    if plan.brake:
        _emit(sink, event_record("brake_tripped", plan.brake, sweep_id=sid,
                                 dry_run="yes" if dry else "no",
                                 uids=" ".join(map(str, plan.brake_uids)),
                                 jobs=" ".join(plan.brake_jobs)))
    report_only = "; ".join(obs.plan.report_only) or None
    if report_only:
        _emit(sink, event_record("report_only", f"sweep {sid} is report-only: {report_only}",
                                 sweep_id=sid, reason=report_only))
    _emit(
        sink,
        summary_record(
            sid,
            dry_run=dry,
            procs=len(obs.snap.procs),
            jobs=len(obs.jobs.running()),
            counts=tally(records),
            elapsed=report.duration,
            report_only=report_only,
        )
    )


def _emit(sink: AuditSink, record: AuditRecord) -> None:
    """One record out; a sink that raises (a bug: the journal sink falls back on its own)
    costs that record, logged in full at error, never the records after it."""
    try:
        sink.emit(record)
    except Exception as e:
        log.bug(f"audit record {record.event} not written: {record.message}", e)
