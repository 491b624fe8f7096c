"""Benchmark pruned's own state: CPU of a jobs refresh with 0 .. 100,000 remembered jobs.

    sudo .venv/bin/python bench/bench_state.py [--counts 0,1000,10000,100000] [--refreshes 20]
                                               [--dir DIR]

For each count N the script makes a fresh state dir (under DIR, default a new dir in /tmp)
holding N ended jobs twice over, as a busy node collects them: N entries in the history
(history.json) and N epilog records `jobs/<id>.json` (written as `pruned epilog` writes
them, minus the per-file fsync to save time), plus 20 running jobs' records. Then, in this
process, once with `jobs.sources: [slurm]` (a stand-in with 20 running jobs for the cgroup
tree, whose cost does not depend on N; the state dir is only pruned) and once with
`[statedir]` (the state dir is read every refresh):

- load: JobHistory.load, once (the daemon's start).
- refresh, idle: what the daemon's jobs refresh does (read_jobs of the sources, learn_jobs
  with housekeeping, history.save) while no job starts or ends; CPU per refresh, mean of
  --refreshes.
- refresh, churn: the same, but before each refresh one job starts (`write_job_record`, the
  prolog; and, for the slurm table, in the stand-in cgroup view) and one ends
  (`end_job_record`, the epilog): the directory changes every time, and the history has
  something to save every time.
- prune: one housekeeping pass with jobs.keep_ended set so that half of the N jobs are past
  it: history entries and records removed (CPU and wall).

Each row's ratio is against the N=0 row of the same run. CPU is this process's
utime+stime (time.process_time), so other load on the machine inflates it less than wall
time, but not to nothing: compare rows within one table. Everything goes in the script's own
temporary directory, which is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pruned.filesweep import learn_jobs  # noqa: E402
from pruned.jobs.history import JobHistory, JobRecord  # noqa: E402
from pruned.jobs.retention import housekeep  # noqa: E402
from pruned.jobs.source import read_jobs  # noqa: E402
from pruned.jobs.statedir import RACY, end_job_record, record_name, write_job_record  # noqa: E402
from pruned.model import Job, JobView, Policy  # noqa: E402
from pruned.sweep import make_sources  # noqa: E402

DAY = 86400.0
RUNNING = 20


def populate(sd: str, n: int, now: float) -> None:
    """n ended jobs in the history and as epilog records (ends spread over 10 days), and
    RUNNING running records."""
    recs = {}
    jobs = os.path.join(sd, "jobs")
    write_job_record(sd, "r0", 30000, now - 60)  # makes state/ and jobs/ as the prolog does
    for i in range(n):
        job_id = f"{1_000_000 + i}"
        end = now - 10 * DAY * (i + 0.5) / n
        recs[job_id] = JobRecord(job_id, 30000 + i % 500, end - 600, end, None, "statedir")
        body = {"job_id": job_id, "uid": 30000 + i % 500, "start": end - 600, "end": end,
                "user": None, "source": "statedir"}  # fmt: skip
        fd = os.open(os.path.join(jobs, record_name(job_id)), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")
    for r in range(1, RUNNING):
        write_job_record(sd, f"r{r}", 30000 + r, now - 60)
    JobHistory(sd, recs).save()


class CgroupStandIn:
    """The Slurm source's part of a refresh on a node with RUNNING jobs: a fixed view. What
    it costs does not depend on how many ended jobs pruned remembers, which is the point."""

    name = "slurm"

    def __init__(self, now: float) -> None:
        jobs = {f"r{r}": Job(f"r{r}", 30000 + r, now - 60, "slurm", True) for r in range(RUNNING)}
        self.view = JobView(jobs=jobs, membership={}, sources=("slurm",))

    def read(self) -> JobView:
        return self.view

    def start_and_end(self, started: str, ended: str, now: float) -> None:
        jobs = {k: j for k, j in self.view.jobs.items() if k != ended}
        jobs[started] = Job(started, 31000, now, "slurm", True)
        self.view = JobView(jobs=jobs, membership={}, sources=("slurm",))


def refresh(hist: JobHistory, policy: Policy, now: float, slurm: CgroupStandIn | None) -> None:
    """One jobs refresh of the daemon (service.Daemon.refresh_jobs)."""
    view = read_jobs([slurm] if slurm else make_sources(policy))
    learn_jobs(hist, view, now, policy, prune=True)
    hist.save()


def measure(base: str, n: int, refreshes: int, source: str) -> dict[str, float]:
    sd = tempfile.mkdtemp(prefix=f"state-{n}-", dir=base)
    now = time.time()
    populate(sd, n, now)
    time.sleep(RACY + 0.5)  # records as old as on a node: no timestamp is too recent to trust
    now = time.time()
    policy = Policy(job_sources=(source,), state_dir=sd, keep_ended=30 * DAY)
    slurm = CgroupStandIn(now) if source == "slurm" else None
    out: dict[str, float] = {}
    t = time.process_time()
    hist = JobHistory.load(sd)
    out["load"] = time.process_time() - t
    assert not hist.problems and len(hist) == n, hist.problems[:3]
    refresh(hist, policy, now, slurm)  # the first one learns the running jobs and prunes (nothing)
    refresh(hist, policy, now + 1, slurm)
    # Refreshes come jobs_interval (30 s) apart: the timestamps the prune just changed are
    # old enough to trust by the next one.
    time.sleep(RACY + 0.5)
    refresh(hist, policy, now + 1.5, slurm)
    t = time.process_time()
    for k in range(refreshes):
        refresh(hist, policy, now + 2 + k, slurm)
    out["idle"] = (time.process_time() - t) / refreshes
    churn = 0.0
    for k in range(refreshes):
        # The prolog and the epilog are other processes: their cost is not the daemon's.
        write_job_record(sd, f"c{k}", 31000, now + 100 + k)
        if k:
            end_job_record(sd, f"c{k - 1}", now + 100 + k)
        if slurm is not None:  # the same start and end seen in the cgroup tree
            slurm.start_and_end(f"c{k}", f"c{k - 1}", now + 100 + k)
        t = time.process_time()
        refresh(hist, policy, now + 100 + k, slurm)
        churn += time.process_time() - t
    out["churn"] = churn / refreshes
    # The prune: half of the n ended jobs are older than 5 days.
    hist.pruned_at = None
    t, w = time.process_time(), time.monotonic()
    report = housekeep(hist, sd, now + 200, 5 * DAY)
    hist.save()
    out["prune_cpu"], out["prune_wall"] = time.process_time() - t, time.monotonic() - w
    assert report is not None
    out["pruned"] = report.history + len(report.records.removed)
    shutil.rmtree(sd)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="0,1000,10000,100000")
    ap.add_argument("--refreshes", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where the state dirs go (default: /tmp)")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if os.geteuid() != 0:
        print("bench_state: run as root (the records must be root's, as pruned wants)")
        return 77
    base = tempfile.mkdtemp(prefix="pruned-bench-state-", dir=args.dir)
    try:
        tables = {
            src: [(n, measure(base, n, args.refreshes, src)) for n in counts]
            for src in ("slurm", "statedir")
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for src, rows in tables.items():
        zero = rows[0][1]
        print(f"\njobs.sources: [{src}]: jobs refresh CPU with N remembered ended jobs "
              f"(history + state-dir records), {args.refreshes} refreshes each; ratios "
              f"against N={rows[0][0]}\n")  # fmt: skip
        print("| N | load ms | refresh idle ms | vs base | refresh churn ms | vs base "
              "| prune CPU ms | prune wall ms | forgotten |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, m in rows:
            print(
                f"| {n:,} | {m['load'] * 1e3:.1f} | {m['idle'] * 1e3:.2f} | "
                f"{m['idle'] / zero['idle']:.2f}x | {m['churn'] * 1e3:.2f} | "
                f"{m['churn'] / zero['churn']:.2f}x | {m['prune_cpu'] * 1e3:.1f} | "
                f"{m['prune_wall'] * 1e3:.1f} | {int(m['pruned']):,} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
