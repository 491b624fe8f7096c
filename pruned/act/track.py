"""Per-process bookkeeping while a tree is being killed: signals sent, exit time, failure;
and the grace wait after SIGTERM."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from pruned.linux.cgroupfs import Quarantine
from pruned.linux.pidfd import wait_exits
from pruned.model import ProcKey

# More processes than this born in the quarantines during the grace end it: the trees fork
# instead of exiting. A SIGTERM handler that runs a cleanup command forks a few.
FORK_STORM = 16
GRACE_POLL = 0.2  # seconds between looks at the quarantines during the grace


@dataclass
class Track:
    """Mutable per-process bookkeeping during one kill."""

    signals: list[str] = field(default_factory=list)
    exited: float | None = None
    failed: str = ""


def track_exits(
    fds: dict[ProcKey, int], track: dict[ProcKey, Track], until: float, t0: float
) -> None:
    """Wait on the pidfds of live processes until all have exited or `until` passes."""
    live = {key: fd for key, fd in fds.items() if track[key].exited is None}
    for key, when in wait_exits(live, until):
        track[key].exited = when - t0


def wait_grace(
    fds: dict[ProcKey, int],
    track: dict[ProcKey, Track],
    grace: float,
    t0: float,
    quarantines: Mapping[int, Quarantine],
) -> bool:
    """The grace after SIGTERM: until every member exited or `grace` passed, or until more
    than FORK_STORM processes were born inside the quarantines meanwhile. A bash fork bomb
    at its pids limit blocks SIGTERM while it retries fork(), and would otherwise get the
    whole grace to go on forking. True when it was cut short so."""
    end = time.monotonic() + grace
    known = {k.pid for k in fds}
    while True:
        step = min(end, time.monotonic() + GRACE_POLL) if quarantines else end
        track_exits(fds, track, step, t0)
        if time.monotonic() >= end or all(t.exited is not None for t in track.values()):
            return False
        if sum(len(q.procs() - known) for q in quarantines.values()) > FORK_STORM:
            return True
