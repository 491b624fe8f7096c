"""Benchmark: kill 1,000 strays in 100 trees of a throw-away user, several ways, same run.

Usage (root): .venv/bin/python bench/bench_kill.py [--trees 100] [--per-tree 10] [--repeat 3]
              [--slow]

Every method gets a fresh set of trees (bash + per-tree-1 sleeps, each in its own
session) of a user made for the run (useradd; userdel -r at the end), so nothing else on
the machine can be signalled. The trees are started in a cgroup of their own made for the
run (in the v2 hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid node), as a
login session's scope holds a user's processes on a systemd node. "all gone" = from the
call until the last of them exited (became a zombie: PID 1 may reap lazily), as pidfds the
bench opened before the clock started report it.

The ratio line compares kill_many contained in the quarantine with kill.grace 0 (SIGKILL
at once, as the bare loop sends) with the bare os.kill loop, run alternately `--repeat`
times in the same run: the median of the per-pair ratios, for the freezer `contain: auto`
picks (the v1 freezer on a hybrid node, which also gets a line for the v2 cgroup.kill of its
unified hierarchy; cgroup.freeze + cgroup.kill on a v2 node).
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from pruned.act.kill import kill_many, kill_tree
from pruned.linux.cgroupfs import quarantine_method, v2_mount
from pruned.linux.pidfd import raise_nofile
from pruned.model import ProcKey
from tests.fixtures.cgdirs import own_v2_cgroup
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


def _move_self(cgroup_dir: str) -> None:
    with open(f"{cgroup_dir}/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def spawn(
    user: User, trees: int, per_tree: int, scope: str | None = None
) -> tuple[list[subprocess.Popen], Trees]:
    """Start `trees` sessions of bash + (per_tree - 1) sleeps (in the cgroup `scope`, when
    given: the bench joins it while it starts them); return their keys."""
    script = f"for i in $(seq {per_tree - 1}); do sleep 600 & done; wait"
    home = None
    if scope is not None:
        home = own_v2_cgroup()
        _move_self(scope)
    try:
        procs = [run_as(user, ["bash", "-c", script]) for _ in range(trees)]
    finally:
        if home is not None:
            _move_self(home)
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


SURVIVED: list[ProcKey] = []  # members a confined kill reported alive after its wait


def m_contained(trees: Trees, uid: int, grace: float, method: str = "auto") -> None:
    rs = kill_many(trees, grace=grace, dry_run=False, uid=uid, contain=method)
    # Under a heavy load a SIGKILLed process may take longer to exit than the kill's wait:
    # a survivor then (the sweep would hand it to freeze_and_kill), not a failed bench.
    SURVIVED.extend(k for r in rs for k in r.survivors)
    bad = [r.describe() for r in rs if r.errors and not r.survivors]
    assert not bad, f"{len(bad)} tree(s) with errors: {bad[0]}"
    assert all(r.contained.startswith("contained in ") for r in rs), rs[0].describe()


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


Method = Callable[[Trees, int], None]

BARE = "os.kill(pid, SIGKILL) loop"


def fast_methods() -> dict[str, tuple[str, Method]]:
    """The confined kill with grace 0 on each freezer offered here (a hybrid node has both),
    then the bare loop: the ratio's two sides."""
    offered = [quarantine_method()]
    v2 = v2_mount()
    if offered[0] == "freezer-v1" and v2 is not None:
        offered.append("cgroup.freeze")  # the unified hierarchy's own freezer and cgroup.kill
    out: dict[str, tuple[str, Method]] = {}
    for m in offered:
        how = "frozen quarantine, " + ("one cgroup.kill" if m == "cgroup.freeze" else "SIGKILL")
        out[f"kill_many contained ({m}), grace 0"] = (
            how, lambda t, uid, m=m: m_contained(t, uid, 0.0, m))
    out[BARE] = ("bare pid, no identity check", lambda t, uid: m_os_kill(t))
    return out


OTHERS: dict[str, tuple[str, Method]] = {
    "kill_many contained, grace 5": (
        "one frozen quarantine, SIGTERM, thaw",
        lambda t, uid: m_contained(t, uid, 5.0),
    ),
    "kill_many (TERM all, one wait)": (
        "pidfd + starttime check, SIGTERM, re-walks",
        lambda t, uid: m_kill_many(t, False),
    ),
    "kill_many freeze=True": (
        "SIGSTOP, re-walk, TERM, CONT",
        lambda t, uid: m_kill_many(t, True),
    ),
    "`kill -9 PID` per pid": ("one process per pid", lambda t, uid: m_kill_cmd(t)),
}
SLOW: dict[str, tuple[str, Method]] = {
    "kill_tree x100 sequential": (
        "each tree waits for its own exit",
        lambda t, uid: m_kill_tree_seq(t),
    ),
}


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def last_exit(fds: Sequence[int], timeout: float = 30.0) -> float:
    """time.perf_counter() when the last of the pidfds' processes exited (zombies count)."""
    last = time.perf_counter()
    with select.epoll(len(fds)) as ep:
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
        left = len(fds)
        deadline = time.perf_counter() + timeout
        while left:
            ready = ep.poll(max(0.001, deadline - time.perf_counter()))
            if not ready and time.perf_counter() > deadline:
                raise SystemExit(f"bench: {left} processes still alive")
            last = time.perf_counter()
            for fd, _ev in ready:
                ep.unregister(fd)
                left -= 1
    return last


def run_one(user: User, fn: Method, trees: int, per_tree: int, scope: str) -> tuple:
    procs, keys = spawn(user, trees, per_tree, scope)
    pids = [k.pid for root, desc in keys for k in (root, *desc)]
    # The bench's own pidfds, opened before the clock starts, tell when each one exited:
    # no pass over 1,000 /proc/PID/stat after the call inflates either side.
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        c0 = _cpu()
        t0 = time.perf_counter()
        fn(keys, user.uid)
        t_sig = time.perf_counter() - t0
        c_sig = _cpu() - c0
        t_all = last_exit(fds) - t0
    finally:
        for fd in fds:
            os.close(fd)
    wait_all_gone(pids)
    for p in procs:
        p.wait()
    return len(pids), t_sig, t_all, c_sig


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--per-tree", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="pairs of the ratio's two methods")
    ap.add_argument("--slow", action="store_true", help="also kill_tree x100 (~15 s)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_kill: needs root (it creates a throw-away user)", file=sys.stderr)
        return 77
    raise_nofile()  # the bench's pidfds and kill_many's: two per process
    v2 = v2_mount()
    if v2 is None:
        print("bench_kill: needs a v2 (or hybrid) cgroup hierarchy", file=sys.stderr)
        return 1
    scope = f"{v2}/pruned_bench_session_{os.getpid()}_{secrets.token_hex(3)}"
    os.mkdir(scope, 0o755)
    users = UserFactory()
    rows: dict[str, list[tuple]] = {}
    fast = fast_methods()
    hows = {name: how for name, (how, _) in {**fast, **OTHERS, **SLOW}.items()}
    la = os.getloadavg()
    try:
        user = users("prbench")
        for _ in range(args.repeat):
            for name, (_how, fn) in fast.items():
                rows.setdefault(name, []).append(
                    run_one(user, fn, args.trees, args.per_tree, scope))
        for name, (_how, fn) in {**OTHERS, **(SLOW if args.slow else {})}.items():
            rows.setdefault(name, []).append(run_one(user, fn, args.trees, args.per_tree, scope))
    finally:
        users.cleanup()
        with contextlib.suppress(OSError):
            os.rmdir(scope)
    print(f"quarantine: {quarantine_method()}; trees in {scope}; kernel {os.uname().release}; "
          f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at the start")
    print()
    print("| method | how | processes | runs | call returned (s) | all gone (s) | "
          "CPU in call (s) | µs/process |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        n = rs[0][0]
        t_sig = statistics.median(r[1] for r in rs)
        t_all = statistics.median(r[2] for r in rs)
        cpu = statistics.median(r[3] for r in rs)
        print(f"| {name} | {hows[name]} | {n} | {len(rs)} | {t_sig:.3f} | {t_all:.3f} | "
              f"{cpu:.3f} | {t_all / n * 1e6:.0f} |")
    print()
    ratio = {}
    for name in fast:
        if name == BARE:
            continue
        pairs = [f[2] / b[2] for f, b in zip(rows[name], rows[BARE], strict=True)]
        ratio[name] = statistics.median(pairs)
        print(f"{name}: pairs (all gone / bare all gone) "
              + ", ".join(f"{x:.2f}" for x in pairs) + f"; median {ratio[name]:.2f}")
    if SURVIVED:
        print(f"{len(SURVIVED)} process(es) outlived kill_many's wait (load); the bench waited "
              "for them: all gone counts until they exited")
    first = next(iter(ratio))  # the freezer `contain: auto` picks here
    print(f"kill ratio={ratio[first]:.2f} "
          "(kill_many all-gone / os.kill loop all-gone, same run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
