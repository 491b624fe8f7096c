"""snapshot()'s inlined stat parser against parse_stat(), over a fake /proc tree per example."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from pruned.linux.procfs import parse_stat, snapshot
from tests.fuzz._settings import fuzz
from tests.fuzz.test_proc_files import garbage_stat, stat_bytes, stat_fields

OWNER = 30000  # any non-root owner: the fast path (a root-owned stat would make it read status)


def fake_proc(root: Path, stats: list[bytes]) -> None:
    (root / "stat").write_text("cpu  1 2 3\nbtime 1700000000\nprocesses 99\n")
    (root / "self").mkdir()
    for i, data in enumerate(stats):
        d = root / str(1000 + i)
        d.mkdir()
        (d / "stat").write_bytes(data)
        if os.geteuid() == 0:
            os.chown(d / "stat", OWNER, -1)


def fits(data: bytes) -> bool:
    return len(data) <= 1024  # what snapshot() reads of a stat file (real ones are ~300 bytes)


@fuzz(0.5)
@given(st.lists(stat_fields().map(stat_bytes) | garbage_stat.filter(fits), max_size=8))
def test_snapshot_agrees_with_parse_stat(stats: list[bytes]) -> None:
    root = Path(tempfile.mkdtemp(prefix="pruned-fakeproc-"))
    try:
        fake_proc(root, stats)
        snap = snapshot(str(root))  # never raises on any stat content
    finally:
        shutil.rmtree(root)
    garbled = 0
    for i, data in enumerate(stats):
        pid = 1000 + i
        try:
            want = parse_stat(data.decode("utf-8", "surrogateescape"))
        except ValueError:
            garbled += 1
            assert pid not in snap.procs
            continue
        p = snap.procs[pid]
        # snapshot() and parse_stat both keep comm lossless (surrogateescape)
        comm = want.comm
        assert (p.comm, p.state, p.ppid, p.pgid, p.sid, p.starttime, p.kthread) == (
            comm,
            want.state,
            want.ppid,
            want.pgrp,
            want.session,
            want.starttime,
            want.kthread,
        )
        assert p.uid == (0 if want.kthread else (OWNER if os.geteuid() == 0 else os.geteuid()))
    assert sorted(snap.procs) == [1000 + i for i in range(len(stats)) if 1000 + i in snap.procs]
    assert len(snap.procs) == len(stats) - garbled
    assert snap.unreadable == (
        (f"stat of {garbled} processes garbled: skipped",) if garbled else ()
    )
