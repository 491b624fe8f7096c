"""Pure parsing of /proc files, and snapshot() over a crafted fake /proc tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pruned.procfs import PF_KTHREAD, parse_cgroup, parse_stat, parse_status_uids, snapshot

U64 = 18446744073709551615


def stat_text(
    pid: int = 42,
    comm: str = "sleep",
    state: str = "S",
    ppid: int = 1,
    pgrp: int = 42,
    session: int = 42,
    flags: int = 4194304,
    starttime: int = 123456,
) -> str:
    """A /proc/PID/stat line shaped like the kernel's (52 fields)."""
    after = [state, ppid, pgrp, session, 0, -1, flags, 100, 0, 0, 0, 1, 2, 0, 0, 20, 0, 1, 0]
    after += [starttime, 3133440, 394, U64] + [0] * 29
    return f"{pid} ({comm}) " + " ".join(str(x) for x in after) + "\n"


# (id, stat text, expected (comm, state, ppid, pgrp, session, starttime, kthread))
GOOD = [
    ("plain", stat_text(), ("sleep", "S", 1, 42, 42, 123456, False)),
    ("spaces", stat_text(comm="a b  c"), ("a b  c", "S", 1, 42, 42, 123456, False)),
    ("close-paren", stat_text(comm="x) R 7 7"), ("x) R 7 7", "S", 1, 42, 42, 123456, False)),
    ("paren-pair", stat_text(comm=") ("), (") (", "S", 1, 42, 42, 123456, False)),
    ("nested", stat_text(comm="((a) (b))"), ("((a) (b))", "S", 1, 42, 42, 123456, False)),
    ("empty-comm", stat_text(comm=""), ("", "S", 1, 42, 42, 123456, False)),
    ("newline", stat_text(comm="a\nb) Z 1"), ("a\nb) Z 1", "S", 1, 42, 42, 123456, False)),
    ("unicode", stat_text(comm="café ☕"), ("café ☕", "S", 1, 42, 42, 123456, False)),
    (
        "kthread",
        stat_text(2, "kthreadd", ppid=0, pgrp=0, session=0, flags=0x00208040, starttime=24),
        ("kthreadd", "S", 0, 0, 0, 24, True),
    ),
    ("zombie", stat_text(state="Z"), ("sleep", "Z", 1, 42, 42, 123456, False)),
    (
        "idle-kworker",
        stat_text(state="I", flags=PF_KTHREAD),
        ("sleep", "I", 1, 42, 42, 123456, True),
    ),
    (
        "huge-numbers",
        stat_text(pid=4194304, ppid=4194303, pgrp=4194302, session=4194301, starttime=2**63),
        ("sleep", "S", 4194303, 4194302, 4194301, 2**63, False),
    ),
]

BAD = [
    ("empty", ""),
    ("no-parens", "42 sleep S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5"),
    ("no-close", "42 (sleep S 1 42 42"),
    ("truncated", stat_text()[:40]),
    ("cut-after-comm", "42 (sleep)"),
    ("non-numeric-ppid", stat_text().replace(" S 1 42 ", " S x 42 ", 1)),
    ("non-numeric-start", stat_text().replace(" 123456 ", " 12e4 ", 1)),
    ("close-before-open", "42 )sleep( S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 1 1"),
]


@pytest.mark.parametrize(("text", "want"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_parse_stat(text: str, want: tuple) -> None:
    got = parse_stat(text)
    assert (
        got.comm,
        got.state,
        got.ppid,
        got.pgrp,
        got.session,
        got.starttime,
        got.kthread,
    ) == want


@pytest.mark.parametrize("text", [c[1] for c in BAD], ids=[c[0] for c in BAD])
def test_parse_stat_rejects_garbled(text: str) -> None:
    with pytest.raises(ValueError, match=r"garbled|truncated"):
        parse_stat(text)


STATUS = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\nPid:\t42\nPPid:\t1\n"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (STATUS + "Uid:\t1007\t1007\t1007\t1007\nGid:\t100\t100\t100\t100\n", (1007, 1007)),
        (STATUS + "Uid:\t1007\t0\t0\t0\n", (1007, 0)),  # setuid-root program run by 1007
        ("Uid:\t0\t0\t0\t0\n", (0, 0)),  # first line
        ("Uid:\t5 6 7 8", (5, 6)),  # no trailing newline, spaces
        # The kernel escapes a comm holding "\nUid:" in Name:, so only a real line counts.
        ("Name:\tx\\nUid:\t0\t0\nUid:\t1007\t1007\t1007\t1007\n", (1007, 1007)),
    ],
)
def test_parse_status_uids(text: str, want: tuple[int, int]) -> None:
    assert parse_status_uids(text) == want


@pytest.mark.parametrize("text", ["", STATUS, "Uid:\t1007\n", "Uid:\tx\ty\n", "Uids:\t1\t1\n"])
def test_parse_status_uids_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="Uid"):
        parse_status_uids(text)


def test_parse_cgroup_v1_and_v2() -> None:
    text = (
        "12:freezer:/slurm_vm/uid_1007/job_9/step_batch\n"
        "4:memory:/process_api/0a2b\n"
        "1:name=systemd:/user.slice/a:b\n"
        "\n"
        "0::/system.slice/vm_slurmstepd.scope/job_9/step_0/user/task_0\n"
    )
    assert parse_cgroup(text) == (
        "12:freezer:/slurm_vm/uid_1007/job_9/step_batch",
        "4:memory:/process_api/0a2b",
        "1:name=systemd:/user.slice/a:b",
        "0::/system.slice/vm_slurmstepd.scope/job_9/step_0/user/task_0",
    )
    assert parse_cgroup("0::/\n") == ("0::/",)
    assert parse_cgroup("") == ()


# ---------------------------------------------------------------- fake /proc tree

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


def test_snapshot_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        snapshot(str(tmp_path / "nope"))
