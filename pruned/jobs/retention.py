"""Bounded state: the daemon forgets jobs that ended more than jobs.keep_ended ago.

Both stores pruned keeps per job are pruned together: the history (pruned.jobs.history) and
the `jobs/<id>.json` records the prolog and epilog write (pruned.jobs.statedir; the epilog
writes one on every node, whatever jobs.sources says). A prune walks every record, so it is
rate-limited: at most once per PRUNE_EVERY, unless the history has doubled (plus
GROWTH_SLACK) since the last one, so a burst of short jobs cannot outgrow it for an hour.
"""

from __future__ import annotations

from dataclasses import dataclass

from pruned.jobs.history import JobHistory
from pruned.jobs.statedir import RecordPrune, prune_records

PRUNE_EVERY = 3600.0
GROWTH_SLACK = 1000


def cutoff(now: float, keep_ended: float) -> float:
    """Jobs that ended before this epoch time are forgotten."""
    return now - keep_ended


def expired(end: float | None, now: float, keep_ended: float) -> bool:
    """Whether a job that ended at `end` (None: has not ended) is past its retention."""
    return end is not None and end < cutoff(now, keep_ended)


def prune_due(last: float | None, size_after: int, size: int, now: float) -> bool:
    """Whether a prune is due: never done, PRUNE_EVERY since the last, or the history grew
    past twice its size after the last one (plus GROWTH_SLACK). A clock that went back
    counts as due: the interval cannot be trusted."""
    if last is None or not 0 <= now - last < PRUNE_EVERY:
        return True
    return size > 2 * size_after + GROWTH_SLACK


@dataclass(frozen=True, slots=True)
class PruneReport:
    history: int  # history entries forgotten
    records: RecordPrune

    def summary(self) -> str:
        r = self.records
        return (
            f"forgot {self.history} ended jobs from the history, removed {len(r.removed)} "
            f"job records and {r.tmp_removed} stale tmp files; kept {r.kept_running} running "
            f"and {r.kept_young} recently ended records, {len(r.problems)} problem(s)"
        )


def housekeep(
    history: JobHistory, state_dir: str, now: float, keep_ended: float
) -> PruneReport | None:
    """Prune the history and the state dir when due (see prune_due); None when not due.

    The history is changed in memory only: the caller saves it as after any refresh.
    """
    if not prune_due(history.pruned_at, history.size_after_prune, len(history), now):
        return None
    older_than = cutoff(now, keep_ended)
    forgot = history.prune(older_than)
    history.remove_stale_tmp()
    records = prune_records(state_dir, older_than, now)
    history.pruned_at = now
    history.size_after_prune = len(history)
    return PruneReport(forgot, records)
