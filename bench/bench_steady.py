"""Benchmark steady-state sweeps (pruned.linux.proccache) against full sweeps and the floor.

    sudo .venv/bin/python bench/bench_steady.py [--n 20000] [--repeat 5] [--changed 1]
    sudo .venv/bin/python bench/bench_steady.py --synthetic 100000 [--repeat 3]
    sudo .venv/bin/python bench/bench_steady.py --n 20000 --synthetic 100000   (both, one line)

Real mode: 2 throw-away users run N sleepers (bench_snapshot's World: made and removed the
same way), and a real proc connector watcher (pruned.linux.connector.EventWatcher) feeds a
ProcCache exactly as the daemon does (pruned.service.Daemon.on_pids). Measured round-robin,
best of R, CPU time (this process), in the same run:
  floor         listdir /proc + open/read/close of every /proc/PID/stat, no parsing
  full snap     procfs.snapshot()            full observe  sweep.observe() without a cache
  incr snap     ProcCache.snapshot(), warm, nothing changed
  incr observe  sweep.observe(cache=...), warm, nothing changed
  incr K%       sweep.observe(cache=...) after K% of the pids were marked changed
  incr sweep    sweep.run_sweep(cache=...), dry-run, records to a null sink: the whole sweep
observe = snapshot + job view + classify + decide (the daemon's sweep before acting; the
default policy, dry-run facts, nothing acted on). "strays": every sleeper a stray (held by
the --uid scope); "ignored": the bench users whitelisted, as most of a node is batch.

Synthetic mode: the fake /proc of bench_memory.py (a tmpfs, N kernel-shaped stat files
owned by 50 user uids) for N beyond what this machine can run for real; floor, full
snapshot, snapshot + classify and full observe through proc_root, and observe with a
ProcCache (nothing changes on a tmpfs: every sweep after the first is incremental). tmpfs
files open faster than /proc's generated ones, so the ratios to the floor are, if anything,
pessimistic. Then bench_memory's daemon model in a child: its peak RSS at N.

The closing line: `steady us_per_unchanged_proc=X full_vs_floor=Y rss_mb_100k=Z`, X the
incremental observe of the ignored case per process (real mode), Y full observe (ignored,
real mode; else synthetic) over the floor, Z the daemon model's peak at the synthetic N
(named 100k whatever N was: run it with 100000); "-" for what this run did not measure.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_memory import NullSink, daemon_child, fake_proc, in_child  # noqa: E402
from bench_snapshot import World  # noqa: E402

from pruned.linux import procfs  # noqa: E402
from pruned.linux.connector import EventWatcher, probe  # noqa: E402
from pruned.linux.proccache import ProcCache  # noqa: E402
from pruned.model import JobView, Policy  # noqa: E402
from pruned.policy.facts import resolve_facts  # noqa: E402
from pruned.rules.classify import classify  # noqa: E402
from pruned.sweep import observe, run_sweep  # noqa: E402

EX_NOPERM, EX_UNAVAILABLE = 77, 69


def floor(proc_root: str) -> int:
    _open, _read, _close = os.open, os.read, os.close
    n = 0
    for name in os.listdir(proc_root):
        if name.isdigit():
            try:
                fd = _open(f"{proc_root}/{name}/stat", os.O_RDONLY)
            except OSError:
                continue
            try:
                _read(fd, 1024)
                n += 1
            except OSError:
                pass
            finally:
                _close(fd)
    return n


def measure(
    methods: list[tuple[str, Callable[[], int]]], repeat: int
) -> dict[str, tuple[float, int]]:
    """Best-of-`repeat` CPU seconds of each method and the processes it saw, round-robin."""
    best: dict[str, tuple[float, int]] = {name: (float("inf"), 0) for name, _ in methods}
    for _ in range(repeat):
        for name, fn in methods:
            c0 = time.process_time()
            n = fn()
            cpu = time.process_time() - c0
            best[name] = (min(best[name][0], cpu), max(best[name][1], n))
    return best


def table(title: str, rows: list[tuple[str, float, int, str]]) -> None:
    print(f"\n{title}\n")
    print("| method | processes | CPU ms | µs per process | vs floor | note |")
    print("|---|---:|---:|---:|---:|---|")
    fl = next(t / n for name, t, n, _ in rows if name == "floor")
    for name, t, n, note in rows:
        per = t / max(n, 1)
        print(f"| {name} | {n:,} | {t * 1e3:.0f} | {per * 1e6:.2f} | {per / fl:.2f}x | {note} |")


def rows_of(res: dict[str, tuple[float, int]], notes: dict[str, int] | None = None
            ) -> list[tuple[str, float, int, str]]:  # fmt: skip
    notes = notes or {}
    return [(name, t, n, f"re-read {notes[name]}" if name in notes else "")
            for name, (t, n) in res.items()]  # fmt: skip


def per(res: dict[str, tuple[float, int]], name: str) -> float:
    t, n = res[name]
    return t / max(n, 1)


def real(args: argparse.Namespace, summary: dict[str, str]) -> int:
    why = probe()
    if why is not None:
        print(f"bench_steady: {why}", file=sys.stderr)
        return EX_UNAVAILABLE
    policy = Policy()
    facts = resolve_facts(policy)
    # One cache per policy, as one daemon has one policy: the two cases measured round-robin
    # would otherwise empty each other's verdict memo every run (a policy change).
    cache = ProcCache(full_every=1e9)
    qcache = ProcCache(full_every=1e9)
    world = World()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    watcher: EventWatcher | None = None
    out: list[tuple[str, float, int, str]] = []
    try:
        world.add_user()
        world.add_user()
        world.grow_to(args.n)
        # The steady state of a node: most processes judged and ignored (on a real node,
        # batch; here the bench users whitelisted). The stray policy above is the worst case:
        # every process a held kill decision.
        quiet = replace(policy, whitelist=replace(policy.whitelist, users=tuple(world.users)))
        quiet_facts = resolve_facts(quiet)
        watcher = EventWatcher(lambda c, e: (cache.mark(c, e), qcache.mark(c, e)),
                               lambda r: (cache.lost(r), qcache.lost(r))).start()
        for c in (cache, qcache):
            c.attach()
        observe(policy, facts, cache=cache)  # the full reads that found the caches
        observe(quiet, quiet_facts, cache=qcache)
        rng = random.Random(1)
        reread: dict[str, int] = {}

        def incr_snap() -> int:
            n = len(cache.snapshot().procs)
            assert cache.last is not None and not cache.last.full, cache.last
            reread["incr snap"] = cache.last.reread
            return n

        def incr_observe(pct: float, name: str, pol: Policy = quiet, fa=quiet_facts,
                         c: ProcCache = qcache) -> Callable[[], int]:  # fmt: skip
            def run() -> int:
                if pct:
                    pids = list(c._procs or ())
                    c.mark(rng.sample(pids, int(len(pids) * pct / 100)), ())
                obs = observe(pol, fa, cache=c)
                assert c.last is not None and not c.last.full, c.last
                reread[name] = c.last.reread
                return len(obs.snap.procs)
            return run

        def full_observe(pol: Policy = policy, fa=facts) -> Callable[[], int]:
            return lambda: len(observe(pol, fa).snap.procs)

        def incr_sweep() -> int:
            rep = run_sweep(quiet, quiet_facts, NullSink(), dry_run=True, cache=qcache)
            assert qcache.last is not None and not qcache.last.full, qcache.last
            reread["incr sweep, ignored"] = qcache.last.reread
            return len(rep.observation.snap.procs)

        k = f"incr observe, ignored, {args.changed:g}% changed"
        methods = [
            ("floor", lambda: floor("/proc")),
            ("full snap", lambda: len(procfs.snapshot().procs)),
            ("full observe, strays", full_observe()),
            ("full observe, ignored", full_observe(quiet, quiet_facts)),
            ("incr snap", incr_snap),
            ("incr observe, strays", incr_observe(0, "incr observe, strays", policy, facts,
                                                  cache)),
            ("incr observe, ignored", incr_observe(0, "incr observe, ignored")),
            (k, incr_observe(args.changed, k)),
            ("incr sweep, ignored", incr_sweep),
        ]
        res = measure(methods, args.repeat)
        lost = watcher.lost_reports
        out = rows_of(res, reread)
        fl = per(res, "floor")
        summary["us_per_unchanged_proc"] = f"{per(res, 'incr observe, ignored') * 1e6:.2f}"
        summary["full_vs_floor"] = f"{per(res, 'full observe, ignored') / fl:.2f}"
        print(f"# events lost during the run: {lost}", file=sys.stderr)
    finally:
        if watcher is not None:
            watcher.stop()
        world.cleanup()
    table(f"N={args.n} real sleepers, CPU time, best of {args.repeat}", out)
    return 0


def synthetic(args: argparse.Namespace, summary: dict[str, str]) -> int:
    policy = Policy()
    facts = resolve_facts(policy)
    work = Path(tempfile.mkdtemp(prefix="pruned-bench-steady-", dir="/var/tmp"))
    mnt = work / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,nr_inodes=0,mode=0700", "tmpfs",
                    str(mnt)], check=True)  # fmt: skip
    out: list[tuple[str, float, int, str]] = []
    try:
        proc = mnt / "proc"
        fake_proc(proc, args.synthetic)
        root = str(proc)
        empty = JobView(jobs={}, membership={})

        def snap_classify() -> int:
            snap = procfs.snapshot(root)
            return len(classify(snap, empty, policy, facts))

        cache = ProcCache(full_every=1e9)
        cache.attach()  # no watcher: nothing changes on the tmpfs, so no event is missed

        def incr_observe() -> int:
            obs = observe(policy, facts, proc_root=root, cache=cache)
            assert cache.last is not None and not cache.last.full, cache.last
            return len(obs.snap.procs)

        methods = [
            ("floor", lambda: floor(root)),
            ("full snap", lambda: len(procfs.snapshot(root).procs)),
            ("full snap+classify", snap_classify),
            ("full observe", lambda: len(observe(policy, facts, proc_root=root).snap.procs)),
        ]
        observe(policy, facts, proc_root=root, cache=cache)  # the full read of the cache
        methods.append(("incr observe", incr_observe))
        res = measure(methods, args.repeat)
        out = rows_of(res)
        if "full_vs_floor" not in summary:
            summary["full_vs_floor"] = f"{per(res, 'full observe') / per(res, 'floor'):.2f}"
        cache.detach()  # drop its records before the model runs
        model = in_child(proc, mnt / "nojob", 0, daemon_child)
        peak = max(model["full"], model["incremental"], model["full again"])
        summary["rss_mb_100k"] = f"{peak:.1f}"
        print(f"\n# daemon model at {model['procs']:,} synthetic processes, RSS MB: full "
              f"{model['full']:.1f}, incremental {model['incremental']:.1f}, full again "
              f"{model['full again']:.1f} (peak {peak:.1f})")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    table(f"N={args.synthetic:,} synthetic processes (tmpfs), CPU time, best of {args.repeat}",
          out)  # fmt: skip
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="real sleepers (default 20000, or "
                    "none when --synthetic is given alone)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--changed", type=float, default=1.0, help="percent of pids marked")
    ap.add_argument("--synthetic", type=int, default=0, help="N synthetic processes instead")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_steady: needs root", file=sys.stderr)
        return EX_NOPERM
    if args.n is None and not args.synthetic:
        args.n = 20000
    summary: dict[str, str] = {}
    rc = 0
    if args.n:
        rc = real(args, summary)
    if args.synthetic and rc == 0:
        rc = synthetic(args, summary)
    keys = ("us_per_unchanged_proc", "full_vs_floor", "rss_mb_100k")
    print("\nsteady " + " ".join(f"{k}={summary.get(k, '-')}" for k in keys))
    return rc


if __name__ == "__main__":
    sys.exit(main())
