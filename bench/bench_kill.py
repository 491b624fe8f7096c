"""Benchmark: kill 1,000 strays in 100 trees of a throw-away user, several ways, same run.

Usage (root): .venv/bin/python bench/bench_kill.py [--trees 100] [--per-tree 10]

Every method gets a fresh set of trees (bash + per-tree-1 sleeps, each in its own
session) of a user made for the run (useradd; userdel -r at the end), so nothing else on
the machine can be signalled. "until gone" = from the first signal until every pid is
absent or a zombie (PID 1 here reaps lazily, so Z counts as gone).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from pruned.act.kill import kill_many, kill_tree
from pruned.model import ProcKey
from tests.fixtures.users import User, UserFactory, run_as

Trees = list[tuple[ProcKey, list[ProcKey]]]


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _gone(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[0] in ("Z", "X")


def spawn(user: User, trees: int, per_tree: int) -> tuple[list[subprocess.Popen], Trees]:
    """Start `trees` sessions of bash + (per_tree - 1) sleeps; return their keys."""
    script = f"for i in $(seq {per_tree - 1}); do sleep 600 & done; wait"
    procs = [run_as(user, ["bash", "-c", script]) for _ in range(trees)]
    sids = {p.pid for p in procs}
    deadline = time.monotonic() + 60
    while True:
        members: dict[int, list[ProcKey]] = {sid: [] for sid in sids}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st and int(st[3]) in sids and st[0] not in ("Z", "X"):
                    members[int(st[3])].append(ProcKey(int(name), int(st[19])))
        if all(len(m) == per_tree for m in members.values()):
            break
        if time.monotonic() > deadline:
            raise SystemExit("bench: trees did not come up in 60 s")
        time.sleep(0.05)
    out: Trees = []
    for p in procs:
        keys = sorted(members[p.pid])
        root = next(k for k in keys if k.pid == p.pid)
        out.append((root, [k for k in keys if k.pid != p.pid]))
    return procs, out


def wait_all_gone(pids: Sequence[int], timeout: float = 30.0) -> None:
    left = list(pids)
    deadline = time.monotonic() + timeout
    while left:
        left = [p for p in left if not _gone(p)]
        if left and time.monotonic() > deadline:
            raise SystemExit(f"bench: {len(left)} processes still alive")


def m_kill_many(trees: Trees, freeze: bool) -> None:
    rs = kill_many(trees, grace=5.0, dry_run=False, freeze=freeze)
    assert all(r.ok for r in rs)


def m_kill_tree_seq(trees: Trees) -> None:
    for root, desc in trees:
        assert kill_tree(root, desc, grace=5.0, dry_run=False, freeze=False).ok


def m_os_kill(trees: Trees) -> None:
    for root, desc in trees:
        for k in (root, *desc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(k.pid, signal.SIGKILL)


def m_kill_cmd(trees: Trees) -> None:
    for root, desc in trees:
        for k in (root, *desc):
            subprocess.run(["kill", "-9", str(k.pid)], stderr=subprocess.DEVNULL)


METHODS: dict[str, tuple[str, Callable[[Trees], None]]] = {
    "kill_many (TERM all, one wait)": (
        "pidfd + starttime check, SIGTERM",
        lambda t: m_kill_many(t, False),
    ),
    "kill_many freeze=True": ("SIGSTOP, re-walk, TERM, CONT", lambda t: m_kill_many(t, True)),
    "kill_tree x100 sequential": ("each tree waits for its own exit", m_kill_tree_seq),
    "os.kill(pid, SIGKILL) loop": ("bare pid, no identity check", m_os_kill),
    "`kill -9 PID` per pid": ("one process per pid", m_kill_cmd),
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--per-tree", type=int, default=10)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_kill: needs root (it creates a throw-away user)", file=sys.stderr)
        return 77
    users = UserFactory()
    rows = []
    try:
        user = users("prbench")
        for name, (how, fn) in METHODS.items():
            procs, trees = spawn(user, args.trees, args.per_tree)
            pids = [k.pid for root, desc in trees for k in (root, *desc)]
            t0 = time.perf_counter()
            fn(trees)
            t_sig = time.perf_counter() - t0
            wait_all_gone(pids)
            t_all = time.perf_counter() - t0
            for p in procs:
                p.wait()
            rows.append((name, how, len(pids), t_sig, t_all))
    finally:
        users.cleanup()
    print("| method | how | processes | call returned (s) | all gone (s) | µs/process |")
    print("|---|---|---|---|---|---|")
    for name, how, n, t_sig, t_all in rows:
        print(f"| {name} | {how} | {n} | {t_sig:.3f} | {t_all:.3f} | {t_all / n * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
