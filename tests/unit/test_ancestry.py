"""pruned.ancestry: the event path's records of live processes, linked by (pid, starttime)."""

from __future__ import annotations

from pruned.ancestry import Ancestry
from pruned.model import Proc, Snapshot

DAEMONS = frozenset({"/usr/sbin/slurmstepd"})


def proc(pid: int, ppid: int, uid: int = 30001, start: int = 100, exe: str | None = None,
         exact: bool = False, state: str = "S") -> Proc:
    return Proc(pid, start, ppid, uid, "x", state, euid=uid if exact else None,
                uid_exact=exact, exe=exe)


def stepd(pid: int = 10, start: int = 50) -> Proc:
    return proc(pid, 1, uid=0, start=start, exe="/usr/sbin/slurmstepd", exact=True)


def init() -> Proc:
    return proc(1, 0, uid=0, start=1, exe="/sbin/init", exact=True)


def test_chain_to_a_genuine_daemon_in_one_batch_or_over_several() -> None:
    a = Ancestry()
    a.put({1: init(), 10: stepd(), 20: proc(20, 10)}, 1.0)  # one batch: linked to each other
    child = proc(30, 20, start=200)
    a.put({30: child}, 2.0)  # a later batch links to what is held
    assert a.daemon_above(child, DAEMONS) is True
    # The same chain under init only: no daemon, and the walk ends at pid 0.
    lone = proc(40, 1, start=300)
    a.put({40: lone}, 3.0)
    assert a.daemon_above(lone, DAEMONS) is False


def test_a_daemon_by_name_or_uid_alone_is_not_one() -> None:
    a = Ancestry()
    fake = proc(10, 1, uid=30001, exe="/usr/sbin/slurmstepd")  # a user's copy of the binary
    inexact = proc(11, 1, uid=0, exe="/usr/sbin/slurmstepd", exact=False)  # status unread
    zombie = proc(12, 1, uid=0, exe="/usr/sbin/slurmstepd", exact=True, state="Z")
    a.put({1: init(), 10: fake, 11: inexact, 12: zombie}, 1.0)
    for parent in (10, 11, 12):
        child = proc(100 + parent, parent, start=500)
        a.put({child.pid: child}, 2.0)
        assert a.daemon_above(child, DAEMONS) is False, parent


def test_unknown_links_and_reused_pids_say_unknown() -> None:
    a = Ancestry()
    orphan = proc(30, 20, start=200)  # its parent was never read
    a.put({30: orphan}, 1.0)
    assert a.daemon_above(orphan, DAEMONS) is None
    # The parent is read only later: the child's link stays unknown (read before it).
    a.put({1: init(), 10: stepd(), 20: proc(20, 10)}, 2.0)
    grandchild = proc(31, 30, start=300)
    a.put({31: grandchild}, 3.0)
    assert a.daemon_above(grandchild, DAEMONS) is None
    # A parent that exits and whose pid is reused by a genuine daemon: the child linked to
    # the old (pid, starttime), so the new daemon never vouches for it.
    a = Ancestry()
    a.put({1: init(), 20: proc(20, 1, start=150), 30: proc(30, 20, start=200)}, 1.0)
    a.drop([20])
    a.put({20: stepd(20, start=400)}, 2.0)
    child = proc(31, 30, start=500)
    a.put({31: child}, 3.0)
    assert a.daemon_above(child, DAEMONS) is None


def test_memo_gives_the_walk_s_answer() -> None:
    a = Ancestry()
    a.put({1: init(), 10: stepd(), 20: proc(20, 10), 21: proc(21, 1)}, 1.0)
    memo: dict[tuple[int, int], bool | None] = {}
    kids = [proc(100 + i, 20 if i % 2 else 21, start=600 + i) for i in range(6)]
    a.put({k.pid: k for k in kids}, 2.0)
    got = [a.daemon_above(k, DAEMONS, memo) for k in kids]
    assert got == [a.daemon_above(k, DAEMONS) for k in kids] == [False, True] * 3


def test_prune_keeps_what_the_snapshot_shows_and_what_came_after() -> None:
    a = Ancestry()
    a.put({1: init(), 20: proc(20, 1, start=150), 30: proc(30, 1, start=160)}, 1.0)
    a.put({40: proc(40, 1, start=900)}, 10.0)
    snap = Snapshot(procs={1: init(), 20: proc(20, 1, start=150), 30: proc(30, 1, start=999)},
                    taken_at=5.0, boot_time=0.0, clk_tck=100)
    a.prune(snap)
    assert set(a.entries) == {1, 20, 40}  # 30 is another process now; 40 came after it
