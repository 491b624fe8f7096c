"""IPC objects that ended jobs leave (MPI shared memory): listed, removed, never while attached.

Real System V segments, semaphores and queues made by throw-away users, and POSIX queues on
an mqueue mount the test makes; nothing else on the machine is touched (every removal is of
an object whose owner is a fixture user).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pruned.act.remove import execute_cleanup
from pruned.linux.ipc import read_mqueues, read_sysvipc
from pruned.model import CleanupKind, CleanupPolicy, Result
from pruned.rules.cleanplan import plan_cleanup
from tests.fixtures.users import User

pytestmark = pytest.mark.root

MAKE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
print(libc.shmget(0, 8192, IPC_CREAT | 0o666), libc.semget(0, 2, IPC_CREAT | 0o600),
      libc.msgget(0, IPC_CREAT | 0o600))
"""
ATTACH = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
assert libc.shmat(int(sys.argv[1]), None, 0) not in (None, ctypes.c_void_p(-1).value)
print("attached", flush=True)
time.sleep(600)
"""


def as_user(user: User, code: str, *args: str, **kw) -> subprocess.Popen:
    argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
    return subprocess.Popen([*argv, sys.executable, "-c", code, *args], **kw)


def make_objects(user: User) -> tuple[str, str, str]:
    p = as_user(user, MAKE, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    shm, sem, msg = out.split()
    assert "-1" not in (shm, sem, msg)
    return shm, sem, msg


class Rec:  # an ended job of the user, long ago
    def __init__(self, uid: int) -> None:
        self.job_id, self.uid, self.start, self.end, self.user = "77", uid, 0.0, 1.0, None


def plan_for(uid: int, objects):
    # The uid's last job ended long ago and it has no process: its loose files (none: the
    # root does not exist) and IPC objects go.
    policy = CleanupPolicy(roots=("/nonexistent-root",), job_dirs=(), min_age=60.0)
    return plan_cleanup(policy, [], [Rec(uid)], set(), (), time.time(), ipc=objects)


def ids_of(uid: int) -> set[tuple[str, str]]:
    return {(o.kind, o.ident) for o in read_sysvipc() if o.uid == uid}


def test_sysv_objects_of_a_gone_uid_are_removed(make_user) -> None:
    u = make_user("pri")
    shm, sem, msg = make_objects(u)
    try:
        assert ids_of(u.uid) == {("shm", shm), ("sem", sem), ("msg", msg)}
        plan = plan_for(u.uid, read_sysvipc())
        assert {(o.kind, o.ident) for o in plan.ipc} == ids_of(u.uid)
        dry = execute_cleanup(plan, dry_run=True)
        assert {o.result for o in dry if o.kind is CleanupKind.IPC} == {Result.WOULD}
        assert ids_of(u.uid) == {("shm", shm), ("sem", sem), ("msg", msg)}  # dry: untouched
        outs = [o for o in execute_cleanup(plan, dry_run=False) if o.kind is CleanupKind.IPC]
        assert {o.path for o in outs} == {f"sysv-shm:{shm}", f"sysv-sem:{sem}", f"sysv-msg:{msg}"}
        assert all(o.result is Result.DONE for o in outs), outs
        assert ids_of(u.uid) == set()
    finally:
        for kind, ident in ids_of(u.uid):  # only the fixture user's own objects
            subprocess.run(["ipcrm", f"-{kind[0]}", ident], check=False)


def test_an_attached_segment_is_never_removed(make_user) -> None:
    owner, other = make_user("pri"), make_user("pri")
    shm, _sem, _msg = make_objects(owner)
    holder = as_user(other, ATTACH, shm, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "attached"
        plan = plan_for(owner.uid, read_sysvipc())
        assert ("shm", shm) not in {(o.kind, o.ident) for o in plan.ipc}
        assert f"uid {owner.uid}: sysv-shm:{shm} is attached by 1 process(es)" in plan.held
        execute_cleanup(plan, dry_run=False)
        assert ids_of(owner.uid) == {("shm", shm)}  # the semaphore and queue went
    finally:
        holder.kill()
        holder.wait()
        for kind, ident in ids_of(owner.uid):
            subprocess.run(["ipcrm", f"-{kind[0]}", ident], check=False)


def test_posix_message_queues_on_an_mqueue_mount(make_user) -> None:
    u, other = make_user("pri"), make_user("pri")
    mnt = Path(tempfile.mkdtemp(prefix="pruned-mq-"))  # in /tmp: the users can reach it
    mnt.chmod(0o755)
    subprocess.run(["mount", "-t", "mqueue", "none", str(mnt)], check=True)
    mnt.chmod(0o1777)  # as /dev/mqueue is
    try:
        for who, name in ((u, "pruned-test-a"), (other, "pruned-test-b")):
            p = as_user(who, f"open({str(mnt / name)!r}, 'x').close()")
            assert p.wait(timeout=30) == 0
        mine = [o for o in read_mqueues(str(mnt)) if o.uid == u.uid]
        assert [o.label for o in mine] == ["mqueue:/pruned-test-a"]
        plan = plan_for(u.uid, mine)
        outs = execute_cleanup(plan, dry_run=False, ipc_roots=("/proc", str(mnt)))
        assert [o.result for o in outs if o.kind is CleanupKind.IPC] == [Result.DONE]
        assert sorted(os.listdir(mnt)) == ["pruned-test-b"]  # the other user's queue stays
    finally:
        for name in os.listdir(mnt):
            os.unlink(mnt / name)
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()
