"""Read the process table from /proc: one fast pass for a sweep, one full read per process.

`snapshot()` is the hot path. Per process it costs one open/fstat/read/close of
/proc/PID/stat; /proc/PID/status and /proc/PID/exe are read only where the cheap answer is
not enough (root-owned processes, children of root-owned processes). `read_proc()` reads
everything about one process through one /proc/PID directory fd, for `explain` and for the
action layer's re-check just before it acts.
"""

from __future__ import annotations

import errno
import gc
import os
import threading
import time
from collections.abc import Collection, Iterable
from typing import NamedTuple

from pruned.model import DEAD_STATES, LIVE_LEADER, Proc, Snapshot
from pruned.text import decode

# include/linux/sched.h: set for every kernel thread (kthreadd and its children). Only the
# flag is trusted, never "pid 2 or ppid 2": inside a PID namespace pid 2 is an ordinary process.
PF_KTHREAD = 0x00200000

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STAT_READ = 1024  # /proc/PID/stat is ~300 bytes; comm is at most 64 bytes (kernel threads)
_STATUS_READ = 4096  # "Uid:" is the 9th line; the rest of status is not needed
_CGROUP_READ = 65536  # one line per v1 hierarchy; deep paths are still far below this
_STATES = {c.encode(): c for c in "RSDZTtXxIKWPN"}  # interned one-letter states
_GONE = (FileNotFoundError, ProcessLookupError)  # ENOENT / ESRCH: the process exited


class StatFields(NamedTuple):
    """The fields pruned uses from /proc/PID/stat."""

    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    starttime: int  # field 22: clock ticks after boot

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def zombie(self) -> bool:
        return self.state in DEAD_STATES


def _split_stat(data: bytes) -> tuple[bytes, str, int, int, int, int, int]:
    """(comm, state, ppid, pgrp, session, flags, starttime) of raw stat bytes, or ValueError."""
    # comm is any bytes but NUL (prctl PR_SET_NAME): spaces, '(', ')' and newlines included,
    # and the kernel does not escape it here. Only the LAST ')' ends it (as psutil and procps do).
    lpar = data.find(b"(")
    rpar = data.rfind(b")")
    if lpar < 0 or rpar < lpar:
        raise ValueError(f"garbled stat: no '(comm)' in {data[:80]!r}")
    f = data[rpar + 2 :].split(None, 20)
    if len(f) < 21:
        raise ValueError(f"truncated stat: {len(f)} fields after comm, need at least 20")
    try:
        state = f[0].decode("ascii")
        if state in DEAD_STATES and int(f[17]) > 1:  # field 20, num_threads
            state = LIVE_LEADER
        return (
            data[lpar + 1 : rpar],
            state,
            int(f[1]),
            int(f[2]),
            int(f[3]),
            int(f[6]),
            int(f[19]),
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"garbled stat fields: {e}") from None


def _decode_comm(raw: bytes) -> str:
    # surrogateescape, losslessly: "a\xff" and a comm that spells out the text "a\\xff" stay two
    # names; pruned.text renders the byte as \xNN where it is printed or journalled.
    return raw.decode("utf-8", "surrogateescape")


def parse_stat(text: str) -> StatFields:
    """The StatFields of one /proc/PID/stat text; ValueError if it is truncated or garbled."""
    comm, state, ppid, pgrp, session, flags, starttime = _split_stat(
        text.encode("utf-8", "surrogateescape")
    )
    return StatFields(
        comm.decode("utf-8", "surrogateescape"), state, ppid, pgrp, session, flags, starttime
    )


class StatusFields(NamedTuple):
    """The fields pruned uses from /proc/PID/status."""

    state: str  # the letter of "State:\tS (sleeping)"
    uid: int  # real uid: what a process *is*; the /proc owner is only its effective uid
    euid: int


def _parse_status(data: bytes) -> StatusFields:
    """StatusFields of raw status bytes (starting at a line start), or ValueError."""
    # "Name:" comes first but is escaped by the kernel (a comm holding "\nUid:" prints as
    # "\\nUid:"), so the first line-start match of each key is genuine.
    i = data.find(b"\nUid:")
    if i < 0:
        raise ValueError("no Uid: line in status")
    end = data.find(b"\n", i + 5)
    line = data[i + 5 : end if end >= 0 else len(data)]
    parts = line.split()  # "Uid:\treal\teffective\tsaved\tfs"
    if len(parts) < 2:
        raise ValueError(f"garbled Uid: line {line!r}")
    j = data.find(b"\nState:", 0, i)
    state = data[j + 7 : j + 12].split()[:1] if j >= 0 else []
    try:
        return StatusFields(state[0].decode("ascii") if state else "", int(parts[0]), int(parts[1]))
    except ValueError:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"garbled Uid: line {line!r}") from None


def parse_status(text: str) -> StatusFields:
    """StatusFields of /proc/PID/status text; ValueError if there is no valid Uid: line."""
    return _parse_status(b"\n" + text.encode("utf-8", "surrogateescape"))


def parse_cgroup(text: str) -> tuple[str, ...]:
    """The raw "hierarchy-id:controllers:path" lines of /proc/PID/cgroup (v1 and v2 "0::/path")."""
    # Only "\n" ends a line: the kernel prints cgroup names unescaped and refuses only "\n" in
    # them, so str.splitlines() (which also splits at \r, \v, \f, \x1c-\x1e, \x85, \u2028)
    # would cut a name a user chose into a second, forged line.
    return tuple(line for line in text.split("\n") if line.count(":") >= 2)


def boot_time(proc_root: str = "/proc") -> float:
    """Boot time in epoch seconds, to turn starttime ticks into dates and ages.

    For the live /proc: now minus CLOCK_BOOTTIME, the clock starttime counts on (kernel
    start_boottime). /proc/stat's btime is truncated to whole seconds, which made every age
    up to 1 s too old (a 1.5 s old process passed a 2 s min_age). A fake proc_root (tests)
    gives its btime line.
    """
    if proc_root == "/proc":
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    with open(os.path.join(proc_root, "stat"), "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise ValueError(f"no btime line in {proc_root}/stat")


def _read_at(name: str, dfd: int, size: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_status(name: str, dfd: int) -> StatusFields:
    return _parse_status(b"\n" + _read_at(name, dfd, _STATUS_READ))


def snapshot(proc_root: str = "/proc", *, exe_all: bool = False) -> Snapshot:
    """The whole process table in one pass over proc_root (see the module docstring for costs)."""
    taken_at = time.time()
    btime = boot_time(proc_root)
    dfd = os.open(proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # The walk allocates one acyclic Proc per process; with the collector on, tens of thousands
    # of allocations trigger collections that rescan every live object (the last snapshot too).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        procs, vanished, garbled, denied, hidden = _walk(dfd, exe_all)
    finally:
        os.close(dfd)
        if gc_was_enabled:
            gc.enable()
    return Snapshot(
        procs=procs,
        taken_at=taken_at,
        boot_time=btime,
        clk_tck=_CLK_TCK,
        vanished=vanished,
        unreadable=unreadable_notes(garbled, hidden, denied),
    )


def unreadable_notes(garbled: int, hidden: int, denied: int) -> tuple[str, ...]:
    """Snapshot.unreadable: one line per kind of record the walk could not read in full."""
    unreadable: list[str] = []
    if garbled:
        unreadable.append(f"stat of {garbled} processes garbled: skipped")
    if hidden:
        unreadable.append(f"stat or status of {hidden} processes not readable (hidepid=?)")
    if denied:
        hint = "permission denied" if os.geteuid() == 0 else "run as root"
        unreadable.append(f"exe of {denied} processes not readable: {hint}")
    return tuple(unreadable)


def _walk(dfd: int, exe_all: bool) -> tuple[dict[int, Proc], int, int, int, int]:
    """First pass: stat (+ status and exe for root-owned); second pass: exe of root's children."""
    procs, root_owned, vanished, garbled, denied, hidden = read_some(dfd, os.listdir(dfd), exe_all)
    denied += exe_pass(dfd, procs, root_owned, exe_all, procs)
    return procs, vanished, garbled, denied, hidden


def is_root_owned(p: Proc) -> bool:
    """A user-space process whose status showed real or effective uid 0 (what the exe pass
    keys on: the exe of its children is read)."""
    return p.uid_exact and (p.uid == 0 or p.euid == 0)


def read_some(
    dfd: int, names: Iterable[str], exe_all: bool
) -> tuple[dict[int, Proc], set[int], int, int, int, int]:
    """The first pass over the /proc entries `names` (non-pid names are skipped): (records,
    root-owned pids, vanished, garbled, exe denied, hidden). pruned.linux.proccache re-reads
    the changed processes of an incremental sweep through this very loop."""
    # Local bindings: this loop runs once per process, and global/attribute lookups show up.
    _open, _fstat, _read, _close, _readlink = os.open, os.fstat, os.read, os.close, os.readlink
    rdonly = os.O_RDONLY | os.O_CLOEXEC
    kflag = PF_KTHREAD
    states = _STATES
    dead = DEAD_STATES
    procs: dict[int, Proc] = {}
    root_owned: set[int] = set()
    vanished = garbled = denied = hidden = 0
    # One object per distinct comm, owner and parent pid rather than one per process: at
    # 100,000 processes these copies were ~140 bytes of every record (bench_memory.py), and a
    # dict hit is cheaper than decoding the comm again.
    comms: dict[bytes, str] = {}
    ints: dict[int, int] = {}

    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = _open(name + "/stat", rdonly, dir_fd=dfd)
        except _GONE:
            vanished += 1
            continue
        except OSError:  # EACCES: /proc mounted with hidepid=, and we are not root
            hidden += 1
            continue
        try:
            # The owner of a file in /proc/PID is the effective uid of a dumpable process, and
            # root for a non-dumpable one, a zombie or a kernel thread: root means "read status".
            owner = _fstat(fd).st_uid
            data = _read(fd, _STAT_READ)
        except _GONE:
            vanished += 1
            continue
        finally:
            _close(fd)
        # _split_stat inlined (a call and a tuple per process are measurable here); the tests
        # run the same table of stat texts through parse_stat() and through this loop.
        lpar = data.find(b"(")
        rpar = data.rfind(b")")
        f = data[rpar + 2 :].split(None, 20)
        try:
            if lpar < 0 or rpar < lpar or len(f) < 21:
                raise ValueError
            state = states.get(f[0]) or f[0].decode("ascii")
            if state in dead and int(f[17]) > 1:  # see _split_stat
                state = LIVE_LEADER
            ppid, pgrp, session, flags, starttime = (
                int(f[1]), int(f[2]), int(f[3]), int(f[6]), int(f[19])
            )  # fmt: skip
        except ValueError:  # UnicodeDecodeError is a ValueError
            garbled += 1
            continue
        raw = data[lpar + 1 : rpar]
        comm = comms.get(raw)
        if comm is None:
            comm = comms[raw] = raw.decode("utf-8", "surrogateescape")  # see _decode_comm
        pid = int(name)
        ppid = ints.setdefault(ppid, ppid)
        owner = ints.setdefault(owner, owner)
        if pgrp == pid:
            pgrp = pid
        if session == pgrp:
            session = pgrp
        if owner and not flags & kflag:
            procs[pid] = Proc(
                pid,
                starttime,
                ppid,
                owner,
                comm,
                state,
                False,
                None,
                False,
                None,
                (),
                pgrp,
                session,
            )
            continue
        if flags & kflag:
            procs[pid] = Proc(
                pid, starttime, ppid, 0, comm, state, True, 0, False, None, (), pgrp, session
            )
            continue
        # Root-owned user-space process: the exact real uid decides, so a setuid-root program
        # or a non-dumpable process of a user never passes as root.
        try:
            _state, uid, euid = _read_status(name + "/status", dfd)
        except _GONE:
            vanished += 1
            continue
        except (OSError, ValueError):
            # Unverified: keep it as uid 0 with uid_exact=False, which nothing treats as a
            # genuine root process and the uid rail keeps from being acted on.
            hidden += 1
            procs[pid] = Proc(
                pid, starttime, ppid, 0, comm, state, False, None, False, None, (), pgrp, session
            )
            continue
        exe = None
        if uid == 0 or euid == 0:
            root_owned.add(pid)
        if not exe_all:  # exe_all reads every exe in the second pass
            try:
                exe = _readlink(name + "/exe", dir_fd=dfd)
            except PermissionError:
                denied += 1
            except OSError:
                pass  # ENOENT: a zombie has no exe (or it just exited; actors re-check)
        procs[pid] = Proc(
            pid, starttime, ppid, uid, comm, state, False, euid, True, exe, (), pgrp, session
        )

    return procs, root_owned, vanished, garbled, denied, hidden


def exe_pass(
    dfd: int, procs: dict[int, Proc], root_owned: Collection[int], exe_all: bool,
    pids: Iterable[int],
) -> int:
    """Second pass, over `pids` of `procs` (updated in place): the exe of every process whose
    parent is root-owned (sshd's user session under "sshd: user [priv]", slurmstepd's tasks,
    daemons reparented to pid 1), or of all. Returns how many exe links were denied."""
    _readlink = os.readlink
    denied = 0
    for pid in pids:  # only values are replaced: iterating procs itself is fine
        p = procs[pid]
        if p.kthread or p.exe is not None:
            continue
        if not (exe_all or (p.ppid in root_owned and pid not in root_owned)):
            continue
        try:
            exe = _readlink(f"{pid}/exe", dir_fd=dfd)
        except PermissionError:
            denied += 1
            continue
        except OSError:
            continue
        procs[pid] = Proc(pid, p.starttime, p.ppid, p.uid, p.comm, p.state, False,
                          p.euid, p.uid_exact, exe, (), p.pgid, p.sid)  # fmt: skip
    return denied


def read_proc(pid: int, proc_root: str = "/proc", *, cgroups: bool = True) -> Proc | None:
    """Everything about one process (stat, exact uids, exe, cgroup lines); None if it is gone.

    `cgroups=False` skips the cgroup file (~9 µs): for callers that only need identity.
    """
    # Every read goes through one /proc/PID directory fd: once that process exits, reads through
    # it fail with ESRCH/ENOENT even if the pid is reused, so the fields all describe one process.
    try:
        dfd = os.open(f"{proc_root}/{int(pid)}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except _GONE:
        return None
    except NotADirectoryError:
        return None
    try:
        try:
            fields = _split_stat(_read_at("stat", dfd, _STAT_READ))
            _state, uid, euid = _read_status("status", dfd)
            lines = (
                parse_cgroup(decode(_read_at("cgroup", dfd, _CGROUP_READ)))
                if cgroups
                else ()
            )
        except _GONE:
            return None
        comm, state, ppid, pgrp, session, flags, starttime = fields
        try:
            exe: str | None = os.readlink("exe", dir_fd=dfd)
        except OSError:
            exe = None  # zombie, kernel thread, or not root
        return Proc(pid, starttime, ppid, uid, _decode_comm(comm), state, bool(flags & PF_KTHREAD),
                    euid, True, exe, lines, pgrp, session)  # fmt: skip
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- one file of one pid
# Small readers for the actors' re-checks: each opens one file of /proc/PID and turns "the
# process is gone" (ENOENT, ESRCH) into None, so a vanished process is data, not an error.


def _read_pid_file(proc_root: str, pid: int, name: str, size: int) -> bytes | None:
    try:
        fd = os.open(f"{proc_root}/{int(pid)}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except _GONE:
        return None
    try:
        return os.read(fd, size)
    except _GONE:
        return None
    finally:
        os.close(fd)


def read_stat(pid: int, proc_root: str = "/proc") -> StatFields | None:
    """The StatFields of pid now; None when it is gone (or its stat is garbled)."""
    data = _read_pid_file(proc_root, pid, "stat", _STAT_READ)
    if data is None:
        return None
    try:
        comm, state, ppid, pgrp, session, flags, starttime = _split_stat(data)
    except ValueError:
        return None
    return StatFields(_decode_comm(comm), state, ppid, pgrp, session, flags, starttime)


def read_status(pid: int, proc_root: str = "/proc") -> StatusFields | None:
    """State and real/effective uid of pid from its status; None when it is gone."""
    data = _read_pid_file(proc_root, pid, "status", _STATUS_READ)
    if data is None:
        return None
    try:
        return _parse_status(b"\n" + data)
    except ValueError:
        return None


def read_real_uid(pid: int, proc_root: str = "/proc") -> int | None:
    """The real uid of pid (what it is, whatever its effective uid); None when it is gone."""
    st = read_status(pid, proc_root)
    return None if st is None else st.uid


def read_cgroup_lines(pid: int, proc_root: str = "/proc") -> tuple[str, ...]:
    """The raw /proc/PID/cgroup lines of pid; () when it is gone."""
    data = _read_pid_file(proc_root, pid, "cgroup", _CGROUP_READ)
    return () if data is None else parse_cgroup(decode(data))


def read_exe(pid: int, proc_root: str = "/proc") -> str | None:
    """readlink of /proc/PID/exe; None when gone, a zombie or a kernel thread.

    PermissionError is raised, not swallowed: without root pruned cannot tell daemons apart,
    and the caller must say so.
    """
    try:
        return os.readlink(f"{proc_root}/{int(pid)}/exe")
    except _GONE:
        return None


# ---------------------------------------------------------------- argv and environment
# /proc/PID/cmdline and environ are copied out of the target's memory (access_remote_vm), under
# its mmap lock. A process that holds that lock while it sleeps in D state -- faulting on a
# FUSE-backed mapping whose daemon hangs, say -- blocks our read(2) uninterruptibly, and a
# user can arrange that. So these two are read in a worker thread with a deadline; a read that
# misses it is abandoned (its thread stays blocked until the kernel lets go) and the caller is
# told it timed out, never that the file was empty. At most MAX_STUCK_READS threads are left
# behind; beyond that a read times out at once rather than pile up threads.
# A sweep reads neither for ordinary processes (snapshot() never does): only the cmdline of a
# genuine root slurmstepd (its job number) and, in an epilog, the environ of the uid's strays.

CMDLINE_READ = 128 << 10  # argv pruned parses is slurmstepd's (~100 bytes); a user's argv can
# be up to ARG_MAX (stack rlimit / 4, 2 MiB by default, more with a bigger stack): read no more
ENVIRON_READ = 256 << 10  # Slurm and PBS set the job id variables among the first few KiB of a
# task's environment; an environment bigger than this hides its tail, which only means the
# epilog does not kill that process on the environment hint (never the reverse)
READ_TIMEOUT = 0.5  # seconds; an unblocked read of 256 KiB takes well under a millisecond
MAX_STUCK_READS = 4

_stuck = 0
_stuck_lock = threading.Lock()


class ReadTimedOut(TimeoutError):
    """Reading a process's cmdline or environ did not finish in time (see above)."""


class _PendingRead:
    """One read_mm_file read, shared by the caller and its worker (under _stuck_lock)."""

    __slots__ = ("abandoned", "data", "error")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.error: Exception | None = None
        self.abandoned = False


def _read_capped(path: str, limit: int) -> bytes | None:
    """At most `limit` bytes of path, in one pass of chunks (linear in size); None if gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except _GONE:
        return None
    try:
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except _GONE:
        return None
    finally:
        os.close(fd)


def read_mm_file(
    pid: int, name: str, proc_root: str = "/proc", *, limit: int, timeout: float = READ_TIMEOUT
) -> bytes | None:
    """At most `limit` bytes of /proc/PID/<name> (cmdline or environ) within `timeout`
    seconds; None when the process is gone. ReadTimedOut when the read blocks; other
    OSErrors (EACCES) as they come."""
    global _stuck
    path = f"{proc_root}/{int(pid)}/{name}"
    with _stuck_lock:
        if _stuck >= MAX_STUCK_READS:
            raise ReadTimedOut(f"{path}: timed out ({_stuck} earlier reads still blocked)")
    st = _PendingRead()
    done = threading.Event()

    def work() -> None:
        global _stuck
        try:
            st.data = _read_capped(path, limit)
        except Exception as e:  # handed to the caller, who decides
            st.error = e
        finally:
            with _stuck_lock:
                done.set()
                if st.abandoned:  # the caller gave up on us: no longer stuck
                    _stuck -= 1

    try:
        threading.Thread(target=work, name="pruned-procread", daemon=True).start()
    except RuntimeError as e:  # no thread to be had (pids exhausted in a fork storm): unread
        raise OSError(errno.EAGAIN, f"no reader thread: {e}", path) from None
    if not done.wait(timeout):
        with _stuck_lock:
            if not done.is_set():
                st.abandoned = True
                _stuck += 1
                raise ReadTimedOut(f"{path}: timed out after {timeout:g}s")
    if st.error is not None:
        raise st.error
    return st.data


def read_cmdline(
    pid: int, proc_root: str = "/proc", limit: int = CMDLINE_READ, timeout: float = READ_TIMEOUT
) -> bytes:
    """At most `limit` bytes of pid's NUL-separated argv; b"" when gone, unreadable or it
    timed out (read_mm_file tells these apart).

    argv is the process's to set: only trusted for a process already known to be root's.
    """
    try:
        return read_mm_file(pid, "cmdline", proc_root, limit=limit, timeout=timeout) or b""
    except OSError:
        return b""


def read_environ(
    pid: int, proc_root: str = "/proc", limit: int = ENVIRON_READ, timeout: float = READ_TIMEOUT
) -> bytes:
    """At most `limit` bytes of pid's NUL-separated environment; b"" when gone, unreadable or
    it timed out (read_mm_file tells these apart)."""
    try:
        return read_mm_file(pid, "environ", proc_root, limit=limit, timeout=timeout) or b""
    except OSError:
        return b""


def list_pids(proc_root: str = "/proc") -> list[int]:
    """The pids listed in proc_root now (threads are not listed); [] if it cannot be read."""
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit()]


def read_stats(
    proc_root: str = "/proc", owners: Collection[int] | None = None
) -> dict[int, StatFields]:
    """pid -> StatFields of every live pid: the kill re-walk's view of parents and sessions.

    `owners`: only the pids whose /proc/PID is owned by root or by one of these uids. The
    owner is a dumpable process's effective uid, and root for anything non-dumpable (setuid,
    a changed euid, zombies, kernel threads), so a process of real uid U shows an owner
    other than 0 and U only if it made itself dumpable again (prctl) after changing its
    euid. A kill walk of a tree of uid U skips the rest at one stat of the directory
    (~2 µs, against ~11 µs for reading stat): what a node's other users run no longer
    makes every kill slower (bench/README.md, "Event path"). The sweep attributes such a
    process to its owner too.
    """
    out: dict[int, StatFields] = {}
    if owners is None:
        for pid in list_pids(proc_root):
            st = read_stat(pid, proc_root)
            if st is not None:
                out[pid] = st
        return out
    try:
        dfd = os.open(proc_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return out
    try:
        _stat = os.stat
        for name in os.listdir(dfd):
            if not name.isdigit():
                continue
            try:
                owner = _stat(name, dir_fd=dfd, follow_symlinks=False).st_uid
            except OSError:
                continue
            if owner and owner not in owners:
                continue
            pid = int(name)
            st = read_stat(pid, proc_root)
            if st is not None:
                out[pid] = st
    finally:
        os.close(dfd)
    return out


def age_of(starttime: int, proc_root: str = "/proc") -> float:
    """Seconds since a process that started at `starttime` ticks after boot started."""
    return time.time() - (boot_time(proc_root) + starttime / _CLK_TCK)


def exe_link_targets(paths: Iterable[str]) -> frozenset[str]:
    """The paths plus where their symlinks lead: /proc/PID/exe shows the resolved binary.

    Debian's /usr/sbin/slurmstepd is an alternatives link to /usr/sbin/slurmstepd-wlm.
    """
    paths = tuple(paths)
    return frozenset(paths) | {os.path.realpath(p) for p in paths}
