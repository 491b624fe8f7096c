"""What the deadline on argv/environment reads costs: pruned's read_mm_file against a plain read.

    .venv/bin/python bench/bench_procread.py [--procs 50] [--repeat 5]

Starts `--procs` children of its own (`sh -c 'read x'` with a 4 KiB argument, waiting on a
pipe), reads each one's /proc/PID/cmdline with a bare open/read/close and with
`procfs.read_cmdline` (a worker thread with a deadline, pruned.linux.procfs), best of R, and
prints a table with the ratio against the bare read measured in the same run. Then kills and
reaps exactly the children it started, by pid. No root needed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruned.linux import procfs


def bare(pid: int) -> bytes:
    fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, procfs.CMDLINE_READ)
    finally:
        os.close(fd)


def best(fn, pids: list[int], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for pid in pids:
            fn(pid)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    kids = [subprocess.Popen(["sh", "-c", "read x", "x" * 4096], stdin=subprocess.PIPE)
            for _ in range(args.procs)]  # fmt: skip
    try:
        pids = [k.pid for k in kids]
        time.sleep(0.2)
        assert all(procfs.read_cmdline(p) == bare(p) for p in pids)
        base = best(bare, pids, args.repeat)
        rows = [("open/read/close", base), ("procfs.read_cmdline (thread + deadline)",
                                            best(procfs.read_cmdline, pids, args.repeat))]
        print(f"{args.procs} processes, best of {args.repeat}\n")
        print("| reader | µs per process | vs bare read |\n|---|---:|---:|")
        for name, t in rows:
            print(f"| {name} | {t / len(pids) * 1e6:.1f} | {t / base:.2f}x |")
    finally:
        for k in kids:
            k.kill()
            k.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
