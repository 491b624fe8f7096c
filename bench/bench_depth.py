"""Cost of pruned's file walk against the shapes a user controls: depth and width.

On a tmpfs this script mounts (and unmounts; nothing is made outside it), it builds
    - a chain ROOT/d/d/... of 1,000 / 10,000 / 100,000 levels (by fd: mkdirat + openat,
      closing as it goes, so building stays linear too),
    - 1,000,000 files in one directory, and 1,000,000 empty subdirectories in one directory,
and times `remove_tree` (the job-dir path) and `remove_owned_files` (the loose-files path),
dry-run and real, each in a forked child so its peak RSS (ru_maxrss) is its own. The child
also counts its real open fds (/proc/self/fd) every 256th directory it scans. Prints a
markdown table; "ratio" is CPU µs per level against the smallest depth's, same tool, same
run: linear cost means ~1.0 (CPU time, since wall time on a shared machine is mostly load).

    sudo .venv/bin/python bench/bench_depth.py [--depths 1000,10000,100000]
        [--width 1000000] [--repeat 3] [--base /var/tmp] [--skip-width]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruned.linux import fdwalk
from pruned.linux.fdremove import remove_owned_files, remove_tree
from pruned.linux.guards import Guards

O_DIR = os.O_RDONLY | os.O_DIRECTORY
MEMORY_MAX_MB = 256  # systemd/pruned.service MemoryMax=


def build_chain(parent: Path, name: str, levels: int) -> None:
    fd = os.open(parent, O_DIR)
    os.mkdir(name, dir_fd=fd)
    nfd = os.open(name, O_DIR, dir_fd=fd)
    os.close(fd)
    fd = nfd
    for _ in range(levels - 1):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", O_DIR, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    os.close(fd)


def build_wide(parent: Path, name: str, n: int, dirs: bool) -> None:
    (parent / name).mkdir()
    fd = os.open(parent / name, O_DIR)
    try:
        for i in range(n):
            if dirs:
                os.mkdir(f"s{i:07d}", dir_fd=fd)
            else:
                os.close(os.open(f"f{i:07d}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def in_child(fn: Callable[[], tuple[int, int]]) -> dict:
    """Run fn in a forked child: seconds, (files, dirs), peak extra fds, ru_maxrss MB."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            peak = [0]
            calls = [0]
            orig = fdwalk.Walker.scan

            def scan(self, frame, top):
                calls[0] += 1
                if calls[0] % 256 == 1:
                    peak[0] = max(peak[0], fd_count())
                return orig(self, frame, top)

            fdwalk.Walker.scan = scan  # type: ignore[method-assign]
            before = fd_count()
            t, c = time.perf_counter(), time.process_time()
            files, dirs = fn()
            sec, cpu = time.perf_counter() - t, time.process_time() - c
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out = dict(sec=sec, cpu=cpu, files=files, dirs=dirs, fds=peak[0] - before, rss=rss)
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        except BaseException as e:
            os.write(w, json.dumps(dict(error=repr(e))).encode())
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


def tree(where: Path, name: str, dry: bool) -> Callable[[], tuple[int, int]]:
    def fn() -> tuple[int, int]:
        s = remove_tree(str(where), name, dry_run=dry, guards=Guards())
        if s.errors or s.skipped:
            raise RuntimeError(f"remove_tree reported {s.errors[:3]} {s.skipped[:3]}")
        return s.files, s.dirs

    return fn


def owned(where: Path, name: str, dry: bool) -> Callable[[], tuple[int, int]]:
    def fn() -> tuple[int, int]:
        s = remove_owned_files(
            str(where / name), 0, min_age=0, now=time.time() + 60, dry_run=dry, guards=Guards()
        )
        if s.errors or s.skipped:
            raise RuntimeError(f"remove_owned_files reported {s.errors[:3]} {s.skipped[:3]}")
        return s.files, s.dirs

    return fn


def best(runs: list[dict]) -> dict:
    b = min(runs, key=lambda x: x["cpu"])
    return dict(
        b,
        sec=min(x["sec"] for x in runs),
        rss=max(x["rss"] for x in runs),
        fds=max(x["fds"] for x in runs),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="1000,10000,100000")
    ap.add_argument("--width", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the depth rows")
    ap.add_argument("--base", default="/var/tmp")
    ap.add_argument("--skip-width", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (mounts a tmpfs)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="pruned-bench-depth-", dir=a.base))
    mnt = work / "tmpfs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8g,nr_inodes=0,mode=0700", "tmpfs", str(mnt)],
        check=True,
    )
    rows: list[tuple[str, int, str, dict]] = []
    # remove_tree removes mnt/c itself; remove_owned_files walks mnt/top, which stays.
    where = {"remove_tree": (mnt, mnt, "c"), "remove_owned_files": (mnt / "top", mnt, "top")}
    tools = (("remove_tree", tree), ("remove_owned_files", owned))
    try:
        base_rss = in_child(lambda: (0, 0))["rss"]
        (mnt / "top").mkdir()
        for depth in (int(x) for x in a.depths.split(",")):
            for tool, make in tools:
                chain_parent, walk_parent, walk_name = where[tool]
                for dry in (True, False):
                    runs = []
                    for _ in range(a.repeat):
                        build_chain(chain_parent, "c", depth)
                        runs.append(in_child(make(walk_parent, walk_name, dry)))
                        if dry:  # cleaned up in a child too: the parent's RSS stays small
                            in_child(tree(chain_parent, "c", False))
                        if os.listdir(chain_parent) != (["top"] if chain_parent == mnt else []):
                            raise SystemExit(f"bench: left {os.listdir(chain_parent)}")
                    label = f"{tool} {'dry-run' if dry else 'real'}"
                    rows.append((f"depth {depth:,}", depth, label, best(runs)))
                    sec = rows[-1][3]["sec"]
                    print(f"# depth {depth} {label}: {sec:.2f}s", file=sys.stderr, flush=True)
        if not a.skip_width:
            n = a.width
            wide = mnt / "w"
            for shape, dirs in (("files in one dir", False), ("subdirs in one dir", True)):
                for tool, make in tools:
                    for dry in (True, False):
                        if wide.exists() and not any(os.scandir(wide)):
                            wide.rmdir()
                        if not wide.exists():
                            build_wide(mnt, "w", n, dirs)
                        res = in_child(make(mnt, "w", dry))
                        label = f"{tool} {'dry-run' if dry else 'real'}"
                        rows.append((f"{n:,} {shape}", n, label, res))
                        print(f"# {shape} {label}: {res['sec']:.2f}s", file=sys.stderr, flush=True)
                if wide.exists():
                    in_child(tree(mnt, "w", False))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"kernel {os.uname().release}, {os.cpu_count()} cpus, MAX_OPEN_FDS "
        f"{fdwalk.MAX_OPEN_FDS}, RSS of an idle child {base_rss:.1f} MB, MemoryMax "
        f"{MEMORY_MAX_MB} MB\n"
    )
    print(
        "| shape | tool | wall s | CPU s | CPU µs per level/entry | ratio (CPU) "
        "| peak fds | peak RSS MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    first: dict[str, float] = {}
    for shape, n, label, r in rows:
        per = r["cpu"] / n * 1e6
        ratio = "-"
        if shape.startswith("depth"):
            ratio = f"{per / first.setdefault(label, per):.2f}"
        print(
            f"| {shape} | {label} | {r['sec']:.2f} | {r['cpu']:.2f} | {per:.1f} | {ratio} "
            f"| {r['fds']} | {r['rss']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
