"""The fd walker at sizes a user controls: depth past the fd window, renames mid-walk, odd names.

Each test mounts its own tmpfs (the `tmpfs` fixture) and builds deep chains by fd, so no
path string ever gets long.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pruned.linux import dirfd, fdwalk
from pruned.linux.fdremove import remove_owned_files, remove_tree
from pruned.linux.guards import Guards
from tests.fixtures.tmpfs import make_dir, make_file, mount, snapshot_tree, umount_below

pytestmark = pytest.mark.root
O_DIR = os.O_RDONLY | os.O_DIRECTORY


def chain(top: Path, levels: int, *, every: int = 0, owner: int = 0) -> None:
    """top/d/d/... `levels` deep by fd, then a file `leaf`; with `every`, a file f and an
    empty dir s beside every every-th d. Everything created is chowned to `owner`."""

    def make(name: str, fd: int, directory: bool) -> None:
        if directory:
            os.mkdir(name, dir_fd=fd)
        else:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        if owner:
            os.chown(name, owner, -1, dir_fd=fd, follow_symlinks=False)

    fd = os.open(top, O_DIR)
    try:
        for i in range(levels):
            if every and i % every == 0:
                make("f", fd, False)
                make("s", fd, True)
            make("d", fd, True)
            nfd = os.open("d", O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        make("leaf", fd, False)
    finally:
        os.close(fd)


def open_at_depth(top: Path, depth: int) -> int:
    """fd of top/d/d/... `depth` names down (opened one level at a time)."""
    fd = os.open(top, O_DIR)
    for _ in range(depth):
        nfd = os.open("d", O_DIR | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def sample_fds(monkeypatch, every: int = 50) -> list[int]:
    """Count this process's real open fds before every `every`-th directory scan."""
    seen: list[int] = []
    calls = [0]
    orig = fdwalk.Walker.scan

    def scan(self, frame, top):
        calls[0] += 1
        if calls[0] % every == 0:
            seen.append(fd_count())
        return orig(self, frame, top)

    monkeypatch.setattr(fdwalk.Walker, "scan", scan)
    return seen


@pytest.mark.parametrize("dry_run", [True, False])
def test_chain_far_deeper_than_the_fd_window_goes_with_bounded_fds(
    tmpfs: Path, monkeypatch, dry_run
) -> None:
    cap = 16
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", cap)
    job = make_dir(tmpfs / "deep", 0, 0)
    levels = 30_000
    chain(job, levels, every=1000)  # side branches: the walk climbs back through '..' 30 times
    before = fd_count()
    seen = sample_fds(monkeypatch)
    s = remove_tree(str(tmpfs), "deep", dry_run=dry_run, guards=Guards())
    assert s.errors == [] and s.skipped == []
    assert (s.files, s.dirs) == (1 + 30, 1 + levels + 30)
    assert s.removed_root
    assert job.exists() == dry_run
    assert fd_count() == before  # nothing leaked
    # The walk's own fds (the parent of the job dir and the window) never pass the cap; the
    # sampling really saw the window fill (else this test could not fail).
    peak = max(seen) - before
    assert cap - 2 <= peak <= cap + 1, (peak, cap)
    if dry_run:
        assert remove_tree(str(tmpfs), "deep", dry_run=False, guards=Guards()).removed_root


def test_owned_files_walk_is_bounded_too(tmpfs: Path, user_a, monkeypatch) -> None:
    cap = 8
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", cap)
    root = make_dir(tmpfs / "root", 0, 0, 0o1777)
    top = make_dir(root / "mine", user_a.uid, user_a.gid)
    chain(top, 5000, every=500, owner=user_a.uid)
    before = fd_count()
    seen = sample_fds(monkeypatch)
    s = remove_owned_files(
        str(root), user_a.uid, min_age=0, now=time.time() + 60, dry_run=False, guards=Guards()
    )
    assert s.errors == [] and s.skipped == []
    assert os.listdir(root) == []
    assert cap - 2 <= max(seen) - before <= cap + 1, (seen, cap)
    assert fd_count() == before


def test_subtree_moved_outside_mid_walk_is_never_followed_out(tmpfs: Path, monkeypatch) -> None:
    """The owner moves a deep ancestor (its fd closed by the window) out of the job dir while
    the walk is far below it: climbing back, '..' of that ancestor is the outside dir, which
    fails the (dev, ino) check, so the walk stops there; nothing outside is touched."""
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", 8)
    outside = make_dir(tmpfs / "outside", 0, 0)
    for i in range(5):
        make_file(outside / f"precious{i}", 0, 0, b"keep")
    make_dir(outside / "sub", 0, 0)
    make_file(outside / "sub" / "precious", 0, 0, b"keep")
    base = make_dir(tmpfs / "root", 0, 0)
    job = make_dir(base / "work", 0, 0)
    chain(job, 3000)
    at, moved_at = 2500, 1000
    orig = fdwalk.Walker.scan
    moved: list[int] = []

    def scan(self, frame, top):
        if frame.depth == at and not moved:
            # the walk holds only the last 8 levels: level moved_at's fd is closed now
            assert self.open_fds <= 8
            pfd = open_at_depth(job, moved_at - 1)
            ofd = os.open(outside, O_DIR)
            try:
                # Same name outside: a walk that trusted '..' would rmdir outside/d.
                os.rename("d", "d", src_dir_fd=pfd, dst_dir_fd=ofd)
            finally:
                os.close(pfd)
                os.close(ofd)
            moved.append(frame.depth)
        return orig(self, frame, top)

    monkeypatch.setattr(fdwalk.Walker, "scan", scan)
    keep = snapshot_tree(outside)
    s = remove_tree(str(base), "work", dry_run=False, guards=Guards())
    assert moved, "the walk never got deep enough to be raced"
    assert any("moved out of its directory" in why for _, why in s.errors), s.errors
    assert not s.removed_root
    after = snapshot_tree(outside)
    assert {p: v for p, v in after.items() if not str(p).startswith("d")} == keep, after.keys()
    assert (outside / "d").is_dir()  # the moved directory itself stays where it went
    assert job.is_dir()  # the walk stopped: the part above the moved dir was not emptied


def test_deep_bind_mount_is_found_without_statx_mount_ids(tmpfs: Path, monkeypatch) -> None:
    """Kernels before 5.8 have no STATX_MNT_ID: the walk then matches mount point paths,
    at any depth (the trie), for both entry points."""
    orig = dirfd.Statx.__call__
    monkeypatch.setattr(dirfd.Statx, "__call__", lambda self, fd: (*orig(self, fd)[:2], None))
    precious = make_dir(tmpfs / "same-fs", 0, 0)
    make_file(precious / "keep", 0, 0, b"tmpfs")
    job = make_dir(tmpfs / "job", 0, 0)
    chain(job, 60)
    deep = Path(str(job) + "/d" * 40)
    make_dir(deep / "m", 0, 0)
    try:
        mount("--bind", str(precious), str(deep / "m"))
        before = snapshot_tree(precious)
        dry = remove_owned_files(
            str(job), 0, min_age=0, now=time.time() + 60, dry_run=True, guards=Guards()
        )
        assert [w for _, w in dry.skipped] == ["mount point"], dry.skipped
        s = remove_tree(str(tmpfs), "job", dry_run=False, guards=Guards())
        assert snapshot_tree(precious) == before
        ((path, why),) = s.skipped
        assert why == "mount point" and path.startswith("job/d/d/d/…/") and path.endswith("/d/m")
        assert not (deep / "d").exists()  # the chain below the mount point's sibling went
    finally:
        umount_below(job)


def test_names_are_bytes_exact_and_up_to_255_long(tmpfs: Path) -> None:
    job = make_dir(tmpfs / "job", 0, 0)
    jfd = os.open(job, O_DIR)
    names = [b"\xff\xfe-not-utf8", b"x" * 255, b"caf\xc3\xa9", b"new\nline", b"\x80" * 255]
    try:
        for n in names:
            os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=jfd))
            os.mkdir(b"D" + n[:254], dir_fd=jfd)
            sub = os.open(b"D" + n[:254], O_DIR, dir_fd=jfd)
            os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=sub))
            os.mknod(b"p" + n[:254], 0o600 | stat.S_IFIFO, dir_fd=sub)  # kept: says its name
            os.close(sub)
    finally:
        os.close(jfd)
    s = remove_tree(str(tmpfs), "job", dry_run=True, max_listed=100, guards=Guards())
    listed = {os.fsencode(p) for p in s.listed}
    for n in names:
        assert b"job/" + n in listed
        assert b"job/D" + n[:254] + b"/" + n in listed
    kept = {os.fsencode(p) for p, why in s.skipped if why == "fifo"}
    assert kept == {b"job/D" + n[:254] + b"/p" + n[:254] for n in names}
    s = remove_tree(str(tmpfs), "job", dry_run=False, guards=Guards())
    assert s.errors == [] and (s.files, s.dirs) == (2 * len(names), 0)
    assert sorted(os.listdir(os.fsencode(job))) == sorted(b"D" + n[:254] for n in names)
    for n in names:
        assert os.listdir(os.fsencode(job) + b"/D" + n[:254]) == [b"p" + n[:254]]


def test_wide_directory_of_subdirectories(tmpfs: Path) -> None:
    job = make_dir(tmpfs / "wide", 0, 0)
    jfd = os.open(job, O_DIR)
    try:
        for i in range(20_000):
            os.mkdir(f"s{i}", dir_fd=jfd)
        os.mkdir("s7/inner", dir_fd=jfd)
        os.mknod("s7/inner/fifo", 0o600 | stat.S_IFIFO, dir_fd=jfd)
    finally:
        os.close(jfd)
    s = remove_tree(str(tmpfs), "wide", dry_run=False, max_listed=5, guards=Guards())
    assert s.skipped == [("wide/s7/inner/fifo", "fifo")]
    assert s.dirs == 20_000 - 1 and s.errors == []
    assert os.listdir(job) == ["s7"] and len(s.listed) == 5


MOVER = textwrap.dedent("""
    import os, sys, time
    root, outside, levels, at, uid, gid, ready, stop = sys.argv[1:9]
    levels, at = int(levels), int(at)
    os.chdir(root)  # the tmp path above is 0700: keep cwd, then drop to the user
    ofd = os.open(outside, os.O_RDONLY | os.O_DIRECTORY)
    os.setgroups([]); os.setresgid(int(gid), int(gid), int(gid))
    os.setresuid(int(uid), int(uid), int(uid))
    D = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    def build():
        os.mkdir("work")
        fd = os.open("work", D)
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            n = os.open("d", D, dir_fd=fd); os.close(fd); fd = n
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        os.close(fd)
    inner = "work/" + "d/" * (at - 1)
    open(ready, "w").close()
    rounds = moves = 0
    while not os.path.exists(stop):
        try:
            if not os.path.lexists("work"):
                build()
                rounds += 1
            # the deep subtree out of the tree and back in, as fast as it goes
            os.rename(inner + "d", "m", src_dir_fd=None, dst_dir_fd=ofd)
            moves += 1
            os.rename("m", inner + "d", src_dir_fd=ofd)
        except OSError:
            time.sleep(0.0005)
    print(rounds, moves)
""")


def test_owner_moving_a_deep_subtree_in_and_out_never_loses_outside_files(
    tmpfs: Path, user_a, monkeypatch
) -> None:
    """A real user moves a deep subtree of its job dir to a dir outside it and back, over and
    over, while the cleaner walks with a 4-fd window: what sits outside stays, whatever the
    timing; the cleaner reports the moves it caught."""
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", 4)
    outside = make_dir(tmpfs / "outside", user_a.uid, user_a.gid, 0o755)
    for i in range(10):
        make_file(outside / f"own{i}", user_a.uid, user_a.gid, b"mine", mtime=1)
    sentinel = make_dir(outside / "sentinel", 0, 0, 0o755)  # root's: the user cannot move it
    for i in range(10):
        make_file(sentinel / f"s{i}", user_a.uid, user_a.gid, b"precious", mtime=1)
    root = make_dir(tmpfs / "root", 0, 0, 0o1777)

    def outside_now() -> tuple[list[str], dict, dict]:
        # `m` is the mover's own subtree while it is outside; never walk into it (it moves)
        names = sorted(n for n in os.listdir(outside) if n != "m")
        own = {n: (outside / n).read_bytes() for n in names if n.startswith("own")}
        return names, own, snapshot_tree(sentinel)

    before = outside_now()
    ready, stop = tmpfs / "ready", tmpfs / "stop"
    mover = subprocess.Popen(
        [sys.executable, "-c", MOVER, str(root), str(outside), "200", "20",
         str(user_a.uid), str(user_a.gid), "../ready", "../stop"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rounds = removed = raced = 0
    deadline = time.monotonic() + 60
    try:
        while not ready.exists() and mover.poll() is None:
            time.sleep(0.005)
        while mover.poll() is None and time.monotonic() < deadline and (rounds < 300 or not raced):
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
            assert outside_now() == before
    finally:
        stop.touch()
        try:
            out, err = mover.communicate(timeout=30)
        finally:
            if mover.poll() is None:
                mover.kill()
    assert mover.returncode == 0, err
    built, moves = (int(x) for x in out.split())
    print(f"mover: {built} trees, {moves} moves; cleaner: {rounds} rounds, {removed} removed, "
          f"{raced} races seen")  # fmt: skip
    assert rounds >= 5 and removed > 0 and moves > 0 and built >= 2, (rounds, removed, moves)
    assert raced > 0, "the cleaner never met a move: the test did not race"
