"""The JobSource protocol and the merge of several sources into one view of the node's jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pruned.model import Job, JobView, Membership


class JobSource(Protocol):
    """Anything that can tell which jobs this node has."""

    name: str

    def read(self) -> JobView: ...


def read_jobs(sources: Sequence[JobSource]) -> JobView:
    """Read every source and merge; a source that raises or reports problems taints the view.

    Jobs are keyed by job id. The same id from two sources is one job when the uids agree
    (a running copy wins over a stale one, then the earlier source). When the uids differ
    (a gLExec pool account mapped to a pilot's job) both are kept, the later one under the
    key "<job_id>@<source>" with the same Job.job_id. Membership: the earlier source wins.
    """
    if len(sources) == 1:
        return _only(sources[0])
    jobs: dict[str, Job] = {}
    membership: dict[int, Membership] = {}
    aliases: dict[str, str] = {}
    problems: list[str] = []
    names: list[str] = []
    for src in sources:
        name = getattr(src, "name", type(src).__name__)
        names.append(name)
        try:
            view = src.read()
        except Exception as e:  # one broken source must not hide the others' findings
            problems.append(f"{name}: job source failed: {type(e).__name__}: {e}")
            continue
        problems += [p if p.startswith(f"{name}: ") else f"{name}: {p}" for p in view.problems]
        for key, job in view.jobs.items():
            old = jobs.get(key)
            if old is None:
                jobs[key] = job
            elif old.uid == job.uid or old.uid is None or job.uid is None:
                if job.running and not old.running:
                    jobs[key] = job
            else:
                jobs[f"{key}@{name}"] = job
        for pid, m in view.membership.items():
            membership.setdefault(pid, m)
        for name_, job_id in view.aliases.items():  # SLUID -> job id: the event path needs it
            aliases.setdefault(name_, job_id)
    return JobView(
        jobs=jobs,
        membership=membership,
        problems=tuple(problems),
        sources=tuple(names),
        aliases=aliases,
    )


def _only(src: JobSource) -> JobView:
    """read_jobs of one source: nothing to merge, so its view as it is (no copy of thousands
    of state-dir records every refresh), with its problems named as the merge names them."""
    name = getattr(src, "name", type(src).__name__)
    try:
        view = src.read()
    except Exception as e:  # as in the merge: a failed source is a problem, not a crash
        return JobView({}, {}, (f"{name}: job source failed: {type(e).__name__}: {e}",), (name,))
    problems = tuple(p if p.startswith(f"{name}: ") else f"{name}: {p}" for p in view.problems)
    return JobView(view.jobs, view.membership, problems, (name,), view.aliases)
