"""actions: real processes of fixture users, real cgroups, PID reuse forced in a PID namespace.

Every signal here goes to a process this test started: trees are scoped to a fresh session
of a fixture user, and PID-reuse tests run inside `unshare --pid --fork --mount-proc`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pruned.act.adopt import adopt
from pruned.act.freeze import freeze_and_kill
from pruned.act.guard import Refused
from pruned.act.kill import kill_many, kill_tree
from pruned.linux.pidfd import open_verified
from pruned.linux.procfs import PF_KTHREAD, read_cgroup_lines
from pruned.model import ProcKey, Result
from tests.fixtures.cgdirs import rmdir_cgroups
from tests.fixtures.paths import REPO
from tests.fixtures.pids import pids_limit
from tests.fixtures.users import User, alive, kill_uid_processes, pids_of_uid, run_as

CG = "/sys/fs/cgroup"

pytestmark = pytest.mark.root


def stat_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:  # any process's comm: not always UTF-8
        return f.read().decode(errors="replace").rsplit(")", 1)[1].split()


def key_of(pid: int) -> ProcKey:
    return ProcKey(pid, int(stat_of(pid)[19]))


def maybe_key(pid: int) -> ProcKey | None:
    try:
        return key_of(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None


def argv0(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")[0]


def pid_named(pids: list[int], name: str, timeout: float = 30.0) -> int:
    """The pid among `pids` whose argv[0] is `name`, once the fork has exec'ed it."""
    deadline = time.monotonic() + timeout
    while True:
        for x in pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if argv0(x) == name:
                    return x
        assert time.monotonic() < deadline, f"no {name} among {pids}"
        time.sleep(0.02)


def session_members(sid: int) -> list[int]:
    """Live pids in session `sid` (a session the test made with start_new_session)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = stat_of(int(name))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(st[3]) == sid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def wait_count(sid: int, n: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = session_members(sid)
        if len(pids) >= n:
            return pids
        time.sleep(0.02)
    raise TimeoutError(f"session {sid}: wanted {n} processes, have {session_members(sid)}")


@pytest.fixture
def tree_of(user_a: User) -> Iterator:
    """Start `bash -c script` as user_a in a new session; kill leftovers by pid afterwards."""
    started: list[subprocess.Popen] = []

    def start(script: str, n: int) -> tuple[subprocess.Popen, list[int]]:
        p = run_as(user_a, ["bash", "-c", script], stderr=subprocess.DEVNULL)
        started.append(p)
        return p, wait_count(p.pid, n)

    yield start
    for p in started:
        for pid in session_members(p.pid):
            os.kill(pid, signal.SIGKILL)
        p.kill()
        p.wait()


# ---------------------------------------------------------------- kill_tree


def test_kill_tree_whole_tree_including_double_forked_grandchild(tree_of, user_a: User) -> None:
    """Parent + 2 children + a double-forked grandchild: all gone; only the root was given."""
    p, pids = tree_of("sleep 600 & sleep 600 & ( exec -a dfork sleep 600 & ) ; wait", 4)
    dfork = [x for x in pids if argv0(x) == "dfork"]
    assert dfork and int(stat_of(dfork[0])[1]) != p.pid  # reparented: ppid chain is broken
    root = key_of(p.pid)
    keys = {key_of(x) for x in pids}
    r = kill_tree(root, [], grace=3.0, dry_run=False, uid=user_a.uid)
    assert r.ok, r.describe()
    assert set(r.signalled) == keys
    assert len(r.found_late) == 3  # the re-walk found both children and the grandchild
    assert not [x for x in pids if alive(x)]
    assert set(r.exited_in_grace) == set(r.signalled)
    assert all(s.result == Result.DONE and "SIGTERM" in s.signals for s in r.steps)


def test_kill_tree_sigterm_ignored_dies_by_sigkill(tree_of, user_a: User) -> None:
    """A TERM-ignoring process gets SIGKILL after the grace; a normal one exits within it."""
    p, pids = tree_of("(trap '' TERM; exec -a ignterm sleep 600) & exec -a plain sleep 600", 2)
    ign = pid_named(pids, "ignterm")
    plain = key_of(p.pid)
    t0 = time.monotonic()
    r = kill_tree(plain, [key_of(ign)], grace=0.6, dry_run=False, uid=user_a.uid)
    assert r.ok, r.describe()
    assert time.monotonic() - t0 >= 0.6
    assert r.sigkilled == (key_of(ign),) or [k.pid for k in r.sigkilled] == [ign]
    assert [k.pid for k in r.exited_in_grace] == [p.pid]
    steps = {s.key.pid: s for s in r.steps}
    assert "SIGKILL" in steps[ign].signals and "SIGKILL" not in steps[p.pid].signals
    assert steps[p.pid].exited_after is not None and steps[p.pid].exited_after < 0.6
    assert not alive(ign) and not alive(p.pid)
    assert "SIGKILL to 1" in r.describe()


def test_kill_tree_dry_run_touches_nothing(tree_of, user_a: User) -> None:
    p, pids = tree_of("sleep 600 & sleep 600 & wait", 3)
    r = kill_tree(key_of(p.pid), [], grace=0.1, dry_run=True, uid=user_a.uid)
    assert r.dry_run and not r.signalled and len(r.would) == 3
    assert all(s.result == Result.WOULD for s in r.steps)
    assert all(alive(x) for x in pids)
    for x in pids:  # not even stopped
        assert stat_of(x)[0] in ("S", "R")


def test_kill_tree_child_forked_after_snapshot(tree_of, user_a: User) -> None:
    """Children forked after the caller's snapshot die too; another session of the user lives."""
    p, pids = tree_of("while :; do sleep 0.2; done", 2)
    snapshot = [key_of(p.pid)] + [k for k in map(maybe_key, pids) if k and k.pid != p.pid]
    deadline = time.monotonic() + 30  # until a child the snapshot does not know exists
    while not set(session_members(p.pid)) - {k.pid for k in snapshot}:
        assert time.monotonic() < deadline, "the loop forked no new child"
        time.sleep(0.05)
    other = run_as(user_a, ["bash", "-c", "sleep 600 & wait"], stderr=subprocess.DEVNULL)
    try:
        other_pids = wait_count(other.pid, 2)
        r = kill_tree(snapshot[0], snapshot[1:], grace=2.0, dry_run=False, uid=user_a.uid)
        assert r.ok, r.describe()
        assert r.found_late and not session_members(p.pid)
        assert all(alive(x) for x in other_pids)
    finally:
        for x in other_pids:
            os.kill(x, signal.SIGKILL)
        other.wait()


def test_kill_tree_skips_other_uid(tree_of, user_a: User, user_b: User) -> None:
    """With uid given, a process of another uid in the list is left alone (skipped)."""
    p, _ = tree_of("exec sleep 600", 1)
    other = run_as(user_b, ["sleep", "600"])
    try:
        time.sleep(0.05)
        r = kill_tree(key_of(p.pid), [key_of(other.pid)], grace=1, dry_run=False, uid=user_a.uid)
        assert [k.pid for k in r.skipped] == [other.pid]
        assert alive(other.pid) and not alive(p.pid)
    finally:
        other.kill()
        other.wait()


def test_kill_many_batches(tree_of, user_a: User) -> None:
    trees = [tree_of("sleep 600 & sleep 600 & wait", 3) for _ in range(4)]
    rs = kill_many(
        [(key_of(p.pid), [key_of(x) for x in pids if x != p.pid]) for p, pids in trees],
        grace=2.0,
        dry_run=False,
        uid=user_a.uid,
    )
    assert len(rs) == 4 and all(r.ok and len(r.signalled) == 3 for r in rs)
    assert not [x for _, pids in trees for x in pids if alive(x)]


def test_stale_key_gone_and_untouched(tree_of, user_a: User) -> None:
    p, _ = tree_of("exec sleep 600", 1)
    k = key_of(p.pid)
    stale = ProcKey(k.pid, k.starttime - 1)
    assert open_verified(stale) is None
    r = kill_tree(stale, [], grace=0.2, dry_run=False, uid=user_a.uid)
    assert r.gone_before == (stale,) and not r.signalled and alive(p.pid)
    assert r.steps[0].result == Result.GONE


def kthread_pid() -> int:
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) > 2:
            try:
                if int(stat_of(int(name))[6]) & PF_KTHREAD:
                    return int(name)
            except (FileNotFoundError, ProcessLookupError):
                continue
    pytest.skip("no kernel thread visible")


@pytest.mark.parametrize("what", ["pid1", "pid2", "self", "parent", "kthread"])
def test_guard_refuses(what: str) -> None:
    pid = {
        "pid1": 1,
        "pid2": 2,
        "self": os.getpid(),
        "parent": os.getppid(),
        "kthread": kthread_pid() if what == "kthread" else 0,
    }[what]
    key = key_of(pid) if pid > 0 and os.path.exists(f"/proc/{pid}") else ProcKey(pid, 0)
    for call in (
        lambda: kill_tree(key, [], grace=0, dry_run=True),
        lambda: kill_tree(ProcKey(999999, 1), [key], grace=0, dry_run=False),
        lambda: adopt(key, [], ["/nonexistent"], dry_run=True),
        lambda: freeze_and_kill(key, [], uid=30000, dry_run=True),
    ):
        with pytest.raises(Refused, match="refusing"):
            call()


def test_refused_is_not_a_value_error(tree_of) -> None:
    """Only the guard's refusal is Refused: a caller bug stays a ValueError, not a "refusal"."""
    assert not issubclass(Refused, ValueError)
    p, _ = tree_of("exec sleep 600", 1)
    with pytest.raises(ValueError, match="at least one extern cgroup directory"):
        adopt(key_of(p.pid), [], [], dry_run=True)


# ---------------------------------------------------------------- PID reuse (own PID namespace)

DRIVER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    sys.path.insert(0, REPO)
    from pruned.act.kill import kill_tree
    from pruned.linux.pidfd import open_verified
    from pruned.model import ProcKey

    def set_last(n):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(n))

    def key(p):
        with open(f"/proc/{p.pid}/stat") as f:
            return ProcKey(p.pid, int(f.read().rsplit(")", 1)[1].split()[19]))

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
        except FileNotFoundError:
            return False

    def reuse(base):
        set_last(base)
        a = subprocess.Popen(["sleep", "600"])
        ka = key(a)
        return a, ka

    out = {"ns_pid": os.getpid()}
    # 1. A dies and is reaped; B gets A's pid; act with A's stale key.
    a, ka = reuse(99)
    a.kill(); a.wait()
    time.sleep(0.05)  # a later clock tick, so B's starttime differs from A's
    set_last(ka.pid - 1)
    b = subprocess.Popen(["sleep", "600"])
    kb = key(b)
    out["b_same_pid"] = b.pid == ka.pid
    out["b_other_start"] = kb.starttime != ka.starttime
    out["open_verified"] = open_verified(ka)
    r = kill_tree(ka, [], grace=0.3, dry_run=False)
    out["signalled"] = [k.pid for k in r.signalled]
    out["gone_before"] = [k.pid for k in r.gone_before]
    out["b_alive"] = alive(b.pid)
    # 2. pidfd opened for C; C dies; D reuses the pid; signal through the old pidfd.
    c, kc = reuse(199)
    fd = open_verified(kc)
    out["fd_opened"] = fd is not None
    c.kill(); c.wait()
    time.sleep(0.05)
    set_last(kc.pid - 1)
    d = subprocess.Popen(["sleep", "600"])
    out["d_same_pid"] = d.pid == kc.pid
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        out["old_pidfd"] = "delivered"
    except ProcessLookupError:
        out["old_pidfd"] = "ESRCH"
    time.sleep(0.1)
    out["d_alive"] = alive(d.pid)
    for p in (b, d):
        p.kill(); p.wait()
    print(json.dumps(out))
    """
)


def test_pid_reuse_never_redirects_a_signal(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.replace("REPO)", f"{str(REPO)!r})", 1))
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ns_pid"] == 1
    assert out["b_same_pid"] and out["b_other_start"]  # the reuse really happened
    assert out["open_verified"] is None
    assert out["signalled"] == [] and out["gone_before"] == [100]
    assert out["b_alive"]
    assert out["fd_opened"] and out["d_same_pid"]
    assert out["old_pidfd"] == "ESRCH" and out["d_alive"]


# ---------------------------------------------------------------- fork bomb


@pytest.fixture
def pids_cgroup() -> Iterator[str]:
    with pids_limit(2000) as path:
        yield path


def _method_available(method: str) -> bool:
    if method == "freezer-v1":
        return os.path.exists(f"{CG}/freezer/cgroup.procs")
    if method == "cgroup.freeze":
        return os.path.exists(f"{CG}/unified/cgroup.controllers")
    return True


@pytest.mark.parametrize("method", ["freezer-v1", "cgroup.freeze", "sigstop"])
def test_fork_bomb_gone_within_5s(make_user, pids_cgroup: str, method: str) -> None:
    if not _method_available(method):
        pytest.skip(f"{method} not available here")
    user = make_user("prbomb")
    bomb = subprocess.Popen(
        [
            "sh",
            "-c",
            f"echo $$ > {pids_cgroup}/cgroup.procs && exec setpriv "
            f"--reuid={user.uid} --regid={user.gid} --init-groups bash -c ':(){{ :|:& }};:'",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        root = key_of(bomb.pid)  # a zombie soon, but ours: its pid (the sid) stays reserved
        deadline = time.monotonic() + 10
        while len(pids_of_uid(user.uid)) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        snap = []
        for pid in pids_of_uid(user.uid):
            try:
                snap.append(key_of(pid))
            except (FileNotFoundError, ProcessLookupError):
                continue
        assert len(snap) >= 300, "the bomb did not grow"
        t0 = time.monotonic()
        r = freeze_and_kill(root, snap, uid=user.uid, dry_run=False, timeout=5.0, method=method)
        wall = time.monotonic() - t0
        live = [p for p in pids_of_uid(user.uid) if alive(p)]
        assert not live, f"{len(live)} bomb processes alive after {wall:.2f}s: {r.describe()}"
        assert wall <= 5.0, r.describe()
        print(f"{method}: {wall:.2f}s {r.describe()[:300]}")
        assert r.froze.startswith(method)
        assert len(r.signalled) >= len(snap) // 2
        assert not r.errors, r.errors
        assert not [
            d
            for d in os.listdir(f"{CG}/freezer")
            if d.startswith("pruned_quarantine") and d.endswith(str(os.getpid()))
        ]
    finally:
        kill_uid_processes(user.uid)
        bomb.wait()


# ---------------------------------------------------------------- adopt


@pytest.fixture
def fake_job() -> Iterator[list[str]]:
    """Real v1 cgroups freezer/ and cpuset/ <rand>/job_1/step_extern; removed afterwards."""
    name = f"pruned_test_{secrets.token_hex(4)}"
    made: list[str] = []
    for ctrl in ("freezer", "cpuset"):
        if not os.path.isdir(f"{CG}/{ctrl}"):
            pytest.skip(f"no v1 {ctrl}")
        path = f"{CG}/{ctrl}"
        for part in (name, "job_1", "step_extern"):
            parent, path = path, f"{path}/{part}"
            os.mkdir(path)
            made.append(path)
            if ctrl == "cpuset":  # a cpuset cannot take tasks before cpus and mems are set
                for f in ("cpuset.cpus", "cpuset.mems"):
                    Path(path, f).write_text(Path(parent, f).read_text())
    yield [m for m in made if m.endswith("step_extern")]
    for path in reversed(made):
        ctrl_root = "/".join(path.split("/")[:5])
        for pid in Path(path, "cgroup.procs").read_text().split():
            # our own test processes: put them back at the root before rmdir
            with contextlib.suppress(OSError):
                Path(ctrl_root, "cgroup.procs").write_text(pid)
        os.rmdir(path)


def test_adopt_tree_into_fake_job(tree_of, fake_job: list[str]) -> None:
    p, pids = tree_of("sleep 600 & sleep 600 & wait", 3)
    r = adopt(key_of(p.pid), [], fake_job, dry_run=False)
    assert r.ok, r.describe()
    assert {k.pid for k in r.moved} == set(pids) and len(r.found_late) == 2
    rel = fake_job[0].split("/freezer", 1)[1]
    for pid in pids:
        lines = read_cgroup_lines(pid)
        assert any(line.endswith(f":freezer:{rel}") for line in lines), lines
        assert any(line.endswith(f":cpuset:{rel}") for line in lines), lines
    assert all(s.result == Result.DONE for s in r.steps) and len(r.steps) == 6


def test_adopt_dry_run_and_stale_key(tree_of, fake_job: list[str]) -> None:
    p, pids = tree_of("exec sleep 600", 1)
    k = key_of(p.pid)
    before = read_cgroup_lines(p.pid)
    d = adopt(k, [], fake_job, dry_run=True)
    assert d.dry_run and d.would == (k,) and not d.moved and read_cgroup_lines(p.pid) == before
    stale = ProcKey(k.pid, k.starttime + 1)  # as if the pid was reused before the write
    r = adopt(stale, [], fake_job, dry_run=False)
    assert not r.moved and r.gone == (stale,) and not r.ok
    assert read_cgroup_lines(p.pid) == before  # the write was refused: the process did not move
    assert "gone before the move" in r.describe()
    assert all(
        str(pid) not in Path(fake_job[0], "cgroup.procs").read_text().split() for pid in pids
    )


def test_rewalk_leaves_a_member_of_a_job_cgroup_alone(tree_of, user_a: User) -> None:
    """A process the re-walk finds (never classified) that sits in a Slurm job's cgroup the
    root is not in belongs to that job: it is not killed with the stray."""
    p, pids = tree_of("sleep 600 & exec -a rewalk_root sleep 600 & wait", 3)
    child = pid_named([x for x in pids if x != p.pid], "sleep")
    job_dir = Path(
        f"/sys/fs/cgroup/freezer/slurm_prt{secrets.token_hex(3)}/uid_{user_a.uid}"
        f"/job_{secrets.randbelow(10**6) + 10**6}/step_0"
    )
    job_dir.mkdir(parents=True)
    try:
        (job_dir / "cgroup.procs").write_text(str(child))
        r = kill_tree(key_of(p.pid), [], grace=2.0, dry_run=False, uid=user_a.uid)
        assert key_of(child) in r.skipped, r.describe()
        assert alive(child) and not alive(p.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (job_dir / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        for d in (job_dir, job_dir.parent, job_dir.parent.parent, job_dir.parent.parent.parent):
            d.rmdir()


# ---------------------------------------------------------------- containment (escape attack)

# A stray that answers SIGTERM by spawning a detached child (new session, double fork: no
# ppid chain, session or process group leads back to it) and exiting a moment later, when
# the child is long gone from every walk.
RESPAWN = (
    "trap 'setsid -f bash -c \"exec -a escapee sleep 600\"; sleep 0.3; exit 0' TERM; "
    "while :; do sleep 0.05; done"
)


def escapees(uid: int) -> list[int]:
    return [p for p in pids_of_uid(uid) if alive(p) and argv0(p) == "escapee"]


def test_term_respawning_stray_escapes_without_containment(tree_of, user_a: User) -> None:
    """The attack is real: the re-walk alone cannot see a child born detached during the grace."""
    p, _pids = tree_of(RESPAWN, 2)
    try:
        r = kill_tree(key_of(p.pid), [], grace=2.0, dry_run=False, uid=user_a.uid, contain="none")
        deadline = time.monotonic() + 5
        while not escapees(user_a.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert escapees(user_a.uid), r.describe()
        assert r.contained == "not contained (none): re-walks only"
    finally:
        for pid in escapees(user_a.uid):
            os.kill(pid, signal.SIGKILL)


def test_term_respawning_stray_dies_inside_its_quarantine(tree_of, user_a: User) -> None:
    """Contained before the first SIGTERM, the child it spawns is born in the quarantine cgroup
    and dies with it; the result says how many joined during the kill."""
    p, _pids = tree_of(RESPAWN, 2)
    try:
        r = kill_tree(key_of(p.pid), [], grace=2.0, dry_run=False, uid=user_a.uid, contain="auto")
        assert r.contained.startswith("contained in "), r.describe()
        assert r.joined >= 1, r.describe()
        assert r.ok, r.describe()
        time.sleep(0.5)  # an escapee would have exec'ed by now
        assert escapees(user_a.uid) == []
        assert not alive(p.pid)
        quarantine = r.contained.removeprefix("contained in ").split(":", 1)[1]
        assert not os.path.exists(quarantine)  # removed after the kill
        fields = r.audit_fields()
        assert fields["PRUNED_JOINED"] == str(r.joined) and "PRUNED_CONTAINED" in fields
    finally:
        for pid in escapees(user_a.uid):
            os.kill(pid, signal.SIGKILL)


def test_a_stray_in_a_job_cgroup_is_never_moved(tree_of, user_a: User) -> None:
    """A stray left in a Slurm job's cgroup (an ended job's) stays there: killed, not moved."""
    job = f"/sys/fs/cgroup/freezer/slurm_prt{secrets.token_hex(3)}"
    step = f"{job}/uid_{user_a.uid}/job_{7_000_000 + secrets.randbelow(10**6)}/step_0"
    if not os.path.isdir("/sys/fs/cgroup/freezer"):
        pytest.skip("no v1 freezer hierarchy")
    os.makedirs(step)
    p, _pids = tree_of("exec -a injob sleep 600", 1)
    deadline = time.monotonic() + 30  # setpriv exec'ed it: the key is the user's process
    while argv0(p.pid) != "injob" and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with open(f"{step}/cgroup.procs", "w") as f:
            f.write(str(p.pid))
        r = kill_tree(key_of(p.pid), [], grace=1.0, dry_run=False, uid=user_a.uid, contain="auto")
        assert r.ok and not alive(p.pid), r.describe()
        assert "1 left where they were (in a Slurm job's cgroup)" in r.contained, r.describe()
    finally:
        p.kill()
        p.wait()
        rmdir_cgroups(step, os.path.dirname(step), os.path.dirname(os.path.dirname(step)), job)
