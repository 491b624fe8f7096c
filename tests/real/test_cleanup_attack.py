"""A hostile user races the cleaner: nothing outside the cleaned root may ever be touched.

The attacker runs as a real test user and swaps directories inside the tree for symlinks
to a sentinel directory outside it (RENAME_EXCHANGE, and the classic rename/symlink dance)
while the cleaner runs round after round. PRUNED_ATTACK_ITERS sets the attacker's
iterations (default 10,000).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pruned.linux import fdwalk
from pruned.linux.fdremove import remove_owned_files, remove_tree
from pruned.linux.guards import Guards
from tests.fixtures.tmpfs import make_dir, make_file, snapshot_tree

pytestmark = pytest.mark.root
ITERS = int(os.environ.get("PRUNED_ATTACK_ITERS", "10000"))
OLD = time.time() - 10 * 86400

ATTACKER = textwrap.dedent("""
    import ctypes, os, sys
    root, sentinel, iters, uid, gid, ready = sys.argv[1:7]
    os.chdir(root)  # root's path is not traversable by the user: keep it as cwd, then drop
    os.setgroups([]); os.setresgid(int(gid), int(gid), int(gid))
    os.setresuid(int(uid), int(uid), int(uid))
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    def exchange(a, b):
        return libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    def bait(d):
        os.makedirs(d, exist_ok=True)
        with open(d + "/bait", "w") as f:
            f.write("b")
        os.utime(d + "/bait", (1, 1))
    open(ready, "w").close()
    done = swaps = 0
    for i in range(int(iters)):
        try:
            bait("work/a/d")
            bait("work/b")
            if not os.path.lexists("work/a/l"):
                os.symlink(sentinel, "work/a/l")
            # 1. atomic swap of a directory and a symlink to the sentinel, back and forth
            for _ in range(4):
                swaps += exchange(b"work/a/d", b"work/a/l") == 0
            # 2. the classic dance: move the dir away, put a symlink in its place, restore
            os.rename("work/b", "work/x")
            os.symlink(sentinel, "work/b")
            os.unlink("work/b")
            os.rename("work/x", "work/b")
            # 3. the whole top directory swapped for a symlink
            if not os.path.lexists("wl"):
                os.symlink(sentinel, "wl")
            swaps += exchange(b"work", b"wl") == 0
            swaps += exchange(b"work", b"wl") == 0
        except OSError:
            pass
        done += 1
    print(done, swaps)
""")


def sentinel_tree(base: Path, uid: int, gid: int) -> Path:
    """A root-owned dir outside the cleaned root, full of old files owned by the attacker."""
    s = make_dir(base / "sentinel", 0, 0, 0o755)
    for i in range(20):
        make_file(s / f"s{i}", uid, gid, b"precious %d" % i, mtime=OLD)
    sub = make_dir(s / "d", uid, gid)
    make_file(sub / "bait", uid, gid, b"precious", mtime=OLD)
    os.utime(sub, (OLD, OLD))
    return s


def test_symlink_swap_race_never_reaches_the_sentinel(tmpfs: Path, user_a, monkeypatch) -> None:
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", 3)  # exercise the '..' re-open path too
    sentinel = sentinel_tree(tmpfs, user_a.uid, user_a.gid)
    root = make_dir(tmpfs / "root", 0, 0, 0o1777)
    make_dir(root / "work", user_a.uid, user_a.gid)
    before = snapshot_tree(sentinel)
    ready = tmpfs / "ready"
    attacker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ATTACKER,
            str(root),
            str(sentinel),
            str(ITERS),
            str(user_a.uid),
            str(user_a.gid),
            "../ready",
        ],  # relative: tmp_path is 0700
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rounds = removed = raced = 0
    deadline = time.monotonic() + 120
    try:
        while not ready.exists() and attacker.poll() is None:
            time.sleep(0.005)
        while attacker.poll() is None and time.monotonic() < deadline:
            g = Guards()
            for s in (
                remove_tree(str(root), "work", dry_run=False, guards=g),
                remove_owned_files(
                    str(root), user_a.uid, min_age=0, now=time.time() + 60, dry_run=False, guards=g
                ),
            ):
                removed += s.files + s.dirs
                raced += s.raced
            rounds += 1
            assert snapshot_tree(sentinel) == before
    finally:
        if attacker.poll() is None:
            attacker.kill()
        out, err = attacker.communicate()
    assert attacker.returncode == 0, err
    done, swaps = (int(x) for x in out.split())
    print(
        f"attacker: {done} iterations, {swaps} swaps; cleaner: {rounds} rounds, "
        f"{removed} entries removed, {raced} races seen"
    )
    assert done == ITERS, "the attacker must run to the end"
    assert rounds >= 2 and removed > 0, "the cleaner must really have raced the attacker"
    assert snapshot_tree(sentinel) == before


def _swap_before_open(monkeypatch, action) -> None:
    """Run `action(frame, name)` right between the listing's lstat and the open."""
    orig = fdwalk.Walker._open_child

    def hooked(self, frame, name, dev, ino):
        action(name)
        return orig(self, frame, name, dev, ino)

    monkeypatch.setattr(fdwalk.Walker, "_open_child", hooked)


@pytest.mark.parametrize("how", ["symlink", "other-dir"])
def test_swap_between_lstat_and_open_is_caught(tmpfs: Path, user_a, monkeypatch, how) -> None:
    sentinel = sentinel_tree(tmpfs, user_a.uid, user_a.gid)
    root = make_dir(tmpfs / "root", 0, 0, 0o1777)
    work = make_dir(root / "work", user_a.uid, user_a.gid)
    make_dir(work / "d", user_a.uid, user_a.gid)
    before = snapshot_tree(sentinel)
    swapped = []

    def swap(name: str) -> None:
        if name == "d" and not swapped:
            os.rename(work / "d", work / "moved")
            if how == "symlink":
                os.symlink(sentinel, work / "d")
            else:  # a different directory in its place: fails the (dev, ino) check
                os.rename(sentinel / "d", work / "d")
            swapped.append(name)

    _swap_before_open(monkeypatch, swap)
    s = remove_owned_files(str(root), user_a.uid, min_age=0, now=time.time() + 60, dry_run=False)
    why = "changed during the walk" if how == "symlink" else "replaced during the walk"
    assert ("work/d", why) in s.skipped and s.raced >= 1
    if how == "other-dir":
        os.rename(work / "d", sentinel / "d")
    assert snapshot_tree(sentinel) == before
