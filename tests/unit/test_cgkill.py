"""The confined kill's pure helpers: where a member's children are born, which tree a
process born inside belongs to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pruned.act.cgkill import born_where, owner_tree, v2_path
from pruned.linux.procfs import StatFields


def st(ppid: int, session: int = 0, pgrp: int = 0) -> StatFields:
    return StatFields("x", "S", ppid, pgrp, session, 0, 100)


def test_v2_path_takes_the_unified_line_only() -> None:
    assert v2_path(("12:freezer:/", "0::/user.slice/user-1000.slice/session-3.scope")) == (
        "/user.slice/user-1000.slice/session-3.scope"
    )
    assert v2_path(("12:freezer:/slurm/uid_1/job_2",)) is None


def test_owner_tree_nearest_member_ancestor_then_session_then_first() -> None:
    members = {10: 0, 20: 1}
    table = {31: st(30), 30: st(20), 40: st(1, session=20), 50: st(1, session=99)}
    assert owner_tree(30, table, members) == 1  # child of a member
    assert owner_tree(31, table, members) == 1  # grandchild, through a joined parent
    assert owner_tree(40, table, members) == 1  # reparented, in a member-led session
    assert owner_tree(50, table, members) == 0  # nothing leads back: the first tree


def _cg(path: Path, pids: list[int], uid: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    procs = path / "cgroup.procs"
    procs.write_text("".join(f"{p}\n" for p in pids))
    os.chown(procs, uid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_born_where_root_owned_is_the_cgroup_itself(tmp_path: Path) -> None:
    _cg(tmp_path, [1])
    _cg(tmp_path / "session.scope", [100, 101])
    _cg(tmp_path / "session.scope" / "child", [102])
    assert born_where(str(tmp_path), "/session.scope") == [100, 101]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_born_where_delegated_is_the_whole_delegated_subtree(tmp_path: Path) -> None:
    """A user may move its processes anywhere under the delegation's top: all of it counts."""
    _cg(tmp_path, [1])
    _cg(tmp_path / "user@1000.service", [200], uid=1000)
    _cg(tmp_path / "user@1000.service" / "app.slice", [], uid=1000)
    _cg(tmp_path / "user@1000.service" / "app.slice" / "a.scope", [201], uid=1000)
    _cg(tmp_path / "user@1000.service" / "b.scope", [202], uid=1000)
    _cg(tmp_path / "other.scope", [300])
    got = born_where(str(tmp_path), "/user@1000.service/app.slice/a.scope")
    assert sorted(got or []) == [200, 201, 202]


def test_born_where_unreadable_or_outside_means_walk(tmp_path: Path) -> None:
    assert born_where(str(tmp_path), "/gone.scope") is None
    assert born_where(str(tmp_path), "/../../etc") is None


def test_v2_only_lines_are_read_once_per_cgroup(tmp_path: Path) -> None:
    """On a v2-only node a member's one cgroup line is its cgroup's: the first member's read
    serves every pid that cgroup lists; a hybrid node's lines are read for each pid."""
    from types import SimpleNamespace

    from pruned.act.cgkill import _Confinement
    from pruned.act.tree import Tree
    from pruned.model import ProcKey

    proc, cg = tmp_path / "proc", tmp_path / "cg"
    line = "0::/user.slice/session-1.scope\n"
    for pid in (os.getpid(), 100, 101, 102):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(line)
    (cg / "user.slice" / "session-1.scope").mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("")
    (cg / "user.slice" / "session-1.scope" / "cgroup.procs").write_text("100\n101\n102\n")
    q = SimpleNamespace(dir=str(cg / "pruned_quarantine_1"), v1=False)
    tree = Tree(ProcKey(100, 1), 1000, str(proc))
    c = _Confinement([tree], q, frozenset(), str(cg), [])  # type: ignore[arg-type]
    assert c.v2_only
    assert c.lines_of(100) == (line.strip(),)
    (proc / "101" / "cgroup").unlink()  # no second read: the cgroup's listing answered it
    assert c.lines_of(101) == (line.strip(),)
    (proc / str(os.getpid()) / "cgroup").write_text("12:freezer:/\n" + line)
    hybrid = _Confinement([tree], q, frozenset(), str(cg), [])  # type: ignore[arg-type]
    assert not hybrid.v2_only and hybrid.lines_of(101) == ()  # read (and gone) each time
