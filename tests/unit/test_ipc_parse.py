"""linux.ipc.parse_sysvipc on /proc/sysvipc tables as the kernel prints them."""

from __future__ import annotations

from pruned.linux.ipc import parse_sysvipc
from pruned.model import IpcObject

SHM = (
    "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid"
    "      atime      dtime      ctime                   rss                  swap\n"
    "         0      32769  1666                  8192  4242  4242      1 30001 30001 30001 30001"
    " 1764646000 1764646001 1764645999                  4096                     0\n"
    "garbage line\n"
)
SEM = (
    "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n"
    "1234567890          3   600          2 30001 30001 30001 30001          0 1764645999\n"
)
MSG = (
    "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid"
    "      stime      rtime      ctime\n"
    "         0          0   600          17          1     0     0 30002 30002 30002 30002"
    "          0          0 1764645998\n"
)


def test_parse_sysvipc_tables() -> None:
    assert parse_sysvipc("shm", SHM) == [
        IpcObject("shm", "32769", 0, 30001, 1, 8192, 1764645999)
    ]
    assert parse_sysvipc("sem", SEM) == [IpcObject("sem", "3", 1234567890, 30001, 0, 0, 1764645999)]
    assert parse_sysvipc("msg", MSG) == [IpcObject("msg", "0", 0, 30002, 0, 17, 1764645998)]
    assert parse_sysvipc("shm", "") == [] and parse_sysvipc("shm", SHM.splitlines()[0]) == []
    assert IpcObject("shm", "5", 0, 1, 0, 0, 0).label == "sysv-shm:5"
    assert IpcObject("mqueue", "q", 0, 1, 0, 0, 0).label == "mqueue:/q"
