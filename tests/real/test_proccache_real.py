"""Steady-state sweeps on real processes: every change a pid can go through without a new
pid is caught by the next incremental sweep, fed by the real proc connector as the daemon
feeds it (pruned.service.Daemon.on_pids).

Processes run as fixture users (or as root helpers that drop to them) and are killed by pid.
No test asserts a time; waits only bound how long the kernel may take.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pruned.linux.connector import EventWatcher, probe
from pruned.linux.proccache import ProcCache
from pruned.model import Policy, ProcClass
from pruned.policy.facts import resolve_facts
from pruned.sweep import observe
from tests.fixtures.users import User, run_as
from tests.real.test_jobs_cgroup import (  # noqa: F401
    CG,
    V1_CTRLS,
    Cgroups,
    _source,
    bins,
    running_v1_job,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (connector, users, cgroups)"),
]


def wait_until(cond: Callable[[], object], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


@dataclass
class Watched:
    cache: ProcCache
    watcher: EventWatcher

    def sweep(self, exe_all: bool = False):
        """An incremental snapshot (full only if events were lost meanwhile: then say so)."""
        lost = self.watcher.lost_reports
        snap = self.cache.snapshot(exe_all=exe_all)
        assert self.cache.last is not None
        if self.watcher.lost_reports == lost:
            assert not self.cache.last.full, self.cache.last
        return snap

    def marked(self, pid: int) -> bool:
        return wait_until(lambda: pid in self.cache.marked())


@pytest.fixture
def watched() -> Iterator[Watched]:
    why = probe()
    if why is not None:
        pytest.skip(why)
    cache = ProcCache(full_every=1e9)
    watcher = EventWatcher(cache.mark, cache.lost).start()
    cache.attach()
    try:
        yield Watched(cache, watcher)
    finally:
        watcher.stop()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()


def _stat_field(pid: int, i: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[i].decode()


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("Uid:")).split()[1])


def test_exec_keeping_the_pid_is_seen(watched: Watched, procs, user_a: User) -> None:
    code = "import os,sys; sys.stdin.read(1); os.execv('/usr/bin/sleep', ['sleep', '600'])"
    p = run_as(user_a, [sys.executable, "-c", code], stdin=subprocess.PIPE)
    procs.append(p)
    assert wait_until(lambda: _uid(p.pid) == user_a.uid and "python" in os.readlink(
        f"/proc/{p.pid}/exe"))  # fmt: skip
    watched.cache.snapshot(exe_all=True)  # the full read that founds the cache
    before = watched.sweep(exe_all=True).procs[p.pid]
    assert "python" in (before.exe or "")
    assert p.stdin is not None
    p.stdin.write(b"x")
    p.stdin.flush()
    assert wait_until(lambda: os.readlink(f"/proc/{p.pid}/exe") == "/usr/bin/sleep")
    assert watched.marked(p.pid)
    after = watched.sweep(exe_all=True).procs[p.pid]
    assert (after.exe, after.comm, after.starttime) == ("/usr/bin/sleep", "sleep",
                                                       before.starttime)  # fmt: skip


def test_reparenting_when_the_parent_exits_is_seen(watched: Watched, procs, user_a) -> None:
    p = run_as(user_a, ["sh", "-c", "sleep 600 & echo $!; read x"],
               stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    procs.append(p)
    assert p.stdout is not None and p.stdin is not None
    child = int(p.stdout.readline())
    try:
        # Settled first (the child's own fork and exec events consumed), so that the parent's
        # exit is the only thing that can make the next sweep re-read it.
        assert wait_until(lambda: os.readlink(f"/proc/{child}/exe") == "/usr/bin/sleep")
        watched.cache.snapshot()
        time.sleep(0.2)  # the watcher's batch delay: the child's events arrive and are swept
        watched.sweep()
        assert watched.sweep().procs[child].ppid == p.pid
        assert child not in watched.cache.marked()
        p.stdin.write(b"\n")
        p.stdin.flush()
        p.wait()
        assert wait_until(lambda: int(_stat_field(child, 1)) != p.pid)
        real_parent = int(_stat_field(child, 1))
        assert watched.marked(p.pid)  # the parent's exit; the child had no event of its own
        assert watched.sweep().procs[child].ppid == real_parent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)


# A root helper that drops to the user, makes itself dumpable (its /proc files are then the
# user's, so the cache treats it as an ordinary user process), then takes root back through
# its saved uid: the uid event is the only sign.
REGAIN = """
import ctypes, os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setresgid(gid, gid, 0)
os.setresuid(uid, uid, 0)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
print("dropped", flush=True)
sys.stdin.read(1)
os.setresuid(0, 0, 0)
print("root", flush=True)
sys.stdin.read(1)
"""


def test_a_uid_change_of_a_cached_user_process_is_seen(watched: Watched, procs, user_a) -> None:
    p = subprocess.Popen([sys.executable, "-c", REGAIN, str(user_a.uid), str(user_a.gid)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         start_new_session=True)  # fmt: skip
    procs.append(p)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline() == b"dropped\n"
    assert os.stat(f"/proc/{p.pid}/stat").st_uid == user_a.uid  # dumpable: the user's files
    watched.cache.snapshot()
    rec = watched.sweep().procs[p.pid]
    assert (rec.uid, rec.uid_exact) == (user_a.uid, False)  # an ordinary cached record
    p.stdin.write(b"x")
    p.stdin.flush()
    assert p.stdout.readline() == b"root\n"
    assert watched.marked(p.pid)
    rec = watched.sweep().procs[p.pid]
    assert rec.uid == 0


def test_a_root_helper_dropping_to_a_user_is_seen(watched: Watched, procs, user_a) -> None:
    code = ("import os,sys; u, g = int(sys.argv[1]), int(sys.argv[2]); sys.stdin.read(1); "
            "os.setresgid(g, g, g); os.setresuid(u, u, u); print('ok', flush=True); "
            "sys.stdin.read(1)")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code, str(user_a.uid), str(user_a.gid)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         start_new_session=True)  # fmt: skip
    procs.append(p)
    assert wait_until(lambda: os.path.exists(f"/proc/{p.pid}/status"))
    watched.cache.snapshot()
    rec = watched.sweep().procs[p.pid]
    assert (rec.uid, rec.uid_exact) == (0, True)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(b"x")
    p.stdin.flush()
    assert p.stdout.readline() == b"ok\n"
    rec = watched.sweep().procs[p.pid]
    assert rec.uid == user_a.uid


def test_a_reused_pid_is_a_new_process(watched: Watched, procs, user_a, user_b) -> None:
    """The old process exits and a new one gets its pid (kernel.ns_last_pid steers the
    allocation; other processes of the machine may take the pid first: then try again)."""
    for _attempt in range(40):
        x = run_as(user_a, ["sleep", "600"])
        procs.append(x)
        assert wait_until(lambda x=x: _uid(x.pid) == user_a.uid)
        watched.cache.snapshot()
        old = watched.sweep().procs[x.pid]
        x.kill()
        x.wait()
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(x.pid - 1))
        y = run_as(user_b, ["sleep", "601"])
        procs.append(y)
        if y.pid == x.pid:
            break
    else:
        pytest.skip("the pid was taken by another process every time (a busy machine)")
    assert wait_until(lambda: _uid(y.pid) == user_b.uid)
    assert watched.marked(y.pid)
    new = watched.sweep().procs[y.pid]
    assert new.starttime != old.starttime and new.uid == user_b.uid


def test_moves_into_and_out_of_a_job_cgroup_are_seen(watched: Watched, procs, user_a,
                                                      bins) -> None:  # noqa: F811
    """Membership is read from the job cgroups every sweep: no event, no re-read needed."""
    cg = Cgroups()
    try:
        _job, _stepd, at = running_v1_job(cg, bins, user_a.uid)
        stray = cg.start(["sleep", "609"], user_a)
        policy = Policy(batch_daemons=(bins["stepd"],))
        facts = resolve_facts(policy)
        sources = [_source(bins)]

        def cls() -> ProcClass:
            obs = observe(policy, facts, sources=sources, cache=watched.cache)
            return obs.verdicts[stray].cls

        observe(policy, facts, sources=sources, cache=watched.cache)  # founds the cache
        assert cls() is ProcClass.STRAY
        cg.put(stray, at("freezer", "step_batch"), at("cpuset", "step_batch"))
        assert cls() is ProcClass.BATCH and not watched.cache.last.full
        for c in V1_CTRLS:  # back to each hierarchy's root cgroup
            with open(f"{CG}/{c}/cgroup.procs", "w") as f:
                f.write(str(stray))
        assert cls() is ProcClass.STRAY
    finally:
        cg.cleanup()


def test_the_outside_stepd_walk_skips_only_unchanged_non_stepds(watched: Watched, procs, user_a,
                                                                bins, monkeypatch) -> None:  # noqa: F811
    """The Slurm source's walk for root slurmstepds outside every job cgroup reads each
    process's exe; with the cache it skips the ones it cleared last time and nothing has
    happened to since, and still reads the stepd's."""
    import secrets

    from pruned.jobs import slurm
    from pruned.linux import procfs
    from pruned.model import SlurmSource

    if not all(os.path.isdir(f"{CG}/{c}") for c in V1_CTRLS):
        pytest.skip("needs cgroup v1 freezer+cpuset")
    cg = Cgroups()
    root = f"slurm_prt{secrets.token_hex(3)}"
    job = str(7_000_000 + secrets.randbelow(2_000_000))
    try:
        member = cg.start(["sleep", "610"], user_a)
        cg.put(member, *(f"{CG}/{c}/{root}/uid_{user_a.uid}/job_{job}/step_0" for c in V1_CTRLS))
        outside = cg.start([bins["stepd"], "611"])  # a root "slurmstepd" in no job cgroup
        plain = cg.start(["sleep", "612"], user_a)  # an ordinary user process, no cgroup
        policy = Policy(slurm=SlurmSource(stepd=(bins["stepd"],)))
        facts = resolve_facts(policy)
        read: list[int] = []
        real_read_exe = procfs.read_exe

        def counting(pid: int, proc_root: str = "/proc"):
            read.append(pid)
            return real_read_exe(pid, proc_root)

        monkeypatch.setattr(procfs, "read_exe", counting)
        # Only the walk under test reads exes: slurmd as if found through its pidfile (without
        # one, that search is a walk of its own, of every pid, with or without the cache).
        monkeypatch.setattr(slurm._SlurmRead, "_slurmd_alive", lambda self: True)

        def problems() -> str:
            read.clear()
            return " ".join(observe(policy, facts, cache=watched.cache).jobs.problems)

        problems()  # founds the cache: a full read, every pid walked
        assert outside in read and plain in read
        time.sleep(0.2)
        problems()  # consumes the marks of the processes just started
        problems()
        assert watched.cache.last is not None
        if watched.cache.last.full:
            pytest.skip("events were lost meanwhile (a busy machine): nothing was skipped")
        # (too young to count as a problem: stepd_grace; judged again every time all the same)
        assert outside in read
        assert plain not in read  # cleared last time, unchanged since: skipped
    finally:
        cg.cleanup()
