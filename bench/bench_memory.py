"""Peak memory of pruned's sweeps at 100,000 processes and during a 1,000,000-file cleanup.

100,000 real processes would need ~18 GB here (~184 KiB each, bench/README.md) and a
pid_max above 100,000 on a shared 23 GB machine, so the process table is synthetic: a
tmpfs this script mounts holds PROC/stat (btime) and PROC/PID/stat for N processes (stat
lines shaped like the kernel's, each file owned by one of 50 user uids, 100 processes per
parent), read through the same `proc_root` parameter the tests use. A forked child per N
then runs what the daemon's process sweep runs, `pruned.sweep.run_sweep` (snapshot,
read_jobs, classify, decide, execute, audit; scoped to a uid that owns nothing, so every
process is classified and none is acted on, as bench_daemon.py's cost runs), twice, the
first report kept alive (the daemon holds the last sweep while the next runs), then the
file cleanup the daemon's file sweep runs, `pruned.act.remove.execute_cleanup`, of a job
directory holding W files (dry-run, then real). It reports ru_maxrss after each step
against the unit's MemoryMax. A second child per N runs the daemon's model with events on
(daemon_child): a ProcCache between sweeps, each report dropped once handled.

    sudo .venv/bin/python bench/bench_memory.py [--procs 1000,20000,100000] [--files 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruned.act.remove import execute_cleanup
from pruned.lineage import LineageMemory
from pruned.linux.proccache import ProcCache
from pruned.model import Policy
from pruned.policy.facts import resolve_facts
from pruned.reactor import Reactor
from pruned.rules.cleanplan import CleanupPlan, JobDirItem
from pruned.sweep import run_sweep

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "pruned.service"
O_DIR = os.O_RDONLY | os.O_DIRECTORY


def memory_max_mb() -> float:
    m = re.search(r"^MemoryMax=(\d+)([KMG]?)", UNIT.read_text(), re.M)
    if not m:
        return float("nan")
    return int(m[1]) * {"": 1 / 2**20, "K": 1 / 1024, "M": 1, "G": 1024}[m[2]]


def fake_proc(root: Path, n: int) -> None:
    """root/stat and root/PID/stat for pids 1000.. (+ pid 1 root's), owned by user uids."""
    root.mkdir()
    (root / "stat").write_text(f"cpu 0 0 0 0\nbtime {int(time.time()) - 86400}\n")
    tail = " 0" * 30
    rfd = os.open(root, O_DIR)
    try:
        for i in range(n):
            pid = 1000 + i
            ppid = 1 if i % 100 == 0 else 1000 + (i // 100) * 100
            uid = 61000 + (i // 100) % 50
            line = (
                f"{pid} (sleep) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 "
                f"{100000 + i} 8000000 200 18446744073709551615{tail}\n"
            )
            os.mkdir(str(pid), dir_fd=rfd)
            fd = os.open(f"{pid}/stat", os.O_CREAT | os.O_WRONLY, 0o444, dir_fd=rfd)
            os.write(fd, line.encode())
            os.fchown(fd, uid, uid)
            os.close(fd)
    finally:
        os.close(rfd)


def fill(job: Path, files: int) -> None:
    job.mkdir()
    fd = os.open(job, O_DIR)
    try:
        for i in range(files):
            os.close(os.open(f"f{i:07d}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


class NullSink:
    def emit(self, record: object) -> None:
        pass


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(proc: Path, job: Path, files: int) -> dict:
    out: dict = {"idle": rss_mb()}
    policy = Policy()
    facts = resolve_facts(policy)
    kw = dict(dry_run=True, uids={59999}, proc_root=str(proc))
    t, c = time.perf_counter(), time.process_time()
    first = run_sweep(policy, facts, NullSink(), **kw)
    out["sweep_s"], out["sweep_cpu"] = time.perf_counter() - t, time.process_time() - c
    out["procs"] = len(first.observation.snap.procs)
    out["verdicts"] = len(first.observation.verdicts)
    out["sweep"] = rss_mb()
    second = run_sweep(policy, facts, NullSink(), **kw)
    out["two_sweeps"] = rss_mb()
    if files:
        plan = CleanupPlan(
            job_dirs=(JobDirItem("1", 0, str(job), "ended"),),
            loose=(),
            held=(),
            now=time.time(),
            min_age=0,
            max_listed=20,
        )
        for dry in (True, False):
            t = time.perf_counter()
            (o,) = execute_cleanup(plan, dry_run=dry)
            key = "clean_dry" if dry else "clean"
            out[key + "_s"] = time.perf_counter() - t
            out[key + "_files"] = o.files
            out[key] = rss_mb()
    del first, second
    return out


def daemon_child(proc: Path) -> dict:
    """What the daemon holds with events on (pruned.service): the ProcCache between sweeps,
    each report dropped once handled. A full read, an incremental one (nothing changed),
    then a full one again (schedule.full_sweep came round) while the cache is in place."""
    policy = Policy()
    facts = resolve_facts(policy)
    cache = ProcCache(full_every=1e9)
    cache.attach()  # as the daemon does once its event watcher listens (none here)
    # The daemon's other memories across sweeps: lineages of strays (bounded), and the
    # reactor's parent -> children map, seeded from each sweep (the worker swaps the new one
    # in: both are held for a moment, as here).
    kw = dict(dry_run=True, uids={59999}, proc_root=str(proc), cache=cache,
              lineage=LineageMemory())
    reactor = Reactor(lambda: (policy, facts, NullSink()), lambda _f: None, threading.Lock())
    held: dict | None = None
    out: dict = {"idle": rss_mb()}
    for step in ("full", "incremental", "full again"):
        cache.full_every = 0 if step == "full again" else 1e9
        t, c = time.perf_counter(), time.process_time()
        report = run_sweep(policy, facts, NullSink(), **kw)
        out[step + "_s"], out[step + "_cpu"] = time.perf_counter() - t, time.process_time() - c
        assert cache.last is not None and cache.last.full == (step != "incremental")
        out["procs"] = len(report.observation.snap.procs)
        held = reactor._seed
        reactor.seed(report.observation.snap)
        del report
        out[step] = rss_mb()
    del held
    return out


def in_child(proc: Path, job: Path, files: int, fn=None) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = child(proc, job, files) if fn is None else fn(proc)
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
            os._exit(1)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(data)
    if "error" in res:
        raise SystemExit(f"bench: child failed: {res['error']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="1000,20000,100000")
    ap.add_argument("--files", type=int, default=1_000_000, help="0: no cleanup step")
    ap.add_argument("--base", default="/var/tmp")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (mounts a tmpfs, chowns to user uids)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="pruned-bench-mem-", dir=a.base))
    mnt = work / "tmpfs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8g,nr_inodes=0,mode=0700", "tmpfs", str(mnt)],
        check=True,
    )
    rows = []
    drows: list[dict] = []
    try:
        for n in (int(x) for x in a.procs.split(",")):
            proc = mnt / f"proc{n}"
            fake_proc(proc, n)
            job = mnt / "job"
            if a.files:
                fill(job, a.files)
            res = in_child(proc, job, a.files)
            rows.append((n, res))
            print(f"# {n}: {res}", file=sys.stderr, flush=True)
            dres = in_child(proc, job, 0, daemon_child)
            drows.append(dres)
            print(f"# {n} daemon model: {dres}", file=sys.stderr, flush=True)
            shutil.rmtree(proc)
            if job.exists():
                shutil.rmtree(job)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    cap = memory_max_mb()
    print(
        f"kernel {os.uname().release}, {os.cpu_count()} cpus, synthetic /proc, "
        f"{a.files:,} files in the job dir, MemoryMax {cap:.0f} MB (systemd/pruned.service)\n"
    )
    print(
        "| processes | sweep wall / CPU s | idle MB | after 1 sweep MB | 2 sweeps (1st kept) MB "
        "| + cleanup dry-run MB | + cleanup real MB | peak / MemoryMax |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _n, r in rows:
        peak = max(
            v for k, v in r.items() if k in ("idle", "sweep", "two_sweeps", "clean_dry", "clean")
        )
        print(
            f"| {r['procs']:,} | {r['sweep_s']:.2f} / {r['sweep_cpu']:.2f} | {r['idle']:.1f} "
            f"| {r['sweep']:.1f} "
            f"| {r['two_sweeps']:.1f} | {r.get('clean_dry', float('nan')):.1f} "
            f"| {r.get('clean', float('nan')):.1f} | {peak / cap:.0%} |"
        )
    print("\nThe daemon's model (ProcCache attached, lineage memory, the reactor's children "
          "maps, reports dropped): RSS MB after each sweep, CPU s of each\n")
    print("| processes | idle MB | full MB | incremental MB | full again MB | full / incr / "
          "full CPU s | peak / MemoryMax |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in drows:
        peak = max(r["idle"], r["full"], r["incremental"], r["full again"])
        print(f"| {r['procs']:,} | {r['idle']:.1f} | {r['full']:.1f} | {r['incremental']:.1f} "
              f"| {r['full again']:.1f} | {r['full_cpu']:.2f} / {r['incremental_cpu']:.2f} / "
              f"{r['full again_cpu']:.2f} | {peak / cap:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
