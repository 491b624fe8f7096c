"""Throughput of pruned's file removal against `find ROOT -uid U -delete` and `rm -rf`.

Each tool gets an identical fresh tree (ROOT/dNNNN/fNNNNNN, DIRS dirs, files spread evenly,
everything below ROOT owned by an unused uid, ROOT itself root-owned like /tmp) on a tmpfs
this script mounts and on the disk, in the same run. Prints a markdown table.

    .venv/bin/python bench/bench_cleanup.py [--files 100000,1000000] [--dirs 1000]
        [--fs tmpfs,disk] [--base /var/tmp] [--uid N] [--repeat N] [--disk-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from pruned.linux.fdremove import remove_owned_files, remove_tree
from pruned.linux.guards import Guards

TOOLS = ("find -uid -delete", "rm -rf", "pruned remove_owned_files", "pruned remove_tree")


def unused_uid() -> int:
    """A uid with no passwd entry and no process (so no real user's files are involved)."""
    used = {p.pw_uid for p in pwd.getpwall()}
    procs = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(FileNotFoundError):
                procs.add(os.stat(f"/proc/{name}").st_uid)
    for uid in range(47000, 48000):
        if uid not in used and uid not in procs:
            return uid
    raise SystemExit("bench: no unused uid in 47000-47999")


def build(root: Path, files: int, dirs: int, uid: int) -> None:
    """ROOT/dNNNN/f... created by a child running as uid, so ownership costs no chown."""
    root.mkdir()
    os.chmod(root, 0o1777)
    pid = os.fork()
    if pid == 0:
        try:
            rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # before the drop: base is 0700
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            per, extra = divmod(files, dirs)
            for d in range(dirs):
                name = f"d{d:04d}"
                os.mkdir(name, dir_fd=rfd)
                dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=rfd)
                for f in range(per + (d < extra)):
                    os.close(os.open(f"f{f:06d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
                os.close(dfd)
            os._exit(0)
        except BaseException as e:
            print(f"bench: build failed: {e}", file=sys.stderr)
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if status:
        raise SystemExit("bench: could not build the tree")


def run(tool: str, root: Path, uid: int) -> tuple[float, int]:
    """Seconds to remove the tree with one tool, and the entries it says it removed."""
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    n = -1
    if tool == "find -uid -delete":
        subprocess.run(["find", str(root), "-uid", str(uid), "-delete"], check=True)
    elif tool == "rm -rf":
        subprocess.run(["rm", "-rf", str(root)], check=True)
    elif tool == "pruned remove_owned_files":
        s = remove_owned_files(
            str(root), uid, min_age=0, now=time.time() + 60, dry_run=False, guards=Guards()
        )
        n = s.files + s.dirs
        if s.errors or s.skipped:
            raise SystemExit(f"bench: pruned reported {s.errors[:3]} {s.skipped[:3]}")
    else:
        s = remove_tree(str(root.parent), root.name, dry_run=False, guards=Guards())
        n = s.files + s.dirs
        if s.errors or s.skipped:
            raise SystemExit(f"bench: pruned reported {s.errors[:3]} {s.skipped[:3]}")
    elapsed = time.perf_counter() - t
    left = sum(len(f) + len(d) for _, d, f in os.walk(root)) if root.exists() else 0
    if left:
        raise SystemExit(f"bench: {tool} left {left} entries in {root}")
    if root.exists():
        root.rmdir()
    return elapsed, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="100000,1000000")
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--fs", default="tmpfs,disk")
    ap.add_argument("--base", default="/var/tmp")
    ap.add_argument("--uid", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per tool")
    ap.add_argument("--disk-dir", default=None, help="use this dir as 'disk' (no loop image)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (mounts a tmpfs, creates files as another uid)", file=sys.stderr)
        return 1
    uid = a.uid if a.uid is not None else unused_uid()
    work = Path(tempfile.mkdtemp(prefix="pruned-bench-", dir=a.base))
    mnt = work / "tmpfs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8g,nr_inodes=0", "tmpfs", str(mnt)], check=True
    )
    disk = Path(a.disk_dir) if a.disk_dir else work / "disk"
    disk.mkdir(exist_ok=True)
    if not a.disk_dir and "disk" in a.fs:
        # This VM's root ext4 creates files at ~4 ms each (measured): building a 1M-file
        # tree there takes over an hour. A journaled ext4 in a loop image on the same disk
        # measures the filesystem's own removal cost instead.
        img = work / "ext4.img"
        subprocess.run(["truncate", "-s", "8G", str(img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "2500000", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(disk)], check=True)
    rows = []
    try:
        for fs in a.fs.split(","):
            where = mnt if fs == "tmpfs" else disk
            for files in (int(x) for x in a.files.split(",")):
                times: dict[str, float] = {}
                for tool in TOOLS:
                    best = None
                    for _ in range(a.repeat):
                        root = where / "tree"
                        build(root, files, a.dirs, uid)
                        sec, _ = run(tool, root, uid)
                        best = sec if best is None else min(best, sec)
                    assert best is not None
                    times[tool] = best
                    print(f"# {fs} {files} {tool}: {best:.2f}s", file=sys.stderr, flush=True)
                for tool in TOOLS:
                    rate = (files + a.dirs) / times[tool]
                    ratio = times["find -uid -delete"] / times[tool]
                    rows.append((fs, files, tool, times[tool], rate, ratio))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        if not a.disk_dir:
            subprocess.run(["umount", str(disk)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"uid {uid}, {a.dirs} dirs, kernel {os.uname().release}, {os.cpu_count()} cpus\n")
    print("| fs | files | tool | seconds | entries/s | vs find |")
    print("|---|---:|---|---:|---:|---:|")
    for fs, files, tool, sec, rate, ratio in rows:
        print(f"| {fs} | {files:,} | {tool} | {sec:.2f} | {rate:,.0f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
