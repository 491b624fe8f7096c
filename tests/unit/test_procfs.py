"""Pure parsing of /proc files, and snapshot() over a crafted fake /proc tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruned.linux.procfs import PF_KTHREAD, parse_cgroup, parse_stat, parse_status, snapshot

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
    threads: int = 1,
) -> str:
    """A /proc/PID/stat line shaped like the kernel's (52 fields)."""
    after = [state, ppid, pgrp, session, 0, -1, flags, 100, 0, 0, 0, 1, 2, 0, 0, 20, 0, threads, 0]
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
    # The leader ended with SYS_exit, another thread runs on: alive, as ps's "Zl" says.
    ("zombie-leader", stat_text(state="Z", threads=2), ("sleep", "Zl", 1, 42, 42, 123456, False)),
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
def test_parse_status(text: str, want: tuple[int, int]) -> None:
    assert parse_status(text)[1:] == want


def test_parse_status_state() -> None:
    text = STATUS + "Uid:\t1007\t1007\t1007\t1007\n"
    assert parse_status(text) == ("S", 1007, 1007)
    assert parse_status(text.replace("S (sleeping)", "Z (zombie)")).state == "Z"
    assert parse_status("Uid:\t0\t0\t0\t0\n").state == ""  # no State: line before Uid:


@pytest.mark.parametrize("text", ["", STATUS, "Uid:\t1007\n", "Uid:\tx\ty\n", "Uids:\t1\t1\n"])
def test_parse_status_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="Uid"):
        parse_status(text)


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

def test_snapshot_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        snapshot(str(tmp_path / "nope"))
