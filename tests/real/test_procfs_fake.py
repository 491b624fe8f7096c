"""Pure parsing of /proc files, and snapshot() over a crafted fake /proc tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pruned.linux.procfs import parse_stat, snapshot
from tests.unit.test_procfs import BAD, GOOD, STATUS, stat_text

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown of fake /proc files needs root")


def make_proc(
    root: Path,
    pid: int,
    stat: str,
    *,
    owner: int,
    status_uids: tuple[int, int] | None = None,
    exe: str | None = None,
) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_bytes(stat.encode("utf-8", "surrogateescape"))
    os.chown(d / "stat", owner, -1)
    if status_uids is not None:
        r, e = status_uids
        (d / "status").write_text(f"{STATUS}Uid:\t{r}\t{e}\t{e}\t{e}\nGid:\t0\t0\t0\t0\n")
    if exe is not None:
        (d / "exe").symlink_to(exe)


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    (tmp_path / "stat").write_text("cpu  1 2 3\nbtime 1700000000\nprocesses 99\n")
    (tmp_path / "self").mkdir()  # non-numeric entries are ignored
    (tmp_path / "sys").mkdir()
    return tmp_path


@needs_root
def test_snapshot_fake_tree_every_stat_case(fake_root: Path) -> None:
    """Every table case through snapshot()'s inlined parser gives what parse_stat gives."""
    for i, (_, text, _want) in enumerate(GOOD):
        make_proc(fake_root, 1000 + i, text, owner=30000 + i)
    for i, (_, text) in enumerate(BAD):
        make_proc(fake_root, 2000 + i, text, owner=30000)
    snap = snapshot(str(fake_root))
    assert snap.boot_time == 1700000000.0
    assert snap.clk_tck == os.sysconf("SC_CLK_TCK")
    assert sorted(snap.procs) == [1000 + i for i in range(len(GOOD))]
    for i, (_, text, _want) in enumerate(GOOD):
        p, want = snap.procs[1000 + i], parse_stat(text)
        assert (p.comm, p.state, p.ppid, p.pgid, p.sid, p.starttime, p.kthread) == (
            want.comm, want.state, want.ppid, want.pgrp, want.session, want.starttime,
            want.kthread,
        )  # fmt: skip
        assert p.pid == 1000 + i
    # a kernel thread is root's whatever the file says; everyone else is the file's owner
    assert snap.procs[1008].uid == 0 and snap.procs[1008].kthread
    assert snap.procs[1000].uid == 30000 and not snap.procs[1000].uid_exact
    assert snap.unreadable == (f"stat of {len(BAD)} processes garbled: skipped",)
    assert snap.vanished == 0


@needs_root
def test_snapshot_fake_tree_uids_exe_and_vanished(fake_root: Path) -> None:
    # 10: genuine root daemon; 11: its user child; 12: grandchild; 13: setuid-root run by a
    # user (file owner root, status says real 30001); 14: non-dumpable user process (owner root)
    make_proc(fake_root, 10, stat_text(10, "slurmstepd"), owner=0, status_uids=(0, 0),
              exe="/usr/sbin/slurmstepd")  # fmt: skip
    make_proc(fake_root, 11, stat_text(11, "bash", ppid=10), owner=30001, exe="/usr/bin/bash")
    make_proc(fake_root, 12, stat_text(12, "sleep", ppid=11), owner=30001, exe="/usr/bin/sleep")
    make_proc(fake_root, 13, stat_text(13, "passwd", ppid=11), owner=0, status_uids=(30001, 0),
              exe="/usr/bin/passwd")  # fmt: skip
    make_proc(fake_root, 14, stat_text(14, "slurmstepd", ppid=12), owner=0,
              status_uids=(30001, 30001), exe="/usr/bin/python3")  # fmt: skip
    make_proc(fake_root, 15, stat_text(15, "gone"), owner=0)  # root-owned, status vanished
    (fake_root / "16").mkdir()  # listed, then gone before its stat could be opened
    make_proc(fake_root, 17, stat_text(17, "odd"), owner=0)
    (fake_root / "17" / "status").write_text("Name:\todd\n")  # no Uid: line
    snap = snapshot(str(fake_root))
    p = snap.procs
    assert sorted(p) == [10, 11, 12, 13, 14, 17]
    assert snap.vanished == 2
    # unverifiable root-owned process: uid 0 but never "exact", so never a genuine root
    assert (p[17].uid, p[17].uid_exact, p[17].exe) == (0, False, None)
    assert "status of 1 processes not readable" in " ".join(snap.unreadable)
    assert (p[10].uid, p[10].euid, p[10].uid_exact, p[10].exe) == (
        0,
        0,
        True,
        "/usr/sbin/slurmstepd",
    )
    assert (p[11].uid, p[11].uid_exact, p[11].exe) == (30001, False, "/usr/bin/bash")  # root parent
    assert (p[12].uid, p[12].exe) == (30001, None)  # user parent: exe not read
    assert (p[13].uid, p[13].euid, p[13].uid_exact, p[13].exe) == (
        30001,
        0,
        True,
        "/usr/bin/passwd",
    )
    assert (p[14].uid, p[14].euid, p[14].uid_exact) == (30001, 30001, True)
    assert p[14].exe == "/usr/bin/python3"  # every root-owned process gets its exe read
    assert p[11].cgroups == () and p[11].starttime == 123456

    every = snapshot(str(fake_root), exe_all=True).procs
    assert every[12].exe == "/usr/bin/sleep"
    assert every[10].exe == "/usr/sbin/slurmstepd"


