"""pruned.linux.fdwalk on real filesystems: a tmpfs per test, real users, real mounts and locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pruned.act.remove import execute_cleanup
from pruned.linux import fdwalk
from pruned.linux.dirfd import WalkError, container_nodes, open_dir_path
from pruned.linux.fdremove import remove_owned_files, remove_tree
from pruned.linux.guards import parse_locks, parse_unix_sockets, read_guards
from pruned.model import CleanupKind, Result
from pruned.rules.cleanplan import CleanupPlan, JobDirItem
from tests.fixtures.paths import REPO
from tests.fixtures.tmpfs import make_dir, make_file, mount, snapshot_tree, umount_below

pytestmark = pytest.mark.root
OLD = time.time() - 10 * 86400


def deep_tree(top: Path, levels: int) -> None:
    """top/d/d/d... `levels` deep, built by fd so no path gets too long."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- remove_tree


def test_removes_read_only_and_deep_subtrees_and_only_the_symlink(tmpfs: Path, user_a) -> None:
    outside = make_file(tmpfs / "target.txt", 0, 0, b"keep me")
    job = make_dir(tmpfs / "slurm-7", user_a.uid, user_a.gid, 0o700)
    ro = make_dir(job / "ro", user_a.uid, user_a.gid)
    for i in range(5):
        make_file(ro / f"f{i}", user_a.uid, user_a.gid, b"y" * 8192, mode=0o400)
    inner = make_dir(ro / "inner", user_a.uid, user_a.gid)
    make_file(inner / "g", user_a.uid, user_a.gid, mode=0o400)
    os.chmod(inner, 0o500)
    os.chmod(ro, 0o500)
    os.symlink(outside, job / "link")
    os.symlink(tmpfs, job / "dirlink")  # a symlink to a directory: unlinked, never entered
    deep_tree(job, 2500)
    before = os.stat(outside)

    s = remove_tree(str(tmpfs), "slurm-7", dry_run=False)

    assert s.errors == [] and s.skipped == []
    assert s.removed_root and not job.exists()
    assert s.files == 5 + 1 + 2 + 1  # ro files, inner/g, two links, the deep leaf
    assert s.dirs == 1 + 2 + 2500  # the job dir, ro, inner, the deep chain
    assert s.bytes >= 5 * 8192
    assert outside.read_bytes() == b"keep me"
    assert os.stat(outside).st_mtime_ns == before.st_mtime_ns
    assert 0 < len(s.listed) <= 20


def test_dry_run_walks_the_same_path_and_removes_nothing(tmpfs: Path) -> None:
    job = make_dir(tmpfs / "slurm-8", 0, 0)
    for i in range(30):
        make_file(job / f"f{i}", 0, 0)
    make_dir(job / "sub", 0, 0)
    before = snapshot_tree(tmpfs)
    dry = remove_tree(str(tmpfs), "slurm-8", dry_run=True, max_listed=5)
    assert snapshot_tree(tmpfs) == before
    assert (dry.files, dry.dirs, len(dry.listed)) == (30, 2, 5), dry
    real = remove_tree(str(tmpfs), "slurm-8", dry_run=False)
    assert (real.files, real.dirs) == (dry.files, dry.dirs)
    assert not job.exists()


def test_ten_thousand_levels_with_few_fds(tmpfs: Path, monkeypatch) -> None:
    # Ancestors beyond the cap are closed and re-opened through '..' (verified by inode).
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", 8)
    job = make_dir(tmpfs / "deep", 0, 0)
    deep_tree(job, 10_000)
    fds_before = len(os.listdir("/proc/self/fd"))
    s = remove_tree(str(tmpfs), "deep", dry_run=False)
    assert s.errors == [] and s.removed_root
    assert s.dirs == 10_001 and s.files == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before  # no fd leaked


@pytest.mark.parametrize("cap", [1, 2])
def test_frame_being_scanned_stays_open_below_any_fd_cap(tmpfs: Path, monkeypatch, cap) -> None:
    # _close_oldest never closes the top frame (the one whose subdirs are being opened),
    # even when the cap leaves nothing else to close: siblings at every level, both walks.
    monkeypatch.setattr(fdwalk, "MAX_OPEN_FDS", cap)
    job = make_dir(tmpfs / "deep", 0, 0)
    deep_tree(job, 40)
    for sub in ("a", "b"):
        deep_tree(make_dir(job / "d" / sub, 0, 0), 5)
    fds_before = len(os.listdir("/proc/self/fd"))
    s = remove_owned_files(str(job), 0, min_age=0, now=time.time() + 60, dry_run=True)
    assert s.errors == [] and (s.files, s.dirs) == (3, 40 + 2 + 10)
    s = remove_tree(str(tmpfs), "deep", dry_run=False)
    assert s.errors == [] and s.removed_root and (s.files, s.dirs) == (3, 1 + 40 + 2 + 10)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_kept_fifo_device_live_socket_and_locked_file(tmpfs: Path, tmp_path: Path) -> None:
    job = make_dir(tmpfs / "slurm-9", 0, 0)
    os.mkfifo(job / "fifo")
    os.mknod(job / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    make_file(job / "locked", 0, 0, b"lock")
    make_file(job / "plain", 0, 0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(job / "live.sock"))
    listener.listen()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(job / "dead.sock"))
    dead.close()  # the file stays, nobody holds the socket: garbage
    ready = tmp_path / "locked-ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import fcntl, time
        f = open({str(job / "locked")!r}, "rb")
        fcntl.flock(f, fcntl.LOCK_EX)
        open({str(ready)!r}, "w").close()
        time.sleep(60)
    """),
        ]
    )
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.02)
        s = remove_tree(str(tmpfs), "slurm-9", dry_run=False)
    finally:
        holder.kill()
        holder.wait()
        listener.close()
    why = dict(s.skipped)
    assert why == {
        "slurm-9/fifo": "fifo",
        "slurm-9/null": "device node",
        "slurm-9/locked": "locked",
        "slurm-9/live.sock": "socket in use",
    }
    assert sorted(os.listdir(job)) == ["fifo", "live.sock", "locked", "null"]
    assert not s.removed_root and s.errors == []
    # With the lock released and the listener closed, the next sweep takes them.
    s2 = remove_tree(str(tmpfs), "slurm-9", dry_run=False)
    assert sorted(os.listdir(job)) == ["fifo", "null"]
    assert s2.files == 2


def test_bind_mounts_are_not_crossed(tmpfs: Path, tmp_path: Path) -> None:
    # Another filesystem bound in (different st_dev) and the same tmpfs bound in (same
    # st_dev, different mount id): both must be left alone, contents intact.
    other = tmp_path / "other-fs"
    other.mkdir()
    (other / "precious").write_text("disk")
    same = make_dir(tmpfs / "same-fs", 0, 0)
    (same / "precious").write_text("tmpfs")
    job = make_dir(tmpfs / "slurm-10", 0, 0)
    make_dir(job / "a" / "m1", 0, 0)
    make_dir(job / "m2", 0, 0)
    make_file(job / "a" / "f", 0, 0)
    try:
        mount("--bind", str(other), str(job / "a" / "m1"))
        mount("--bind", str(same), str(job / "m2"))
        before = (snapshot_tree(other), snapshot_tree(same))
        s = remove_tree(str(tmpfs), "slurm-10", dry_run=False)
        assert (snapshot_tree(other), snapshot_tree(same)) == before
        assert dict(s.skipped) == {
            "slurm-10/a/m1": "other filesystem",
            "slurm-10/m2": "mount point",
        }
        assert not (job / "a" / "f").exists()
        assert s.errors == [] and not s.removed_root
    finally:
        umount_below(job)


def test_hard_link_to_an_outside_file_loses_only_the_link(tmpfs: Path) -> None:
    outside = make_file(tmpfs / "outside", 0, 0, b"data")
    job = make_dir(tmpfs / "slurm-11", 0, 0)
    os.link(outside, job / "hl")
    assert os.stat(outside).st_nlink == 2
    s = remove_tree(str(tmpfs), "slurm-11", dry_run=False)
    assert s.removed_root and s.files == 1 and s.bytes == 0  # no space freed by a link
    assert outside.read_bytes() == b"data" and os.stat(outside).st_nlink == 1


def test_owner_check_and_non_directories(tmpfs: Path, user_a, user_b) -> None:
    make_dir(tmpfs / "slurm-12", user_b.uid, user_b.gid)
    s = remove_tree(str(tmpfs), "slurm-12", dry_run=False, owners=(user_a.uid, 0))
    assert s.skipped == [("slurm-12", f"owned by uid {user_b.uid}")]
    assert (tmpfs / "slurm-12").is_dir()
    os.symlink(tmpfs / "slurm-12", tmpfs / "slurm-13")
    s = remove_tree(str(tmpfs), "slurm-13", dry_run=False)
    assert s.skipped == [("slurm-13", "not a directory")] and (tmpfs / "slurm-12").is_dir()
    assert remove_tree(str(tmpfs), "absent", dry_run=False).skipped == []
    with pytest.raises(WalkError):
        remove_tree(str(tmpfs), "../x", dry_run=False)


def test_open_dir_path_refuses_symlinks_anywhere(tmpfs: Path) -> None:
    make_dir(tmpfs / "real" / "sub", 0, 0)
    os.symlink(tmpfs / "real", tmpfs / "link")
    os.close(open_dir_path(str(tmpfs / "real" / "sub")))
    with pytest.raises(WalkError, match="symlink"):
        open_dir_path(str(tmpfs / "link" / "sub"))
    with pytest.raises(WalkError, match="symlink"):
        open_dir_path(str(tmpfs / "link"))
    with pytest.raises(WalkError):
        open_dir_path("relative/path")


def test_user_without_dac_override_removes_own_read_only_tree(tmpfs: Path, user_a) -> None:
    # Root never needs chmod (CAP_DAC_OVERRIDE); a process without it must fchmod the
    # directories the owner made 0500/0000 before it can empty them.
    job = make_dir(tmpfs / "own", user_a.uid, user_a.gid, 0o700)
    sub = make_dir(job / "ro", user_a.uid, user_a.gid)
    make_file(sub / "f", user_a.uid, user_a.gid, mode=0o400)
    locked = make_dir(job / "closed", user_a.uid, user_a.gid)
    make_file(locked / "g", user_a.uid, user_a.gid)
    os.chmod(sub, 0o500)
    os.chmod(locked, 0o000)
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from pruned.linux.fdremove import remove_tree
        from pruned.linux.guards import Guards
        fd = os.open({str(tmpfs)!r}, os.O_RDONLY | os.O_DIRECTORY)
        os.setgroups([]); os.setresgid({user_a.gid}, {user_a.gid}, {user_a.gid})
        os.setresuid({user_a.uid}, {user_a.uid}, {user_a.uid})
        s = remove_tree(fd, "own", dry_run=False, guards=Guards())
        print(s.files, s.dirs, s.errors, s.skipped)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["2", "3"], r.stdout
    assert not job.exists()


# ---------------------------------------------------------------- remove_owned_files


def test_owned_files_only_old_ones_of_that_uid(tmpfs: Path, user_a, user_b) -> None:
    a, b = user_a, user_b
    make_file(tmpfs / "a-old", a.uid, a.gid, mtime=OLD)
    make_file(tmpfs / "a-young", a.uid, a.gid, mtime=time.time() + 3600)
    make_file(tmpfs / "b-old", b.uid, b.gid, mtime=OLD)
    make_file(tmpfs / "root-old", 0, 0, mtime=OLD)
    whole = make_dir(tmpfs / "a-dir", a.uid, a.gid)
    make_file(whole / "x", a.uid, a.gid, mtime=OLD)
    make_dir(whole / "y", a.uid, a.gid)
    mixed = make_dir(tmpfs / "a-mixed", a.uid, a.gid)
    make_file(mixed / "mine", a.uid, a.gid, mtime=OLD)
    make_file(mixed / "theirs", b.uid, b.gid, mtime=OLD)
    theirs = make_dir(tmpfs / "b-dir", b.uid, b.gid)
    make_file(theirs / "a-in-b", a.uid, a.gid, mtime=OLD)  # not descended: b's directory
    for p in (whole / "y", whole, mixed):
        os.utime(p, (OLD, OLD))

    now = time.time() + 100  # ctimes are "now"; shift the clock instead of the files
    s = remove_owned_files(str(tmpfs), a.uid, min_age=50, now=now, dry_run=False)

    left = sorted(os.listdir(tmpfs))
    assert left == ["a-mixed", "a-young", "b-dir", "b-old", "root-old"]
    assert os.listdir(mixed) == ["theirs"] and os.listdir(theirs) == ["a-in-b"]
    assert (s.files, s.dirs) == (3, 2)
    assert dict(s.skipped) == {
        "a-young": "younger than min_age",
        "a-mixed/theirs": f"owned by uid {b.uid}",
    }
    assert tmpfs.is_dir()


def test_recent_ctime_keeps_a_file_with_an_old_mtime(tmpfs: Path, user_a) -> None:
    # A freshly extracted tarball has old mtimes; its ctime says it is new.
    make_file(tmpfs / "untarred", user_a.uid, user_a.gid, mtime=OLD)
    s = remove_owned_files(str(tmpfs), user_a.uid, min_age=3600, now=time.time(), dry_run=False)
    assert (tmpfs / "untarred").exists() and s.files == 0
    assert s.skipped == [("untarred", "younger than min_age")]


def test_owned_files_dry_run_matches_real_run(tmpfs: Path, user_a) -> None:
    d = make_dir(tmpfs / "d", user_a.uid, user_a.gid)
    for i in range(50):
        make_file(d / f"f{i}", user_a.uid, user_a.gid, b"z" * 100)
    kw = dict(min_age=1, now=time.time() + 60, max_listed=3)
    before = snapshot_tree(tmpfs)
    dry = remove_owned_files(str(tmpfs), user_a.uid, dry_run=True, **kw)
    assert snapshot_tree(tmpfs) == before
    real = remove_owned_files(str(tmpfs), user_a.uid, dry_run=False, **kw)
    assert (
        (dry.files, dry.dirs, dry.bytes)
        == (real.files, real.dirs, real.bytes)
        == (50, 1, real.bytes)
    )
    assert len(dry.listed) == 3 and os.listdir(tmpfs) == []


# ---------------------------------------------------------------- job_container leftovers


def test_job_container_mounts_are_detached_then_removed(tmpfs: Path, user_a) -> None:
    """BasePath/<node>/<job>: bind mount on itself, nsfs on .ns, user's .<job> inside."""
    base = make_dir(tmpfs / "jc", 0, 0, 0o700)
    node = make_dir(base / "vm", 0, 0, 0o700)
    jdir = make_dir(node / "77", 0, 0, 0o700)
    keeper = subprocess.Popen(["unshare", "--mount", "sleep", "300"])
    try:
        for _ in range(100):  # wait until the child is in its own mount namespace
            if os.readlink(f"/proc/{keeper.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                break
            time.sleep(0.02)
        mount("--bind", str(jdir), str(jdir))
        (jdir / ".ns").touch()
        mount("--bind", f"/proc/{keeper.pid}/ns/mnt", str(jdir / ".ns"))
        priv = make_dir(jdir / ".77", user_a.uid, 0, 0o700)
        make_file(priv / "out.dat", user_a.uid, user_a.gid, b"q" * 4096)
        shm = make_dir(jdir / "shm", 0, 0)
        mount("-t", "tmpfs", "tmpfs", str(shm))
        (shm / "seg").write_text("s")
        with open("/proc/self/mountinfo") as f:
            assert sum(str(jdir) in line for line in f) == 3

        plan = CleanupPlan(
            job_dirs=(JobDirItem("77", user_a.uid, str(jdir), "ended", container=True),),
            loose=(),
            held=(),
            now=time.time(),
            min_age=0,
            max_listed=20,
        )
        (dry,) = execute_cleanup(plan, dry_run=True)
        assert dry.result == Result.WOULD and "would detach 3 mounts" in dry.detail
        assert (priv / "out.dat").exists()

        (out,) = execute_cleanup(plan, dry_run=False)
        assert out.result == Result.DONE, out
        assert "detached 3 mounts" in out.detail
        assert not jdir.exists() and node.is_dir()
        with open("/proc/self/mountinfo") as f:
            assert str(jdir) not in f.read()
        assert container_nodes(str(base)) == ["vm"]
    finally:
        keeper.kill()
        keeper.wait()
        umount_below(jdir)


def test_execute_reports_absent_and_unsafe_paths(tmpfs: Path) -> None:
    os.symlink(tmpfs, tmpfs / "link")
    plan = CleanupPlan(
        job_dirs=(
            JobDirItem("1", 40000, str(tmpfs / "nope"), "ended"),
            JobDirItem("2", 40000, str(tmpfs / "link" / "x"), "ended"),
        ),
        loose=(),
        held=(),
        now=time.time(),
        min_age=0,
        max_listed=20,
    )
    absent, unsafe = execute_cleanup(plan, dry_run=False)
    assert absent.result == Result.GONE
    assert unsafe.result == Result.FAILED and "symlink" in unsafe.errors[0]


# ---------------------------------------------------------------- guards parsing


def test_parse_locks_and_sockets() -> None:
    locks = textwrap.dedent("""\
        1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF
        2: POSIX  ADVISORY  READ 17 fd:01:99 0 EOF
        2: -> POSIX  ADVISORY  WRITE 18 fd:01:99 0 EOF
        3: OFDLCK ADVISORY  READ -1 00:05:77 0 EOF
    """)
    mk = os.makedev
    assert parse_locks(locks) == {(mk(0, 0x2D), 1234), (mk(0xFD, 1), 99), (mk(0, 5), 77)}
    unix = textwrap.dedent("""\
        Num       RefCount Protocol Flags    Type St Inode Path
        0000000000000000: 00000002 00000000 00010000 0001 01 12 /run/a b.sock
        0000000000000000: 00000002 00000000 00010000 0001 01 13 @abstract
        0000000000000000: 00000002 00000000 00010000 0001 01 14 rel.sock
        0000000000000000: 00000003 00000000 00000000 0001 03 15
    """)
    assert parse_unix_sockets(unix) == {"a b.sock", "rel.sock"}


def test_read_guards_sees_a_real_lock(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_text("x")
    with open(p) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        st = os.stat(p)
        assert (st.st_dev, st.st_ino) in read_guards().locked


# ---------------------------------------------------------------- plan + execute, end to end


def _live_uids() -> set[int]:
    uids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(FileNotFoundError):
                uids.add(os.stat(f"/proc/{name}").st_uid)
    return uids


def test_sweep_end_to_end_with_real_users(tmpfs: Path, make_user) -> None:
    from pruned.model import CleanupPolicy
    from pruned.rules.cleanplan import plan_cleanup
    from tests.fixtures.users import alive, daemon_as

    busy, idle, stranger = make_user("prc"), make_user("prc"), make_user("prc")
    root = make_dir(tmpfs / "tmp", 0, 0, 0o1777)
    for u in (busy, idle, stranger):
        make_file(root / f"loose-{u.name}", u.uid, u.gid, mtime=OLD)
    for u, job in ((busy, "101"), (idle, "102")):
        d = make_dir(root / f"slurm-{job}", u.uid, u.gid, 0o700)
        make_file(d / "out", u.uid, u.gid)
    pid = daemon_as(busy, f"pruned-live-{busy.name}")
    try:
        policy = CleanupPolicy(
            roots=(str(root),), job_dirs=(f"{root}/slurm-{{job_id}}",), min_age=10
        )
        now = time.time() + 100
        ended = [
            type(
                "R", (), dict(job_id="101", uid=busy.uid, start=0.0, end=now - 50, user=busy.name)
            )(),
            type(
                "R", (), dict(job_id="102", uid=idle.uid, start=0.0, end=now - 50, user=idle.name)
            )(),
        ]
        plan = plan_cleanup(policy, [], ended, _live_uids(), ((60000, 65534),), now)
        assert {i.uid for i in plan.loose} == {idle.uid}
        outs = execute_cleanup(plan, dry_run=False)
        results = {(o.kind, o.path): o.result for o in outs}
        assert results[(CleanupKind.JOB_DIR, f"{root}/slurm-101")] == Result.DONE
        assert results[(CleanupKind.JOB_DIR, f"{root}/slurm-102")] == Result.DONE
        assert results[(CleanupKind.LOOSE, str(root))] == Result.DONE
        assert sorted(os.listdir(root)) == sorted([f"loose-{busy.name}", f"loose-{stranger.name}"])
    finally:
        os.kill(pid, 9)
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.02)
