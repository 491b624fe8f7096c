"""The verdict-comparison every scenario uses: the full sweep, the event path and reverify
must judge each process alike (issue 10). Imported inside the guest, where the installed
package provides pruned."""

from __future__ import annotations

from collections.abc import Iterable

from vmlib import Proc


def three_paths_disagree(roles: Iterable[tuple[str, Proc]]) -> tuple[int, list[str]]:
    """(processes compared, one line per disagreement) for the (role, process) pairs: the full
    sweep (tree read through cgroup.procs), the event path (each process's own
    /proc/PID/cgroup lines, ancestors read one by one) and the re-check before an action
    (reverify, which holds an action exactly when the process sits in a running job's
    cgroup). A process that exited in between is not compared."""
    from dataclasses import replace

    from pruned.jobs.slurmpath import membership_from_cgroups
    from pruned.model import Action, Decision, Result
    from pruned.policy.facts import resolve_facts
    from pruned.policy.load import default_policy_path, load_policy
    from pruned.reactor import mini_snapshot
    from pruned.rules.classify import classify
    from pruned.sweep import observe, reverify

    policy = load_policy(default_policy_path())
    facts = resolve_facts(policy)
    obs = observe(policy, facts)
    mine = [(role, p) for role, p in roles
            if (q := obs.snap.procs.get(p.pid)) is not None and q.starttime == p.starttime]
    snap = mini_snapshot([p.pid for _r, p in mine])
    view = replace(obs.jobs, membership=membership_from_cgroups(snap.procs.values()))
    event = classify(snap, view, policy, facts, obs.exes)
    wrong, compared = [], 0
    for role, p in mine:
        full = obs.verdicts[p.pid]
        ev = event.get(p.pid)
        if ev is None or snap.procs[p.pid].starttime != p.starttime:
            continue  # exited in between
        compared += 1
        if (full.cls, full.rule, full.job_id) != (ev.cls, ev.rule, ev.job_id):
            wrong.append(f"{role} {p.label()}: sweep {full.cls}/{full.rule}/{full.job_id}, "
                         f"event path {ev.cls}/{ev.rule}/{ev.job_id}")
        if full.cls == "system":
            continue  # never a target: reverify is not asked
        d = Decision(obs.snap.procs[p.pid], full, Action.KILL, "comparison")
        why = reverify(d, obs.jobs)
        held = why is not None and why[0] is Result.SKIPPED and why[1].startswith("now in")
        in_job = full.rule in ("batch.job_cgroup", "adopted.extern")
        if held != in_job:
            wrong.append(f"{role} {p.label()}: sweep {full.rule}, reverify {why}")
    return compared, wrong
