"""One-shot prolog and epilog for the batch system.

The epilog observes the node like a sweep, picks the ended job's leftovers
(pruned.rules.epilog says which), kills them through the same rails, brake and audit as a
sweep, records the job as ended and removes its per-job directories. The prolog records a
job start for the state-dir job source.

Slurm drains a node whose Epilog exits non-zero, so `epilog_command` (what `pruned-epilog`
runs) fails safe: a rejected or unreadable policy, or an internal error while loading it,
makes it use the last policy that passed validation (pruned.policy.lastgood), or do nothing
when there is none (`policy_fallback` record); an internal error while it runs
(`epilog_error`), its own timeout (`epilog_timeout`) and the mass-kill brake (`brake_tripped`)
are recorded and exit 0. Only a process that survived SIGKILL exits 1, and only while the
policy says `epilog.drain_on_survivor: true` (the default).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pruned import log
from pruned.act.audit import AuditSink, error_text, event_record, make_sink
from pruned.act.guard import protected_pids
from pruned.bounded import Abandoned, ChildError, run_bounded
from pruned.exitcodes import EX_FAILED, EX_OK
from pruned.filesweep import emit_file_record, execute_isolated
from pruned.jobs.history import JobHistory, JobRecord
from pruned.jobs.slurmpath import is_sluid
from pruned.jobs.statedir import end_job_record, write_job_record
from pruned.linux import procfs
from pruned.linux.dirfd import container_nodes
from pruned.model import (
    Action,
    Outcome,
    Policy,
    Result,
    SweepPlan,
)
from pruned.policy import lastgood
from pruned.policy.facts import resolve_facts
from pruned.policy.load import Loaded, PolicyError, load_path
from pruned.rules import cleanplan as cleanup
from pruned.rules.decide import apply_brake
from pruned.rules.epilog import epilog_targets, job_ids_in_environ
from pruned.sweep import (
    INTERNAL_ERROR_FIELD,
    SweepReport,
    audit_sweep,
    execute,
    new_sweep_id,
    observe,
)
from pruned.text import printable

EPILOG_SLACK = 30.0  # seconds beyond the kill grace before the epilog gives up (bounded time)


def read_env_jobs(
    pid: int, proc_root: str = "/proc", unreadable: list[str] | None = None
) -> set[str]:
    """The job ids a process's environment names (root can read any /proc/PID/environ).

    A read that times out (procfs.read_mm_file: the process holds its mmap lock in D state)
    or fails names no job, so the environment hint does not kill that process; why is
    appended to `unreadable`.
    """
    try:
        data = procfs.read_mm_file(pid, "environ", proc_root, limit=procfs.ENVIRON_READ)
    except procfs.ReadTimedOut:
        why = f"environ of pid {pid} unreadable: timed out"
    except OSError as e:
        why = f"environ of pid {pid} unreadable: {e.strerror or e}"
    else:
        return job_ids_in_environ(data or b"")
    if unreadable is not None:
        unreadable.append(why)
    return set()


class EpilogTimeout(BaseException):
    """The epilog's own time ran out. A BaseException, so that no `except OSError` or
    `except Exception` on the way (TimeoutError is an OSError) can swallow it."""


def _alarm(_signo, _frame) -> None:
    raise EpilogTimeout("epilog ran out of time")


def survivors(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The kills that failed: processes still alive after SIGKILL (and the freeze path), or
    whose signal was refused. Pure."""
    # A kill a bug cut short (INTERNAL_ERROR_FIELD) is not known to have survived: it is
    # recorded (internal error, skipped) and, like any other internal error, exits 0.
    return [o for o in outcomes if o.decision.action is Action.KILL and o.result is Result.FAILED
            and INTERNAL_ERROR_FIELD not in dict(o.fields)]


def epilog_exit(outcomes: Sequence[Outcome], policy: Policy) -> int:
    """The epilog's exit code. Pure: 1 (Slurm drains the node) only for a process that
    survived SIGKILL, and only when the policy says epilog.drain_on_survivor; else 0.

    Everything else the epilog may meet — the brake, report-only mode, a directory it could
    not remove, a vanished process — is recorded and exits 0.
    """
    return EX_FAILED if survivors(outcomes) and policy.epilog_drain_on_survivor else EX_OK


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
    started: float | None = None,
) -> int:
    """Kill what job_id left, remove its per-job dirs, record it ended; `epilog_exit`'s code.

    Bounded in time: kill.grace + EPILOG_SLACK from `started` (the command's monotonic
    start; default now). The work runs in a forked child (pruned.bounded) because a file
    walk on a hung filesystem cannot be interrupted by any signal: at the deadline the
    child is abandoned (SIGKILL; it dies when the kernel lets go), `epilog_timeout` is
    recorded with where it was blocked, and this returns 0 — Slurm's own timeout
    (PrologEpilogTimeout) drains the node, ours must not.
    """
    budget = policy.kill_grace + EPILOG_SLACK
    t0 = time.monotonic() if started is None else started

    def body(child_sink: AuditSink, child_print: Callable[[str], None]) -> int:
        return _epilog(policy, job_id, uid, user, dry_run, child_sink, proc_root, child_print)

    try:
        got = run_bounded(body, t0 + budget, sink, print_fn, on_record=_emit)
    except ChildError as e:
        if os.environ.get("PRUNED_DEBUG"):
            print(e.trace, file=sys.stderr)
        raise
    if isinstance(got, Abandoned):
        where = f"; it was blocked {got.where}" if got.where else ""
        _timed_out(sink, print_fn, job_id, uid, budget, time.monotonic() - t0,
                   f"its worker (pid {got.pid}) did not finish{where}")
        return EX_OK
    return got


def _timed_out(sink: AuditSink, print_fn: Callable[[str], None], job_id: str, uid: int,
               budget: float, elapsed: float, what: str) -> None:
    msg = (f"epilog of job {job_id} (uid {uid}) ran out of time after {elapsed:.0f}s "
           f"(its bound: {budget:.0f}s): {what}; exiting 0 so "
           "the node is not drained, the daemon's sweeps handle what is left")
    print_fn(f"pruned epilog: {msg}")
    _emit(sink, event_record("epilog_timeout", msg, job_id=job_id, uid=uid,
                             elapsed_ms=round(elapsed * 1000)))


def _epilog(policy, job_id, uid, user, dry_run, sink, proc_root, print_fn) -> int:
    now = time.time()
    facts = resolve_facts(policy)
    sweep_id = f"epilog-{job_id}-{new_sweep_id()[:6]}"
    t0 = time.monotonic()
    obs = observe(policy, facts, proc_root=proc_root)
    # Slurm 26.05 names the job's cgroups by its SLUID and tells the epilog both names.
    sluid = os.environ.get("SLURM_JOB_SLUID", "")
    own = (job_id, sluid) if is_sluid(sluid) else (job_id,)
    unreadable: list[str] = []
    decisions, _last, why = epilog_targets(
        obs,
        policy,
        job_id,
        uid,
        env_jobs=lambda pid: read_env_jobs(pid, proc_root, unreadable),
        protected=protected_pids(proc_root),
        aliases=own[1:],
    )
    # The same brake as a sweep. epilog_targets only ever names the job's own uid, which is
    # one target however many processes it left: this holds only if that ever changed.
    # (The epilog is its own process: it cannot share the daemon's budget, nor need to.)
    plan = apply_brake(SweepPlan(tuple(decisions)), policy)
    outcomes = execute(
        plan, obs.snap, obs.jobs, policy, dry_run=dry_run, proc_root=proc_root, allow_jobs=own
    )
    # Recorded with the epilog's own plan: the node-wide plan that observe() made (other
    # uids' strays, its brake) is not what the epilog decided and must not be logged as such.
    seen = replace(obs, plan=plan)
    report = SweepReport(sweep_id, now, time.monotonic() - t0, dry_run, seen, outcomes)
    audit_sweep(report, sink)  # what was killed is on record before anything else can fail
    for line in unreadable:
        log.warning(f"epilog of job {job_id}: {line}; not killed on the environment hint")
        print_fn(printable(f"pruned epilog: {line}; not killed on the environment hint"))
    for o in outcomes:
        d = o.decision
        print_fn(printable(f"{o.result.value:<7} kill pid {d.proc.pid} ({d.proc.comm}): "
                           f"{d.reason}: {o.detail}"))

    # The job has ended: remember it, then remove its per-job directories.
    record = JobRecord(job_id, uid, now, now, user, "epilog")
    if not dry_run:
        try:
            record = _mark_ended(policy, job_id, uid, now) or record
        except Exception as e:  # its directories still go; the daemon's sweeps learn the end
            log.bug(f"epilog of job {job_id}: recording the job ended failed", e)
            _emit(sink, event_record(
                "internal_error", f"epilog of job {job_id}: recording the job ended failed: "
                f"{error_text(e)}; its directories are still removed", job_id=job_id, uid=uid,
                reason=error_text(e), sweep_id=sweep_id))  # fmt: skip
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

    def audit(fo) -> None:  # each directory's record as soon as it is done
        if fo.result is not Result.GONE:
            emit_file_record(sink, fo, sweep_id, dry_run, "cleanup.job_dir",
                             f"job {job_id} ended (epilog)")
            print_fn(printable(f"{fo.result.value:<7} remove {fo.path}: {fo.files} files, "
                               f"{fo.bytes} bytes" + (f"; {fo.detail}" if fo.detail else "")))

    fouts = execute_isolated(dir_plan, dry_run, audit)
    failed = survivors(outcomes)
    ffailed = [fo for fo in fouts if fo.result is Result.FAILED]
    print_fn(f"pruned epilog: job {job_id} uid {uid}: {why}; {len(outcomes)} processes, "
             f"{len(failed)} could not be killed; {len(fouts)} directories, "
             f"{len(ffailed)} failed")
    # A directory that cannot be removed is reported but does not take the node out; nor does
    # the brake (brake_tripped is recorded): an admin reads the journal, the node keeps going.
    if plan.brake:
        print_fn(f"pruned epilog: job {job_id}: {plan.brake}")
    code = epilog_exit(outcomes, policy)
    if failed:
        verdict = ("exit 1: Slurm drains the node (epilog.drain_on_survivor: true)" if code
                   else "exit 0 (epilog.drain_on_survivor: false)")
        print_fn(f"pruned epilog: job {job_id}: {len(failed)} processes survived SIGKILL; "
                 f"{verdict}")
    return code


def _mark_ended(policy: Policy, job_id: str, uid: int, now: float) -> JobRecord | None:
    """Record job_id as ended in the history and its state-dir record; the history's record."""
    history = JobHistory.load(policy.state_dir)
    prior = history.get(job_id)
    history.mark_ended(job_id, uid, now, start=prior.start if prior else None)
    history.save()
    end_job_record(policy.state_dir, job_id, now, uid=uid)
    return history.get(job_id)


def run_prolog(policy: Policy, job_id: str, uid: int, user: str | None) -> int:
    """Record the job start for the statedir job source (any batch system)."""
    write_job_record(policy.state_dir, job_id, uid, time.time(), user)
    return EX_OK


# ---------------------------------------------------------------- failing safe


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    """The policy a one-shot hook runs with, and why, when it is not the one at `path`."""

    path: str
    policy: Policy | None  # None: neither the policy nor a last good one is usable
    loaded: Loaded | None = None  # set when the policy at `path` itself passed validation
    rejected: str = ""  # why the policy at `path` cannot be used ("" when it can)
    first_error: str = ""
    errors: int = 0
    error_lines: tuple[str, ...] = ()
    fallback: lastgood.Saved | None = None
    no_fallback: str = ""  # why there is no last good policy to use either

    def message(self, hook: str, job_id: str) -> str:
        if self.fallback is not None:
            return f"{hook} of job {job_id}: {self.rejected}; running with the " \
                   f"{self.fallback.describe()}"
        return (f"{hook} of job {job_id}: {self.rejected}; {self.no_fallback}: doing nothing "
                f"for this job")

    def record(self, hook: str, job_id: str, uid: int):
        """The `policy_fallback` audit record (WARNING)."""
        fb = self.fallback
        return event_record(
            "policy_fallback",
            self.message(hook, job_id),
            path=self.path,
            reason=self.first_error or self.rejected,
            errors=self.errors or None,
            fallback=fb.directory if fb else None,
            fallback_saved=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fb.saved_at))
            if fb else None,
            fallback_files=" ".join(fb.sources) if fb else None,
            result="fallback" if fb else "nothing done",
            job_id=job_id,
            uid=uid,
        )


def choose_policy(path: str, store: str | None = None) -> PolicyChoice:
    """The policy at `path`, else its last good one, else none. Never raises."""
    try:
        loaded = load_path(path)
        return PolicyChoice(path, loaded.policy, loaded)
    except PolicyError as e:
        more = f" (and {len(e.errors) - 1} more errors)" if len(e.errors) > 1 else ""
        first = e.errors[0] if e.errors else path
        rejected, errors = f"policy {path} rejected: {first}{more}", len(e.errors)
        lines = tuple(e.errors)
    except Exception as e:  # a loader bug must not drain the node either
        first = f"internal error: {type(e).__name__}: {e}"
        rejected, errors = f"policy {path} could not be loaded: {first}", 0
        lines = (f"{path}: {first}",)
    try:
        policy, saved = lastgood.load(path, store)
    except lastgood.LastGoodError as e:
        why = str(e)
    except Exception as e:
        why = f"internal error reading the last good policy: {type(e).__name__}: {e}"
    else:
        return PolicyChoice(path, policy, rejected=rejected, first_error=first, errors=errors,
                            error_lines=lines, fallback=saved)
    return PolicyChoice(path, None, rejected=rejected, first_error=first, errors=errors,
                        error_lines=lines, no_fallback=why)


def _emit(sink: AuditSink, record) -> None:
    """Write an audit record; a failing sink must not fail the epilog (JsonlSink already
    falls back to stderr)."""
    try:
        sink.emit(record)
    except Exception as e:
        print(f"pruned: cannot write audit record {record.event}: {e}: {record.message}",
              file=sys.stderr)


def _sink_for(policy: Policy | None) -> AuditSink:
    return make_sink(policy.audit_fallback if policy is not None else None)


def _keep_last_good(choice: PolicyChoice) -> None:
    """An epilog whose policy passed validation keeps it as the last good one (root only;
    unchanged policies cost one read). A failure here is no reason to fail the epilog."""
    if choice.loaded is None or os.geteuid() != 0 or not lastgood.keeps(choice.path):
        return
    try:
        lastgood.save(choice.path, choice.loaded.contents, saved_by="epilog")
    except Exception as e:
        print(f"pruned: note: could not keep the policy as the last good one: {e}",
              file=sys.stderr)


def epilog_command(
    path: str,
    job_id: str,
    uid: int,
    user: str | None,
    *,
    dry_run: bool,
    need_root: Callable[[str], None],
    print_fn: Callable[[str], None] = print,
    store: str | None = None,
) -> int:
    """`pruned epilog` / `pruned-epilog`: run_epilog, failing safe (see the module doc).

    0 unless a process survived SIGKILL under epilog.drain_on_survivor: true (1), or the
    epilog must act and is not root (PermissionError from need_root: 77, before anything).
    """
    # The whole epilog is bounded, from here: SIGALRM covers loading the policy (the
    # budget is known only after it), run_epilog's deadline the rest.
    t0 = time.monotonic()
    sink: AuditSink | None = None
    before = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(EPILOG_SLACK) + 1)
    try:
        try:
            choice = choose_policy(path, store)
            sink = _sink_for(choice.policy)
            if choice.rejected:
                print_fn(f"pruned epilog: {choice.message('epilog', job_id)}")
                _emit(sink, choice.record("epilog", job_id, uid))
            policy = choice.policy
            if policy is None:
                return EX_OK
            dry = dry_run or policy.dry_run  # mode: report reports here too
            if not dry:
                need_root("epilog")  # PermissionError: 77, an installation error, first
            _keep_last_good(choice)
        except EpilogTimeout as e:
            _timed_out(sink or _sink_for(None), print_fn, job_id, uid, EPILOG_SLACK,
                       time.monotonic() - t0, f"{e} while loading the policy")
            return EX_OK
        except PermissionError:
            raise
        except Exception as e:
            return _internal_error(e, job_id, uid, sink, print_fn)
        finally:
            signal.alarm(0)  # from here run_epilog's own deadline bounds it
        try:
            return run_epilog(policy, job_id, uid, user, dry_run=dry, sink=sink,
                              print_fn=print_fn, started=t0)
        except Exception as e:
            return _internal_error(e, job_id, uid, sink, print_fn)
    finally:
        signal.alarm(0)
        if before is not None:  # None: a handler not set from Python; leave ours
            signal.signal(signal.SIGALRM, before)


def _internal_error(e: Exception, job_id: str, uid: int, sink: AuditSink | None,
                    print_fn: Callable[[str], None]) -> int:
    what = f"{type(e).__name__}: {e}"
    msg = (f"epilog of job {job_id} (uid {uid}): internal error: {what}; exiting 0 so Slurm "
           "does not drain the node (PRUNED_DEBUG=1 shows the trace)")
    if os.environ.get("PRUNED_DEBUG"):
        traceback.print_exc()
    with contextlib.suppress(Exception):
        print_fn(f"pruned epilog: {msg}")
    with contextlib.suppress(Exception):
        _emit(sink or _sink_for(None), event_record("epilog_error", msg, job_id=job_id,
                                                    uid=uid, reason=what))
    return EX_OK


def prolog_command(
    path: str, job_id: str, uid: int, user: str | None, *, need_root: Callable[[str], None],
    print_fn: Callable[[str], None] = print, store: str | None = None,
) -> int:
    """`pruned prolog`: a rejected policy falls back to the last good one, like the epilog
    (Slurm drains the node and holds the job on a failed Prolog). Without either it still
    fails (78): a job start the state-dir source never hears of would make the job's
    processes look like strays."""
    choice = choose_policy(path, store)
    if choice.rejected:
        print_fn(f"pruned prolog: {choice.message('prolog', job_id)}")
        _emit(_sink_for(choice.policy), choice.record("prolog", job_id, uid))
        if choice.policy is None:
            raise PolicyError(list(choice.error_lines) or [choice.rejected])
    assert choice.policy is not None
    need_root("prolog")
    _keep_last_good(choice)
    return run_prolog(choice.policy, job_id, uid, user)
