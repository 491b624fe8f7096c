"""Steady-state verdicts (pruned.rules.steady) on real processes: between full reads a
sweep keeps the verdicts of processes nothing happened to, and still sees the changes that
come with no event of the process's own: its job ending, and its coming of age.

Incremental sweeps fed by the real proc connector (tests/real/test_proccache_real's
fixtures); processes run as fixture users or as root copies of sleep, and are killed by pid.
No test asserts a time; waits only bound how long the kernel may take.
"""

from __future__ import annotations

import os
import time

import pytest

from pruned.model import Action, HeldBy, JobView, Policy, ProcClass
from pruned.policy.facts import resolve_facts
from pruned.sweep import observe
from tests.real.test_jobs_cgroup import (  # noqa: F401
    CG,
    V1_CTRLS,
    Cgroups,
    _source,
    bins,
    running_v1_job,
)
from tests.real.test_proccache_real import Watched, wait_until, watched  # noqa: F401

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (connector, users, cgroups)"),
]


class NoJobs:
    """A job source that sees no job and no problem: every user process is a stray."""

    name = "none"

    def read(self) -> JobView:
        return JobView(jobs={}, membership={})


def _decision(obs, pid: int):
    return next(d for d in obs.plan.decisions if d.proc.pid == pid)


def test_a_job_that_ends_makes_its_unchanged_process_a_stray(
    watched: Watched, user_a, bins  # noqa: F811
) -> None:
    """A job's process keeps its verdict (the same object) from sweep to sweep; when the
    job's slurmstepd exits, the process had no event, yet the next incremental sweep calls
    it a stray of the ended job."""
    cg = Cgroups()
    try:
        job, stepd, at = running_v1_job(cg, bins, user_a.uid)
        task = cg.start(["sleep", "611"], user_a)
        cg.put(task, at("freezer", "step_batch"), at("cpuset", "step_batch"))
        policy = Policy(batch_daemons=(bins["stepd"],))
        facts = resolve_facts(policy)
        sources = [_source(bins, cgroup_root=CG)]

        def sweep():
            return observe(policy, facts, sources=sources, cache=watched.cache)

        sweep()  # founds the cache
        first, second = sweep(), sweep()
        if watched.cache.last.full:
            pytest.skip("events were lost meanwhile (a busy machine): no incremental sweep")
        assert first.verdicts[task].cls is ProcClass.BATCH
        assert second.verdicts[task] is first.verdicts[task]  # carried, not judged again
        assert _decision(second, task) is _decision(first, task)

        stepd_proc = next(p for p in cg.procs if p.pid == stepd)
        stepd_proc.kill()
        stepd_proc.wait(10)
        assert wait_until(lambda: not os.path.exists(f"/proc/{stepd}"))
        after = sweep()
        assert not watched.cache.last.full, watched.cache.last
        v = after.verdicts[task]
        assert (v.cls, v.rule, v.job_id) == (ProcClass.STRAY, "stray.ended_job", job), v.reason
        assert _decision(after, task).action is Action.KILL  # would: observe acts on nothing
    finally:
        cg.cleanup()


def test_a_young_stray_comes_of_age_without_an_event(
    watched: Watched, user_a  # noqa: F811
) -> None:
    """min_age is time: a stray held as too young is actionable once old enough, though
    nothing happened to it (its record and verdict are kept by every sweep in between)."""
    cg = Cgroups()
    min_age = 3.0
    policy = Policy(min_age=min_age)
    facts = resolve_facts(policy)

    def sweep():  # scoped: other users' strays on a shared machine must not trip the brake
        return observe(policy, facts, sources=[NoJobs()], cache=watched.cache,
                       uids={user_a.uid})

    try:
        sweep()  # founds the cache
        t0 = time.monotonic()
        stray = cg.start(["sleep", "613"], user_a)
        young = sweep()
        if time.monotonic() - t0 >= min_age:
            pytest.skip("the machine took longer than min_age to start and read one process")
        d = _decision(young, stray)
        assert d.verdict.cls is ProcClass.STRAY
        assert (d.action, d.held_by) == (Action.KILL, HeldBy.YOUNG), d.held
        seen = []

        def grown() -> bool:
            obs = sweep()
            seen.append((watched.cache.last, obs.verdicts[stray] is d.verdict))
            g = _decision(obs, stray)
            return g.action is Action.KILL and g.held is None

        assert wait_until(grown, timeout=min_age + 30)
        read, carried = seen[-1]
        if read.full:
            pytest.skip("events were lost meanwhile (a busy machine): no incremental sweep")
        assert carried  # the verdict was kept: the decision alone was made again
    finally:
        cg.cleanup()
