"""snapshot() and read_proc() against real processes of real (fixture-made) users."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pruned.linux.procfs import read_proc, snapshot
from pruned.model import Proc
from tests.fixtures.paths import REPO
from tests.fixtures.users import User, daemon_as, run_as

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, setuid, namespaces)"),
]

PYTHON = "/usr/bin/python3"  # the system python: readable and executable by any test user

# A user-side helper: set comm (PR_SET_NAME=15) and/or drop dumpability (PR_SET_DUMPABLE=4),
# say "ready", then sleep until killed.
NAMED = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
name = sys.argv[1].encode()
if name:
    assert libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0) == 0
if sys.argv[2] == "1":
    assert libc.prctl(4, 0, 0, 0, 0) == 0
print("ready", flush=True)
time.sleep(300)
"""


def start(user: User, argv: list[str]) -> subprocess.Popen[str]:
    """argv as user; waits for its "ready" line."""
    p = run_as(user, argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready", f"helper {argv} failed (exit {p.poll()})"
    return p


def stop(p: subprocess.Popen[str]) -> None:
    """Our own child: kill and reap by pid."""
    p.kill()
    p.wait()


def owner_of(pid: int, name: str = "stat") -> int:
    return os.stat(f"/proc/{pid}/{name}").st_uid


def wait_state(pid: int, state: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = read_proc(pid)
        if p is not None and p.state == state:
            return
        time.sleep(0.02)
    raise TimeoutError(f"pid {pid} never reached state {state}")


@pytest.fixture
def named(user_a: User) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def _start(comm: str = "", nondumpable: bool = False) -> subprocess.Popen[str]:
        p = start(user_a, [PYTHON, "-c", NAMED, comm, "1" if nondumpable else "0"])
        started.append(p)
        wait_state(p.pid, "S")  # past "ready", asleep
        return p

    yield _start
    for p in started:
        stop(p)


def test_renamed_user_process_keeps_true_uid_and_exe(user_a: User, named) -> None:
    by_argv0 = start(user_a, ["bash", "-c", "echo ready; exec -a slurmstepd sleep 300"])
    by_prctl = named("slurmstepd")
    try:
        snap = snapshot()
        a, b = snap.procs[by_argv0.pid], snap.procs[by_prctl.pid]
        # parent is this (root) test process: the second pass reads their exe
        assert (a.uid, a.comm, a.exe, a.uid_exact) == (user_a.uid, "sleep", "/usr/bin/sleep", False)
        assert (b.uid, b.comm) == (user_a.uid, "slurmstepd")
        assert b.exe == os.path.realpath(PYTHON)
        full = read_proc(by_prctl.pid)
        assert full is not None
        assert (full.uid, full.euid, full.uid_exact, full.comm) == (
            user_a.uid, user_a.uid, True, "slurmstepd",
        )  # fmt: skip
    finally:
        stop(by_argv0)


def test_non_dumpable_user_process_is_not_root(user_a: User, named) -> None:
    p = named("secret", nondumpable=True)
    # precondition that makes this test meaningful: its /proc files turned root-owned
    assert owner_of(p.pid) == 0
    assert os.stat(f"/proc/{p.pid}").st_uid == user_a.uid  # the directory keeps the euid
    got = snapshot().procs[p.pid]
    assert (got.uid, got.euid, got.uid_exact) == (user_a.uid, user_a.uid, True)
    assert got.uid != 0


@pytest.fixture
def suid_sleep() -> Iterator[str]:
    """A root-owned setuid copy of sleep in a directory every user can traverse."""
    d = tempfile.mkdtemp(prefix="pruned-suid-", dir="/tmp")
    try:
        if os.statvfs(d).f_flag & os.ST_NOSUID:
            pytest.skip("/tmp is mounted nosuid")
        os.chmod(d, 0o755)
        path = os.path.join(d, "suidsleep")
        shutil.copy("/usr/bin/sleep", path)
        os.chown(path, 0, 0)
        os.chmod(path, 0o4755)
        yield path
    finally:
        shutil.rmtree(d)  # our own fresh directory, not user-writable


def test_setuid_root_program_shows_the_real_uid(user_a: User, suid_sleep: str) -> None:
    p = run_as(user_a, [suid_sleep, "300"])
    try:
        deadline = time.monotonic() + 5
        while (full := read_proc(p.pid)) is None or full.exe != suid_sleep:
            assert time.monotonic() < deadline, "setuid sleep did not start"
            time.sleep(0.02)
        assert owner_of(p.pid) == 0  # precondition: effective uid 0
        got = snapshot().procs[p.pid]
        assert (got.uid, got.euid, got.uid_exact) == (user_a.uid, 0, True)
        assert got.exe == suid_sleep
        assert (full.uid, full.euid) == (user_a.uid, 0)
    finally:
        stop(p)


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        proc = read_proc(pid)
        assert proc is not None
        pid = proc.ppid
        out.add(pid)
    return out


def test_double_forked_daemon_is_reparented(user_a: User) -> None:
    pid = daemon_as(user_a, f"prd{os.getpid()}")
    try:
        got = snapshot().procs[pid]
        assert got.uid == user_a.uid
        assert got.comm == "sleep"
        # its parents exited: it belongs to pid 1 or to a subreaper among our own ancestors
        assert got.ppid == 1 or got.ppid in _ancestors(os.getpid())
        assert got.sid == pid  # setsid made it a session leader
        parent = snapshot().procs[got.ppid]
        # parent root-owned (pid 1 / a root subreaper) -> exe read in the second pass
        if parent.uid == 0:
            assert got.exe == "/usr/bin/sleep"
    finally:
        os.kill(pid, 9)  # the fixture user's daemon, found by its unique argv0 just now


def test_zombie_is_recorded_with_state_z(user_a: User) -> None:
    # a parent that never waits for its child
    code = "import os, time\nif os.fork() == 0: os._exit(0)\nprint('ready', flush=True)\n"
    code += "time.sleep(300)"
    parent = start(user_a, [PYTHON, "-c", code])
    try:
        deadline = time.monotonic() + 5
        while True:
            kids = [p for p in snapshot().procs.values() if p.ppid == parent.pid]
            if kids and kids[0].state == "Z":
                break
            assert time.monotonic() < deadline, f"no zombie child: {kids}"
            time.sleep(0.02)
        z = kids[0]
        assert z.zombie
        assert owner_of(z.pid) == 0  # a zombie's /proc files are root-owned ...
        assert (z.uid, z.uid_exact) == (user_a.uid, True)  # ... but it is the user's
        assert z.exe is None
    finally:
        stop(parent)


def test_pid_namespace_sees_only_its_own_processes() -> None:
    code = (
        "import json; from pruned.linux.procfs import snapshot; s = snapshot();"
        "print(json.dumps({p: [s.procs[p].ppid, s.procs[p].comm, s.procs[p].kthread]"
        " for p in s.procs}))"
    )
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    procs = json.loads(r.stdout)
    assert list(procs) == ["1"], procs  # not this machine's thousands of processes
    assert procs["1"][0] == 0 and not procs["1"][2]


def test_read_proc_of_an_exited_pid_is_none() -> None:
    for _ in range(20):
        p = subprocess.Popen(["true"])
        p.wait()
        if not os.path.exists(f"/proc/{p.pid}"):  # else the pid was reused already: retry
            assert read_proc(p.pid) is None
            return
    pytest.fail("every pid was reused at once")


def test_read_proc_of_a_nonexistent_pid_and_bad_root(tmp_path: Path) -> None:
    assert read_proc(2**22 + 1) is None  # above any pid_max
    assert read_proc(1, proc_root=str(tmp_path)) is None


def test_comm_with_spaces_and_parens_from_a_real_process(user_a: User, named) -> None:
    odd = named("a) (b c) Z 1")  # 12 bytes < TASK_COMM_LEN
    nl = named("x\ny) R 2")
    snap = snapshot()
    got, got_nl = snap.procs[odd.pid], snap.procs[nl.pid]
    assert (got.comm, got.state, got.ppid, got.uid) == (
        "a) (b c) Z 1",
        "S",
        os.getpid(),
        user_a.uid,
    )
    assert (got_nl.comm, got_nl.state, got_nl.ppid) == ("x\ny) R 2", "S", os.getpid())
    assert got.pgid == got.sid == odd.pid  # run_as starts a new session
    assert got.starttime == read_proc(odd.pid).starttime


def test_kernel_threads_and_self() -> None:
    snap = snapshot()
    me = snap.procs[os.getpid()]
    assert (me.uid, me.uid_exact, me.kthread, me.state) == (0, True, False, "R")
    assert me.exe == os.path.realpath(sys.executable)
    assert not snap.procs[1].kthread
    kthreads = [p for p in snap.procs.values() if p.ppid == 2 or p.pid == 2]
    if 2 in snap.procs:  # absent inside a PID namespace
        assert kthreads and all(p.kthread and p.uid == 0 for p in kthreads)
    full: Proc | None = read_proc(os.getpid())
    assert full is not None
    assert full.cgroups == tuple(Path("/proc/self/cgroup").read_text().splitlines())
    assert snap.boot_time > 1e9 and 0 <= snap.age(me) < 3600
