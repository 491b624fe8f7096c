"""Per-process bookkeeping while a tree is being killed: signals sent, exit time, failure."""

from __future__ import annotations

from dataclasses import dataclass, field

from pruned.linux.pidfd import wait_exits
from pruned.model import ProcKey


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
