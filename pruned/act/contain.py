"""Containment: a tree moved into a quarantine cgroup of pruned's own before it is signalled.

Whatever a contained process forks, double-forks or setsids afterwards is born inside the
quarantine (cgroup membership is inherited and only root can move a process out of a
root-owned cgroup), so the kill's end-game cannot miss it: freeze, verify every member is
the tree's, SIGKILL all (v2 also `cgroup.kill`), thaw, wait until it is empty. Processes
that sit in a Slurm job's cgroup or in another user's slice are never moved.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Sequence

from pruned.act.track import Track, track_exits
from pruned.act.tree import Tree, expand
from pruned.jobs.slurmpath import job_ids_in
from pruned.linux.cgroupfs import Quarantine, subdirs
from pruned.linux.pidfd import live_stat, send_signal
from pruned.linux.procfs import StatFields, read_cgroup_lines, read_real_uid, read_stat
from pruned.model import ProcKey, Result

FREEZE_WAIT = 1.0  # seconds to wait for a quarantine cgroup to report frozen
_QUARANTINE_PREFIX = "pruned_quarantine_"  # + "<pid of the pruned that made it>_<hex>"
_USER_SLICE = re.compile(r"/user-(\d+)\.slice(?:/|$)")


def why_not_movable(pid: int, uid: int | None, proc_root: str) -> str | None:
    """Why pid must stay in its cgroup (a job's, or another user's slice), or None."""
    return why_lines_stay(read_cgroup_lines(pid, proc_root), uid)


def why_lines_stay(lines: Sequence[str], uid: int | None) -> str | None:
    """why_not_movable of a process whose /proc/PID/cgroup lines are `lines`."""
    if job_ids_in(lines):
        return "in a Slurm job's cgroup"
    for line in lines:
        for m in _USER_SLICE.finditer(line):
            if uid is None or int(m[1]) != uid:
                return f"in another user's slice ({line})"
    return None


def move_members(tree: Tree, q: Quarantine, errors: list[str], kept: dict[ProcKey, str]) -> int:
    """Move every member of `tree` not yet inside `q` into it; how many moved.

    Members that must stay where they are go into `kept` (key -> why), once, and are left to
    the re-walk. The starttime is checked right before and after each write: a pid reused
    in between is moved straight back out.
    """
    proc_root = tree.proc_root
    inside = q.procs()
    moved = 0
    for key in list(tree.fds):
        if key.pid in inside or key in kept:
            continue
        if live_stat(key, proc_root) is None:  # pidfd pins it; re-check right before
            continue
        why = why_not_movable(key.pid, tree.uid, proc_root)
        if why is not None:
            kept[key] = why
            continue
        if q.move(key.pid):
            moved += 1
        after = read_stat(key.pid, proc_root)
        if after is not None and after.starttime != key.starttime:
            # Reused between the check and the write: give the stranger back.
            q.move(key.pid, into=False)
            errors.append(f"pid {key.pid} was reused during the move; moved back out")
    return moved


def contain(
    tree: Tree,
    q: Quarantine,
    protected: frozenset[int],
    deadline: float,
    errors: list[str],
    kept: dict[ProcKey, str],
    walked: bool = False,
) -> None:
    """Walk and move until a full pass finds nothing new outside the quarantine.

    `walked`: the caller's own re-walk (expand until a pass found nothing new) has just
    ended, so the members are moved first: when nothing needs moving that walk was the
    last pass. Each walk reads the whole process table and comes before the first signal;
    one fewer is ~1/3 of a kill's latency on a node with thousands of processes."""
    if walked and (not move_members(tree, q, errors, kept) or time.monotonic() > deadline):
        return
    for _ in range(1000):
        expand([tree], tree.proc_root, protected, on_new=(signal.SIGSTOP,), deadline=deadline,
               rounds=1)  # fmt: skip
        if not move_members(tree, q, errors, kept) or time.monotonic() > deadline:
            break


def belongs(pid: int, tree: Tree, table: dict[int, StatFields], protected: frozenset[int]) -> bool:
    """Is a quarantined pid the tree's? Only pruned writes the quarantine's root-owned
    cgroup.procs, and every write is checked against the starttime before and after (a
    reused pid is moved straight back out), so what is inside was moved there as a member
    or was born inside of one: even reparented to init and in a session of its own. It
    must still be of the tree's real uid: a setuid child is not killed as the user's."""
    st = table.get(pid)
    if st is None or pid in protected or st.kthread:
        return False
    return read_real_uid(pid, tree.proc_root) == tree.uid


def end_game(
    tree: Tree,
    q: Quarantine,
    track: dict[ProcKey, Track],
    t0: float,
    deadline: float,
    protected: frozenset[int],
    proc_root: str,
    errors: list[str],
) -> int:
    """Move the tree into `q` until a pass finds nothing new, freeze, SIGKILL all, thaw, wait.

    Returns how many processes were found inside that were not members yet (they joined
    the tree after the last walk: forked, double-forked or setsid'ed during the kill)."""
    kept: dict[ProcKey, str] = {}

    def move() -> int:
        return move_members(tree, q, errors, kept)

    # Move until a full pass (walk + move) finds nothing new outside.
    for _ in range(1000):
        expand([tree], proc_root, protected, deadline=deadline, rounds=1)
        if not move() or time.monotonic() > deadline:
            break
    # Bounded: a v2 cgroup may never report "frozen 1" while tasks churn in fork/exit;
    # SIGKILL and cgroup.kill work on a freezing cgroup anyway.
    froze = q.freeze(True, min(deadline, time.monotonic() + FREEZE_WAIT))
    # Frozen: nothing inside forks. Catch stragglers outside (they freeze on attach).
    for _ in range(100):
        expand([tree], proc_root, protected, deadline=deadline, rounds=1)
        if not move() or time.monotonic() > deadline:
            break
    inside = q.procs()
    # Only the quarantined pids are looked up: read just those, not the whole table.
    table = {pid: st for pid in inside if (st := read_stat(pid, proc_root)) is not None}
    joined = 0
    for pid in sorted(inside):
        if not belongs(pid, tree, table, protected):
            q.move(pid, into=False)
            errors.append(f"pid {pid} in the quarantine is not the tree's; moved back out")
            continue
        key = ProcKey(pid, table[pid].starttime)
        if key not in tree.seen:
            joined += 1
        tree.add(key, late=True)
    # Kill everything we own, frozen or not (a pending SIGKILL fires on thaw).
    for key, fd in tree.fds.items():
        t = track.setdefault(key, Track())
        err = send_signal(fd, signal.SIGKILL)
        if err is None:
            t.signals.append("SIGKILL")
        elif err == Result.GONE:
            t.exited = time.monotonic() - t0
        else:
            t.failed = err
    q.kill_all()
    q.freeze(False, deadline)
    track_exits(tree.fds, track, max(deadline, time.monotonic() + 0.5), t0)
    if not froze and q.procs():
        errors.append("quarantine did not freeze; processes left in it after SIGKILL")
    while q.procs() and time.monotonic() < deadline:
        time.sleep(0.01)
    return joined


def remove_stale_quarantines(cgroup_root: str, own: bool) -> list[str]:
    """rmdir the empty quarantine cgroups left behind; the paths removed.

    A kill whose survivor (D state) still sat in its quarantine could not remove it; once
    the survivor died the empty directory stays. Removed: those of a pruned process that is
    gone, and with `own` (the caller holds the act lock, so no kill of ours is running)
    this process's own. rmdir of a cgroup that holds a process fails (EBUSY): one still in
    use is never touched.
    """
    removed = []
    me = os.getpid()
    for base in (f"{cgroup_root}/freezer", f"{cgroup_root}/unified", cgroup_root):
        try:
            found = subdirs(base, _QUARANTINE_PREFIX)
        except OSError:  # an unreadable hierarchy: nothing to tidy there
            continue
        for suffix, path in found:
            pid_text = suffix.split("_", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == me and not own:
                continue
            if pid != me and os.path.exists(f"/proc/{pid}"):
                continue  # another pruned (an epilog, say) may be using it right now
            try:
                os.rmdir(path)
            except OSError:
                continue
            removed.append(path)
    return removed
