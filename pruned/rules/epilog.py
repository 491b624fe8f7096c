"""Which processes an epilog kills: the ended job's leftovers, and no one else's. PURE.

- when it was the uid's last job on this node: every stray process of the uid;
- otherwise only what is tied to this job: members of its cgroups, and strays whose
  environment names it (SLURM_JOB_ID / PBS_JOBID: a hint that only a process of the same uid
  can forge, so a forgery can only hurt that user's own strays).
Never: processes in another running job's cgroups, processes under a live batch daemon,
whitelisted processes (admins, sshd sessions, whitelisted executables), system processes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from pruned.model import Action, Decision, HeldBy, Observation, Policy, ProcClass
from pruned.rules.decide import rail

JOB_ENV_KEYS = (b"SLURM_JOB_ID", b"SLURM_JOBID", b"PBS_JOBID")


def job_ids_in_environ(data: bytes) -> set[str]:
    """The job ids a NUL-separated environment names: each value whole (PBS passes its
    epilog the full 123[4].server) and the part before its first '.' (123[4], Slurm's 17)."""
    out = set()
    for item in data.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key in JOB_ENV_KEYS and value:
            # losslessly (surrogateescape): a value that is not UTF-8 names no real job, and
            # must not become equal to another after a lossy decode
            text = value.decode("utf-8", "surrogateescape")
            out |= {text, text.split(".")[0]}
    return out


def epilog_targets(
    obs: Observation,
    policy: Policy,
    job_id: str,
    uid: int,
    *,
    env_jobs: Callable[[int], set[str]],
    protected: Collection[int] = (),
    aliases: Collection[str] = (),
) -> tuple[list[Decision], bool, str]:
    """Which processes the epilog of job_id kills: (decisions, last_job, why).

    `aliases`: other names of the job's cgroups (its SLUID, Slurm 26.05+). Pure but for
    env_jobs, which is only asked about the uid's strays.
    """
    own = {job_id, *aliases}
    others = [j for j in obs.jobs.running_for(uid) if j.job_id not in own]
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
        if member is not None and obs.jobs.canonical(member.job_id) in own:
            reason = f"epilog of job {job_id}: in its cgroup ({member.cgroup})"
        elif v.cls is not ProcClass.STRAY:
            continue  # batch or adopted in another job, or under a live daemon
        elif last:
            reason = f"epilog of job {job_id}: stray of a uid whose last job ended ({why})"
        elif job_id in env_jobs(p.pid):
            reason = f"epilog of job {job_id}: stray whose environment names job {job_id}"
        else:
            continue
        held = rail(p, policy, protected, obs.exes)
        out.append(
            Decision(p, v, Action.KILL, reason, held=held, held_by=HeldBy.RAIL if held else None)
        )
    return out, last, why
