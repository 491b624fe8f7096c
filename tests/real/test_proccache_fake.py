"""The steady-state sweep cache (pruned.linux.proccache) over a crafted fake /proc tree.

A fake tree lets a test change a process "behind the cache's back" (rewrite its stat file
without a mark) and so prove what is and is not re-read: an unmarked change of an ordinary
process stays unseen until something marks it or a full read comes, and everything the
module promises to re-read is re-read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pruned.linux.proccache import ProcCache
from tests.unit.test_procfs import STATUS, stat_text

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown of fake /proc files needs root")

USER, OTHER = 30501, 30502


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def put(root: Path, pid: int, *, ppid: int = 1, owner: int = USER, comm: str = "sleep",
        start: int = 5000, state: str = "S", status: tuple[int, int] | None = None,
        exe: str | None = None) -> None:  # fmt: skip
    """Create or rewrite root/PID as a process (status/exe only when given)."""
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    (d / "stat").write_text(stat_text(pid, comm, state, ppid, pid, pid, starttime=start))
    os.chown(d / "stat", owner, -1)
    if status is not None:
        r, e = status
        (d / "status").write_text(f"{STATUS}Uid:\t{r}\t{e}\t{e}\t{e}\n")
    if exe is not None:
        if (d / "exe").is_symlink():
            (d / "exe").unlink()
        (d / "exe").symlink_to(exe)


def gone(root: Path, pid: int) -> None:
    for f in (root / str(pid)).iterdir():
        f.unlink()
    (root / str(pid)).rmdir()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    (tmp_path / "self").mkdir()
    put(tmp_path, 1, ppid=0, owner=0, comm="init", status=(0, 0), exe="/sbin/init")
    for pid in (100, 101, 102):
        put(tmp_path, pid)
    return tmp_path


def warm(root: Path, full_every: float = 600.0) -> tuple[ProcCache, Clock]:
    clock = Clock()
    cache = ProcCache(full_every, clock)
    cache.attach()
    cache.snapshot(str(root))
    assert cache.last is not None and cache.last.full and cache.last.why == "events started"
    return cache, clock


def test_an_unmarked_change_is_not_read_and_a_marked_one_is(root: Path) -> None:
    cache, _ = warm(root)
    put(root, 100, comm="renamed", owner=OTHER)
    put(root, 101, comm="execd", owner=OTHER)
    cache.mark({101}, set())
    snap = cache.snapshot(str(root))
    assert cache.last is not None and not cache.last.full
    # pid 1 (root-owned: always re-read) and the marked 101; 100 and 102 kept as they were
    assert (cache.last.reread, cache.last.kept) == (2, 2)
    assert (snap.procs[100].comm, snap.procs[100].uid) == ("sleep", USER)  # not re-read
    assert (snap.procs[101].comm, snap.procs[101].uid) == ("execd", OTHER)
    # a full read (here: forced by the interval) sees everything
    cache.full_every = 0
    snap = cache.snapshot(str(root))
    assert cache.last.full and cache.last.why == "full_sweep interval"
    assert (snap.procs[100].comm, snap.procs[100].uid) == ("renamed", OTHER)


def test_new_pids_are_read_and_vanished_ones_dropped_without_marks(root: Path) -> None:
    cache, _ = warm(root)
    put(root, 200, ppid=100)
    gone(root, 102)
    snap = cache.snapshot(str(root))
    assert not cache.last.full
    assert 200 in snap.procs and snap.procs[200].ppid == 100
    assert 102 not in snap.procs


def test_pid_reuse_exit_then_fork_is_a_new_process(root: Path) -> None:
    cache, _ = warm(root)
    put(root, 101, start=9999, owner=OTHER, comm="reused")
    cache.mark({101}, {101})  # the batcher's view of "exit of 101, fork of a new 101"
    snap = cache.snapshot(str(root))
    p = snap.procs[101]
    assert (p.starttime, p.uid, p.comm) == (9999, OTHER, "reused")


def test_exit_of_a_parent_rereads_its_children(root: Path) -> None:
    put(root, 300, ppid=100)
    put(root, 301, ppid=300)
    cache, _ = warm(root)
    gone(root, 100)
    put(root, 300, ppid=1)  # reparented to init: no event of its own
    cache.mark(set(), {100})
    snap = cache.snapshot(str(root))
    assert 100 not in snap.procs
    assert snap.procs[300].ppid == 1
    assert snap.procs[301].ppid == 300  # a grandchild keeps its parent


def test_a_child_read_before_its_reparenting_is_read_again_next_sweep(root: Path) -> None:
    put(root, 300, ppid=100)
    cache, _ = warm(root)
    put(root, 100, state="Z")  # the parent exited; the kernel has not reparented 300 yet
    cache.mark(set(), {100})
    snap = cache.snapshot(str(root))
    assert snap.procs[300].ppid == 100
    gone(root, 100)
    put(root, 300, ppid=1)  # now it is, still without an event
    snap = cache.snapshot(str(root))
    assert not cache.last.full
    assert snap.procs[300].ppid == 1


def test_root_owned_processes_are_reread_every_sweep(root: Path) -> None:
    put(root, 400, owner=0, status=(0, 0), exe="/usr/sbin/slurmstepd", comm="slurmstepd")
    put(root, 401, ppid=400, exe="/usr/bin/bash", comm="bash")
    cache, _ = warm(root)
    snap = cache.snapshot(str(root))
    assert snap.procs[401].exe == "/usr/bin/bash"  # the exe pass: a root-owned parent
    # the daemon drops to a user's uid without an event reaching us (say the stream was
    # not trusted for it): re-read anyway, and its children lose the root-parent exe read
    put(root, 400, owner=USER, status=None, exe="/usr/sbin/slurmstepd")
    (root / "400" / "status").unlink()
    snap = cache.snapshot(str(root))
    assert not cache.last.full
    assert (snap.procs[400].uid, snap.procs[400].uid_exact) == (USER, False)
    assert snap.procs[401].exe is None  # re-read with its parent no longer root-owned


def test_a_process_becoming_root_owned_gets_its_childrens_exe_read(root: Path) -> None:
    put(root, 500, exe="/usr/bin/sudo")
    put(root, 501, ppid=500, exe="/usr/bin/bash")
    cache, _ = warm(root)
    assert cache.snapshot(str(root)).procs[501].exe is None
    put(root, 500, owner=0, status=(USER, 0))  # exec of a setuid-root binary: marked
    cache.mark({500}, set())
    snap = cache.snapshot(str(root))
    assert (snap.procs[500].uid, snap.procs[500].euid, snap.procs[500].uid_exact) == (
        USER, 0, True)  # fmt: skip
    assert snap.procs[501].exe == "/usr/bin/bash"


@pytest.mark.parametrize("how", ["lost", "detach", "exe_all", "interval", "reattach"])
def test_every_reason_to_distrust_the_cache_gives_a_full_read(root: Path, how: str) -> None:
    cache, clock = warm(root)
    put(root, 100, comm="changed")
    exe_all = False
    if how == "lost":
        cache.lost("ENOBUFS")
    elif how == "detach":
        cache.detach()
    elif how == "exe_all":
        exe_all = True
    elif how == "interval":
        clock.t += 600
    elif how == "reattach":
        cache.attach()
    snap = cache.snapshot(str(root), exe_all=exe_all)
    assert cache.last.full, how
    assert snap.procs[100].comm == "changed"
    if how == "detach":  # nothing kept, and the next sweep is full again
        assert cache._procs is None
        cache.snapshot(str(root))
        assert cache.last.full and cache.last.why == "events off"
    else:  # the full read founds a new cache
        cache.snapshot(str(root), exe_all=exe_all)
        assert not cache.last.full


def test_a_loss_during_a_full_read_leaves_no_cache_to_build_on(root: Path, monkeypatch) -> None:
    cache, _ = warm(root)
    cache.lost("gap")
    from pruned.linux import procfs

    real = procfs.snapshot

    def losing(*a, **kw):
        snap = real(*a, **kw)
        cache.lost("gap during the read")
        return snap

    monkeypatch.setattr(procfs, "snapshot", losing)
    cache.snapshot(str(root))
    assert cache.last.full
    monkeypatch.setattr(procfs, "snapshot", real)
    cache.snapshot(str(root))
    assert cache.last.full and "gap during the read" in cache.last.why


def test_marks_during_a_sweep_are_kept_for_the_next(root: Path, monkeypatch) -> None:
    cache, _ = warm(root)
    from pruned.linux import procfs

    real = procfs.read_some

    def marking(*a, **kw):
        out = real(*a, **kw)
        put(root, 102, comm="late")
        cache.mark({102}, set())  # came in while this sweep ran: not yet seen
        return out

    monkeypatch.setattr(procfs, "read_some", marking)
    snap = cache.snapshot(str(root))
    assert snap.procs[102].comm == "sleep"
    monkeypatch.setattr(procfs, "read_some", real)
    snap = cache.snapshot(str(root))
    assert snap.procs[102].comm == "late"


def test_without_events_every_sweep_is_full_and_nothing_is_kept(root: Path) -> None:
    cache = ProcCache(600.0)
    for _ in range(2):
        cache.snapshot(str(root))
        assert cache.last.full and cache.last.why in ("first sweep", "events off")
    assert cache._procs is None
