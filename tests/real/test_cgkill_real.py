"""The confined kill (act/cgkill.py): every tree of a kill in one frozen quarantine, with
real processes of a fixture user, on both freezers this node offers (the v2 one in the
unified hierarchy of a hybrid node too).

Trees start in a root-made v2 cgroup of their own (as a login session's scope holds them on
a systemd node), so the late members are looked for there and not in a /proc walk.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from pruned.act.kill import kill_many, kill_tree
from pruned.linux.cgroupfs import v2_mount
from pruned.model import ProcKey
from tests.fixtures.cgdirs import own_v2_cgroup, rmdir_cgroups
from tests.fixtures.users import User, alive, run_as
from tests.real.test_actions import RESPAWN, argv0, escapees, key_of, pid_named, wait_count

pytestmark = pytest.mark.root

METHODS = ("freezer-v1", "cgroup.freeze")


def _offered(method: str) -> bool:
    if method == "freezer-v1":
        return os.path.isdir("/sys/fs/cgroup/freezer")
    v2 = v2_mount()
    return v2 is not None and os.path.exists(f"{v2}/cgroup.subtree_control")


def _join(cgroup_dir: str) -> None:
    with open(f"{cgroup_dir}/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))


def wait_exec(pid: int, argv0_is: str, timeout: float = 30.0) -> None:
    """Until pid runs as the user (setpriv has exec'ed the script): its key is the stray's."""
    deadline = time.monotonic() + timeout
    while argv0(pid) != argv0_is:
        assert time.monotonic() < deadline, f"pid {pid} never exec'ed {argv0_is}"
        time.sleep(0.02)


def _no_quarantine_left() -> list[str]:
    mine = f"pruned_quarantine_{os.getpid()}_*"
    return glob.glob(f"/sys/fs/cgroup/*/{mine}") + glob.glob(f"/sys/fs/cgroup/{mine}")


@pytest.fixture
def scoped(user_a: User) -> Iterator:
    """start(script, n): `bash -c script` as user_a in a new session, inside a fresh v2 cgroup."""
    v2 = v2_mount()
    if v2 is None:
        pytest.skip("no v2 hierarchy")
    scope = f"{v2}/pruned_test_scope_{secrets.token_hex(4)}"
    os.mkdir(scope)
    started: list[subprocess.Popen] = []

    def start(script: str, n: int) -> tuple[subprocess.Popen, list[int]]:
        home = own_v2_cgroup()
        _join(scope)
        try:
            p = run_as(user_a, ["bash", "-c", script], stderr=subprocess.DEVNULL)
        finally:
            _join(home)
        started.append(p)
        return p, wait_count(p.pid, n)

    yield start
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, 9)
        p.kill()
        p.wait()
    for _ in range(100):
        try:
            os.rmdir(scope)
            break
        except OSError:
            time.sleep(0.05)


@pytest.mark.parametrize("method", METHODS)
def test_grace_0_is_sigkill_only_and_late_members_are_found_in_the_scope(
    scoped, user_a: User, method: str
) -> None:
    """Only the root given: both children and a double-forked grandchild (reparented, found
    by its session) are found, confined and killed with SIGKILL alone; no quarantine stays."""
    if not _offered(method):
        pytest.skip(f"no {method}")
    p, pids = scoped("sleep 600 & sleep 600 & ( exec -a dfork sleep 600 & ) ; wait", 4)
    assert any(argv0(x) == "dfork" for x in pids)
    keys = {key_of(x) for x in pids}
    r = kill_tree(key_of(p.pid), [], grace=0, dry_run=False, uid=user_a.uid, contain=method)
    assert r.ok, r.describe()
    assert r.contained.startswith(f"contained in {method}:"), r.describe()
    assert set(r.signalled) == keys and len(r.found_late) == 3
    assert all(s.signals == ("SIGKILL",) for s in r.steps), r.steps
    assert r.describe().startswith("SIGKILL to 4"), r.describe()
    assert not [x for x in pids if alive(x)]
    assert _no_quarantine_left() == []


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_then_grace_then_sigkill_inside_the_quarantine(
    scoped, user_a: User, method: str
) -> None:
    """The policy's order holds: SIGTERM to all (handled after the thaw), the grace, then
    SIGKILL only for the one that ignored SIGTERM."""
    if not _offered(method):
        pytest.skip(f"no {method}")
    p, pids = scoped("(trap '' TERM; exec -a ignterm sleep 600) & exec -a plain sleep 600", 2)
    ign = pid_named(pids, "ignterm")
    t0 = time.monotonic()
    r = kill_tree(key_of(p.pid), [key_of(ign)], grace=0.6, dry_run=False, uid=user_a.uid,
                  contain=method)  # fmt: skip
    assert r.ok, r.describe()
    assert time.monotonic() - t0 >= 0.6
    assert r.contained.startswith(f"contained in {method}:"), r.describe()
    assert [k.pid for k in r.sigkilled] == [ign] and [k.pid for k in r.exited_in_grace] == [p.pid]
    steps = {s.key.pid: s for s in r.steps}
    assert steps[ign].signals == ("SIGTERM", "SIGKILL") and steps[p.pid].signals == ("SIGTERM",)
    assert not alive(ign) and not alive(p.pid)


@pytest.mark.parametrize("method", METHODS)
def test_many_trees_share_one_quarantine(scoped, user_a: User, method: str) -> None:
    """Five trees, one kill: each result names the same quarantine and its own members."""
    if not _offered(method):
        pytest.skip(f"no {method}")
    trees = []
    for _ in range(5):
        p, pids = scoped("sleep 600 & sleep 600 & wait", 3)
        root = key_of(p.pid)
        trees.append((root, [key_of(x) for x in pids if x != p.pid]))
    rs = kill_many(trees, grace=0, dry_run=False, uid=user_a.uid, contain=method)
    assert all(r.ok for r in rs), [r.describe() for r in rs]
    assert len({r.contained for r in rs}) == 1
    for (root, desc), r in zip(trees, rs, strict=True):
        assert set(r.signalled) == {root, *desc}
    assert _no_quarantine_left() == []


def test_a_member_that_must_stay_falls_back_after_the_others_moved(
    scoped, user_a: User
) -> None:
    """The second tree sits in a Slurm job's cgroup: the first was already moved into the
    shared quarantine when that is seen. The re-walking path takes over before any signal:
    both die, the job's process is not moved, no quarantine is left."""
    if not os.path.isdir("/sys/fs/cgroup/freezer"):
        pytest.skip("no v1 freezer hierarchy")
    job = f"/sys/fs/cgroup/freezer/slurm_prt{secrets.token_hex(3)}"
    step = f"{job}/uid_{user_a.uid}/job_{7_000_000 + secrets.randbelow(10**6)}/step_0"
    os.makedirs(step)
    try:
        free, _ = scoped("exec -a free sleep 600", 1)
        injob, _ = scoped("exec -a injob sleep 600", 1)
        wait_exec(free.pid, "free")
        wait_exec(injob.pid, "injob")
        with open(f"{step}/cgroup.procs", "w") as f:
            f.write(str(injob.pid))
        trees: list[tuple[ProcKey, list[ProcKey]]] = [(key_of(free.pid), []),
                                                      (key_of(injob.pid), [])]  # fmt: skip
        rs = kill_many(trees, grace=0.5, dry_run=False, uid=user_a.uid, contain="freezer-v1")
        assert all(r.ok for r in rs), [r.describe() for r in rs]
        assert "1 left where they were (in a Slurm job's cgroup)" in rs[1].contained
        assert not alive(free.pid) and not alive(injob.pid)
        assert _no_quarantine_left() == []
    finally:
        rmdir_cgroups(step, os.path.dirname(step), os.path.dirname(os.path.dirname(step)), job)


@pytest.mark.parametrize("method", METHODS)
def test_a_child_spawned_on_sigterm_is_born_inside_and_joins(
    scoped, user_a: User, method: str
) -> None:
    """The escape attack in the confined kill: the detached child it spawns on SIGTERM is
    born in the quarantine, verified as inside (not a pid reused outside), and killed."""
    if not _offered(method):
        pytest.skip(f"no {method}")
    p, _pids = scoped(RESPAWN, 2)
    try:
        r = kill_tree(key_of(p.pid), [], grace=2.0, dry_run=False, uid=user_a.uid,
                      contain=method)  # fmt: skip
        assert r.ok and r.joined >= 1, r.describe()
        assert r.contained.startswith(f"contained in {method}:"), r.describe()
        time.sleep(0.5)  # an escapee would have exec'ed by now
        assert escapees(user_a.uid) == [] and not alive(p.pid)
    finally:
        for pid in escapees(user_a.uid):
            os.kill(pid, 9)


def test_no_quarantine_falls_back_to_the_re_walk(scoped, user_a: User, tmp_path) -> None:
    """No cgroup to confine in (a cgroup root without a freezer): the re-walking path kills
    the tree and says why it was not contained."""
    p, pids = scoped("sleep 600 & sleep 600 & wait", 3)
    r = kill_tree(key_of(p.pid), [], grace=0, dry_run=False, uid=user_a.uid,
                  contain="freezer-v1", cgroup_root=str(tmp_path))  # fmt: skip
    assert r.contained.startswith("not contained: no quarantine cgroup"), r.describe()
    assert len(r.signalled) == 3 and not r.survivors, r.describe()
    assert not [x for x in pids if alive(x)]
