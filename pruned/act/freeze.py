"""The fork-bomb path: freeze a whole tree, SIGKILL everything in it, thaw, wait.

A tree that survives kill_many's SIGKILL is forking faster than it is signalled. Here it is
moved into a quarantine cgroup and frozen (pruned.linux.cgroupfs.Quarantine), or, where no
freezer is offered, held by SIGSTOP passes, so nothing it forks can escape the kill.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence

from pruned.act.contain import end_game
from pruned.act.guard import guard, protected_pids
from pruned.act.kill import KillResult, kill_result
from pruned.act.track import Track, track_exits
from pruned.act.tree import Tree, candidates, expand
from pruned.linux.cgroupfs import Quarantine, quarantine_method
from pruned.linux.pidfd import live_stat, raise_nofile, send_signal
from pruned.linux.procfs import read_stats
from pruned.model import ProcKey, Result

HARD_FACTOR = 3  # freeze_and_kill keeps trying up to this many times its timeout


def freeze_and_kill(
    root: ProcKey,
    descendants: Sequence[ProcKey],
    *,
    uid: int,
    dry_run: bool,
    timeout: float = 5.0,
    method: str = "auto",
    cgroup_root: str = "/sys/fs/cgroup",
    proc_root: str = "/proc",
) -> KillResult:
    """Fork-bomb path: freeze the whole tree, SIGKILL everything in it, thaw, wait.

    Only processes of real uid `uid` are ever moved or signalled. Preferred: move the tree
    into a fresh quarantine cgroup (children forked after the move are born inside), loop
    until a pass moves nothing new, freeze, kill, thaw, wait until it is empty, rmdir.
    Anything in the quarantine that is not verifiably the tree's is moved back out before
    the kill (a pid reused mid-move). Fallback ('sigstop'): SIGSTOP passes until one finds
    nothing new, then SIGKILL all, then SIGCONT. The caller must not pass processes of a
    running job: moving them would take them out of the job's cgroup.
    """
    guard((root, *descendants), proc_root)
    raise_nofile()
    protected = protected_pids(proc_root)
    t0 = time.monotonic()
    deadline = t0 + timeout
    if method == "auto":
        method = quarantine_method(cgroup_root)
    tree = Tree(root, uid, proc_root)
    track: dict[ProcKey, Track] = {}
    errors: list[str] = []
    try:
        for key in (root, *descendants):
            tree.add(key)
        if dry_run:
            expand([tree], proc_root, protected, rounds=3)
            return kill_result(tree, {}, t0, 0.0, dry_run=True, froze=method)
        # `timeout` is the target; a tree that outlives a round gets another, up to 3x.
        hard = t0 + HARD_FACTOR * timeout
        q = None if method == "sigstop" else Quarantine(method, cgroup_root)
        try:
            for _ in range(100):
                rd = max(deadline, time.monotonic() + 1.0)
                if q is None:
                    _sigstop_round(tree, track, t0, rd, protected, proc_root)
                else:
                    end_game(tree, q, track, t0, rd, protected, proc_root, errors)
                left = [k for k in tree.fds if live_stat(k, proc_root) is not None]
                left += [k for _, k in candidates([tree], read_stats(proc_root), protected)]
                if not left:
                    break
                if time.monotonic() > hard:
                    errors.append(
                        f"{len(left)} process(es) of the tree still alive after "
                        f"{time.monotonic() - t0:.1f}s"
                    )
                    break
        finally:
            if q is not None:
                q.freeze(False, time.monotonic() + 0.5)
                if not q.remove(max(deadline, time.monotonic() + 0.5)):
                    errors.append(f"could not remove {q.dir}: holds {sorted(q.procs())[:10]}")
        froze = "sigstop" if q is None else q.label
        return kill_result(tree, track, t0, 0.0, dry_run=False, froze=froze, errors=errors)
    finally:
        tree.close()


def _sigstop_round(
    tree: Tree,
    track: dict[ProcKey, Track],
    t0: float,
    deadline: float,
    protected: frozenset[int],
    proc_root: str,
) -> None:
    """SIGSTOP passes until one finds nothing new, then SIGKILL all, then SIGCONT all."""
    for fd in tree.fds.values():
        send_signal(fd, signal.SIGSTOP)
    expand([tree], proc_root, protected, on_new=(signal.SIGSTOP,), deadline=deadline, rounds=1000)
    for sig in (signal.SIGKILL, signal.SIGCONT):  # all stopped: kill them all, then wake them
        for key, fd in tree.fds.items():
            t = track.setdefault(key, Track())
            err = send_signal(fd, sig)
            if err is None:
                t.signals.append(signal.Signals(sig).name)
            elif err != Result.GONE:
                t.failed = err
    track_exits(tree.fds, track, max(deadline, time.monotonic() + 0.2), t0)
