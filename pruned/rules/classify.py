"""Classification: every process -> exactly one class, with the rule and evidence that decided it.

PURE: works only on the snapshot, the job view, the policy and resolved node facts. The first
rule that holds wins, in this order: system, batch, adopted, whitelisted, stray.

Trust (rules.trust): a batch daemon or sshd listener is recognised only by real uid 0 *and*
its executable path (/proc/PID/exe); comm and argv are never trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from pruned.model import (
    UID_RAIL,
    JobView,
    KnownExes,
    Membership,
    Policy,
    Proc,
    ProcClass,
    Snapshot,
    Verdict,
)
from pruned.rules.trust import in_ranges, is_kernel, is_root_daemon, is_whitelisted_exe


class Facts(Protocol):
    """What the classifier needs beyond /proc, resolved by pruned.policy.facts.NodeFacts."""

    @property
    def system_ranges(self) -> tuple[tuple[int, int], ...]: ...
    @property
    def whitelist_uids(self) -> frozenset[int]: ...


# Verdicts that carry nothing process-specific are shared: classifying 20,000 processes
# should not build 20,000 identical frozen records.
_KERNEL = Verdict(ProcClass.SYSTEM, "system.kernel", "kernel thread: never touched")
_INIT = Verdict(ProcClass.SYSTEM, "system.kernel", "init: never touched")
_STRAY = Verdict(
    ProcClass.STRAY,
    "stray.default",
    "no running job cgroup, no batch-daemon ancestor, not an ssh session, not whitelisted",
)


def classify(
    snap: Snapshot,
    jobs: JobView,
    policy: Policy,
    facts: Facts,
    exes: KnownExes | None = None,
    known: Callable[[int, Proc], Verdict | None] | None = None,
) -> dict[int, Verdict]:
    """Classify every process of the snapshot. Returns pid -> Verdict.

    `exes`: the trusted executables with their symlink targets resolved (sweep.known_exes);
    without it, the policy's paths as configured. `known(pid, proc)`: a verdict that still
    holds, taken as it is, or None (rules.steady.carry: the last sweep's, for a process
    whose inputs did not change).
    """
    return _Classifier(snap, jobs, policy, facts, exes).run(known)


class _Classifier:
    def __init__(
        self,
        snap: Snapshot,
        jobs: JobView,
        policy: Policy,
        facts: Facts,
        exes: KnownExes | None,
    ) -> None:
        self.procs = snap.procs
        self.jobs = jobs
        self.policy = policy
        self.facts = facts
        known = exes if exes is not None else KnownExes.of(policy)
        self.daemons = known.daemons
        self.sshd = known.sshd
        self.wl_exe = known.whitelist
        # memo: pid -> pid of the nearest genuine batch-daemon ancestor (or None)
        self._daemon_anc: dict[int, int | None] = {}
        self._sshd_anc: dict[int, int | None] = {}
        self._uid_verdicts: dict[tuple[int, str], Verdict] = {}
        # Verdicts that depend on a shared input only (a membership, a deciding ancestor, a
        # uid, an exe) are built once per sweep: 100,000 processes of a few jobs are a few
        # verdicts, not 100,000 copies of the same sentences (~400 bytes each).
        self._shared: dict[tuple, Verdict] = {}

    def run(self, known: Callable[[int, Proc], Verdict | None] | None = None
            ) -> dict[int, Verdict]:  # fmt: skip
        if known is None:
            return {pid: self.verdict(p) for pid, p in self.procs.items()}
        # a Verdict is never falsy
        return {pid: known(pid, p) or self.verdict(p) for pid, p in self.procs.items()}

    # ---------------------------------------------------------------- lineage

    def _nearest(self, pid: int, memo: dict[int, int | None], test) -> int | None:
        """Nearest strict ancestor of pid for which test(proc) holds; memoised, cycle-safe."""
        chain: list[int] = []
        seen: set[int] = set()
        cur = self.procs[pid].ppid if pid in self.procs else 0
        found: int | None = None
        while cur > 0 and cur not in seen:
            if cur in memo:
                found = memo[cur] if not self._self_match(cur, test) else cur
                break
            seen.add(cur)
            proc = self.procs.get(cur)
            if proc is None:
                break
            if test(proc):
                found = cur
                break
            chain.append(cur)
            cur = proc.ppid
        # every process on the walked chain has the same nearest matching ancestor
        for c in chain:
            memo[c] = found
        return found

    def _self_match(self, pid: int, test) -> bool:
        proc = self.procs.get(pid)
        return proc is not None and test(proc)

    def _is_daemon(self, proc: Proc) -> bool:
        return is_root_daemon(proc, self.daemons)

    def _is_root_sshd(self, proc: Proc) -> bool:
        return is_root_daemon(proc, self.sshd)

    def daemon_ancestor(self, pid: int) -> int | None:
        return self._nearest(pid, self._daemon_anc, self._is_daemon)

    def sshd_ancestor(self, pid: int) -> int | None:
        return self._nearest(pid, self._sshd_anc, self._is_root_sshd)

    # ---------------------------------------------------------------- rules

    def verdict(self, p: Proc) -> Verdict:
        v = self._system(p)
        if v:
            return v
        member = self.jobs.membership.get(p.pid)
        v = self._batch(p, member) or self._adopted(p, member) or self._whitelisted(p, member)
        if v:
            return v
        return self._stray(p, member)

    def _system(self, p: Proc) -> Verdict | None:
        if is_kernel(p):
            return _INIT if p.pid == 1 else _KERNEL
        if p.uid < UID_RAIL:
            return self._per_uid(p.uid, "system.uid_rail")
        if in_ranges(p.uid, self.facts.system_ranges):
            return self._per_uid(p.uid, "system.service_account")
        return None

    def _per_uid(self, uid: int, rule: str) -> Verdict:
        """One shared verdict per (uid, rule): built once per sweep, not once per process."""
        v = self._uid_verdicts.get((uid, rule))
        if v is None:
            reason = (
                f"uid {uid} < {UID_RAIL}: system rail no policy can lower"
                if rule == "system.uid_rail"
                else f"uid {uid} is a service account (policy system ranges/users)"
            )
            v = self._uid_verdicts[(uid, rule)] = Verdict(ProcClass.SYSTEM, rule, reason)
        return v

    def _job_evidence(self, member: Membership) -> tuple[str, ...]:
        job = self.jobs.job(member.job_id)
        lines = [f"cgroup {member.cgroup}"]
        if job is not None:
            state = "running" if job.running else f"NOT running ({job.why_not_running or 'gone'})"
            lines.append(f"job {job.job_id} {state}, uid {job.uid}, source {job.source}")
        else:
            lines.append(f"job {member.job_id} unknown to the job source")
        return tuple(lines)

    def _job_running(self, member: Membership | None) -> bool:
        if member is None:
            return False
        job = self.jobs.job(member.job_id)
        return job is not None and job.running

    def _batch(self, p: Proc, member: Membership | None) -> Verdict | None:
        if member is not None and not member.understood:
            # In Slurm's tree, where the path grammar does not know the layout: when in doubt,
            # a job's. The job view carries a problem for it, so the sweep is report-only.
            return self._once(("unknown", id(member)), lambda: Verdict(
                ProcClass.BATCH,
                "batch.unknown_cgroup",
                f"in a Slurm cgroup pruned does not understand ({member.cgroup}): left alone",
                evidence=(f"cgroup {member.cgroup}",),
            ))
        if member is not None and member.step != "extern" and self._job_running(member):
            return self._once(("job", id(member)), lambda: Verdict(
                ProcClass.BATCH,
                "batch.job_cgroup",
                f"in running job {self.jobs.canonical(member.job_id)}'s cgroup "
                f"({member.step or 'job level'})",
                job_id=self.jobs.canonical(member.job_id),
                evidence=self._job_evidence(member),
            ))  # fmt: skip
        anc = self.daemon_ancestor(p.pid)
        if anc is not None:
            d = self.procs[anc]
            job = self.jobs.canonical(member.job_id) if member is not None else None
            return self._once(("daemon", anc, job), lambda: Verdict(
                ProcClass.BATCH,
                "batch.daemon_lineage",
                f"descends from batch daemon pid {anc} ({d.exe}, uid 0)",
                job_id=job,
                decider=anc,
                evidence=(f"ancestor {anc} exe={d.exe} uid=0 comm={d.comm!r}",),
            ))  # fmt: skip
        return None

    def _once(self, key: tuple, build: Callable[[], Verdict]) -> Verdict:
        """The sweep's one verdict for `key` (what alone it depends on), built on first use."""
        v = self._shared.get(key)
        if v is None:
            v = self._shared[key] = build()
        return v

    def _adopted(self, p: Proc, member: Membership | None) -> Verdict | None:
        if member is not None and member.step == "extern" and self._job_running(member):
            return self._once(("extern", id(member)), lambda: Verdict(
                ProcClass.ADOPTED,
                "adopted.extern",
                f"in running job {self.jobs.canonical(member.job_id)}'s extern step",
                job_id=self.jobs.canonical(member.job_id),
                evidence=self._job_evidence(member),
            ))  # fmt: skip
        return None

    def _whitelisted(self, p: Proc, member: Membership | None) -> Verdict | None:
        wl = self.policy.whitelist
        if p.uid in self.facts.whitelist_uids:
            return self._once(("wl-user", p.uid), lambda: Verdict(
                ProcClass.WHITELISTED,
                "whitelist.user",
                f"uid {p.uid} is whitelisted (whitelist.users/groups)",
            ))  # fmt: skip
        if self.wl_exe and is_whitelisted_exe(p, self.wl_exe):
            return self._once(("wl-exe", p.exe), lambda: Verdict(
                ProcClass.WHITELISTED, "whitelist.exe", f"executable {p.exe} is whitelisted"
            ))  # fmt: skip
        # A session left inside the cgroup of a job that ended belonged to that job:
        # pam_slurm_adopt put it there, so it goes with the job rather than with sshd.
        if wl.sshd and member is None:
            anc = self.sshd_ancestor(p.pid)
            if anc is not None:
                a = self.procs[anc]
                return self._once(("sshd", anc), lambda: Verdict(
                    ProcClass.WHITELISTED,
                    "whitelist.sshd",
                    f"in an ssh session under root sshd pid {anc} ({a.exe})",
                    decider=anc,
                    evidence=(f"ancestor {anc} exe={a.exe} uid=0 comm={a.comm!r}",),
                ))  # fmt: skip
        return None

    def _stray(self, p: Proc, member: Membership | None) -> Verdict:
        if member is not None:
            job_id = self.jobs.canonical(member.job_id)
            return self._once(("ended", id(member)), lambda: Verdict(
                ProcClass.STRAY,
                "stray.ended_job",
                f"sits in the cgroup of job {job_id}, which is not running",
                job_id=job_id,
                evidence=self._job_evidence(member),
            ))  # fmt: skip
        return _STRAY


def ancestry(pid: int, procs: Mapping[int, Proc], limit: int = 64) -> list[Proc]:
    """pid and its ancestors, nearest first (for explain)."""
    out: list[Proc] = []
    seen: set[int] = set()
    cur = pid
    while cur in procs and cur not in seen and len(out) < limit:
        seen.add(cur)
        out.append(procs[cur])
        cur = procs[cur].ppid
    return out
