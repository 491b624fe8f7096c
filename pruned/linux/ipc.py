"""System V IPC objects (shared memory, semaphores, message queues) and POSIX message queues.

What MPI runs and other job software leave behind outside the filesystem: listed from
/proc/sysvipc/{shm,sem,msg} and an mqueue mount (/dev/mqueue), removed with IPC_RMID or an
unlink relative to the mqueue mount's fd. Only this IPC namespace's objects are visible.
(POSIX shared memory lives in /dev/shm and is cleaned as files.)
"""

from __future__ import annotations

import ctypes
import errno
import os

from pruned.model import IpcObject

IPC_RMID = 0
_KINDS = ("shm", "sem", "msg")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parse_sysvipc(kind: str, text: str) -> list[IpcObject]:
    """The objects in one /proc/sysvipc/<kind> table; rows that do not parse are skipped."""
    lines = text.splitlines()
    if not lines:
        return []
    cols = lines[0].split()
    out = []
    for line in lines[1:]:
        row = dict(zip(cols, line.split(), strict=False))
        try:
            ident = int(row.get("shmid") or row.get("semid") or row["msqid"])
            out.append(
                IpcObject(
                    kind=kind,
                    ident=str(ident),
                    key=int(row["key"]),
                    uid=int(row["uid"]),
                    nattch=int(row.get("nattch", "0")),
                    size=int(row.get("size") or row.get("cbytes") or 0),
                    ctime=int(row["ctime"]),
                )
            )
        except (KeyError, ValueError):
            continue
    return out


def read_sysvipc(proc_root: str = "/proc") -> list[IpcObject]:
    """Every System V IPC object of this IPC namespace; [] where the tables are missing."""
    out: list[IpcObject] = []
    for kind in _KINDS:
        try:
            with open(f"{proc_root}/sysvipc/{kind}") as f:
                out += parse_sysvipc(kind, f.read())
        except OSError:
            continue
    return out


def read_mqueues(mqueue: str = "/dev/mqueue") -> list[IpcObject]:
    """The POSIX message queues on an mqueue mount; [] when none is mounted there."""
    try:
        fd = os.open(mqueue, _O_DIR)
    except OSError:
        return []
    out = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append(
                    IpcObject("mqueue", entry.name, 0, st.st_uid, 0, st.st_size, int(st.st_ctime))
                )
    finally:
        os.close(fd)
    return out


def remove_ipc(
    obj: IpcObject, proc_root: str = "/proc", mqueue: str = "/dev/mqueue"
) -> str | None:
    """Remove obj if it is still the same object, unattached; None when done, else why not.

    The table is re-read right before the call: an id reused by another object (other key,
    owner or ctime) or a segment attached meanwhile is left alone.
    """
    if obj.kind == "mqueue":
        return _unlink_mqueue(obj, mqueue)
    now = {o.ident: o for o in read_sysvipc(proc_root) if o.kind == obj.kind}
    cur = now.get(obj.ident)
    if cur is None:
        return "gone"
    if (cur.key, cur.uid, cur.ctime) != (obj.key, obj.uid, obj.ctime):
        return "changed since it was listed"
    if cur.nattch:
        return f"attached by {cur.nattch} process(es)"
    libc = ctypes.CDLL(None, use_errno=True)
    ident = int(obj.ident)
    if obj.kind == "shm":
        rc = libc.shmctl(ident, IPC_RMID, None)
    elif obj.kind == "sem":
        rc = libc.semctl(ident, 0, IPC_RMID)
    else:
        rc = libc.msgctl(ident, IPC_RMID, None)
    if rc == 0:
        return None
    err = ctypes.get_errno()
    return "gone" if err in (errno.EINVAL, errno.EIDRM) else os.strerror(err)


def _unlink_mqueue(obj: IpcObject, mqueue: str) -> str | None:
    if "/" in obj.ident or obj.ident in (".", ".."):
        return "not a queue name"
    try:
        fd = os.open(mqueue, _O_DIR)
    except OSError as e:
        return e.strerror or str(e)
    try:
        st = os.stat(obj.ident, dir_fd=fd, follow_symlinks=False)
        if st.st_uid != obj.uid:
            return "changed since it was listed"
        os.unlink(obj.ident, dir_fd=fd)
    except FileNotFoundError:
        return "gone"
    except OSError as e:
        return e.strerror or str(e)
    finally:
        os.close(fd)
    return None
