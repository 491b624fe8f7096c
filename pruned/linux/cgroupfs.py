"""The cgroup filesystem: read member pids, list child cgroups, write control files, and
the quarantine cgroup the fork-bomb path freezes a tree in.

Knows cgroupfs, not Slurm: which cgroups are a job's is pruned.jobs' business.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time


def read_procs(path: str) -> list[int]:
    """Pids in a `cgroup.procs` file; [] when the cgroup is gone (or vanished mid-read).

    Other OS errors are raised (an unreadable tree is a problem the caller must report),
    and so is ValueError for garbage in the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno == errno.ENODEV:  # cgroup removed between open and read
            return []
        raise
    return [int(x) for x in data.split()]


def read_text(path: str) -> str:
    """A small control file's text (freezer.state, cgroup.events); "" when unreadable."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def write_text(path: str, text: str) -> None:
    """One write(2) of `text` to a control file (cgroup.procs, freezer.state, cgroup.kill).

    The kernel acts on each write as one command, so it must not be split or buffered.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def ensure_task_special(path: str) -> None:
    """Create a v2 step's `user/task_special` leaf if it is missing, as slurmstepd does when it
    adopts a process (Slurm 26.05 makes it only then): a process may only join a leaf, and
    this is the leaf Slurm kills with the job. Any other missing directory stays missing."""
    if path.endswith("/user/task_special") and os.path.isdir(os.path.dirname(path)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)


def subdirs(path: str, prefix: str) -> list[tuple[str, str]]:
    """(suffix after `prefix`, full path) of the child directories of `path` named prefix*,
    sorted; [] when `path` is gone. Symlinks are never followed."""
    out = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                    out.append((entry.name[len(prefix) :], entry.path))
    except FileNotFoundError:
        return []
    return sorted(out)


def v2_mount(cgroup_root: str = "/sys/fs/cgroup") -> str | None:
    """Where the v2 (unified) hierarchy is mounted: the root itself, or `unified` on a
    hybrid node; None on a v1-only node."""
    for v2 in (cgroup_root, f"{cgroup_root}/unified"):
        if os.path.exists(f"{v2}/cgroup.controllers"):
            return v2
    return None


class ProcsWriter:
    """One open cgroup.procs for many moves: one write(2) per pid, no open/close each."""

    def __init__(self, cgroup_dir: str) -> None:
        self.fd = os.open(f"{cgroup_dir}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def move(self, pid: int) -> bool:
        """Move pid (its whole thread group) in; False if it is gone. Other errors raise."""
        try:
            os.write(self.fd, str(pid).encode())
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EINVAL, errno.ENOENT):
                return False
            raise
        return True

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------- quarantine


def quarantine_method(cgroup_root: str = "/sys/fs/cgroup") -> str:
    """Which freezer this node offers: 'freezer-v1', 'cgroup.freeze' (v2) or 'sigstop'."""
    if os.path.exists(f"{cgroup_root}/freezer/cgroup.procs"):
        return "freezer-v1"
    for v2 in (f"{cgroup_root}/unified", cgroup_root):
        if os.path.exists(f"{v2}/cgroup.controllers"):
            return "cgroup.freeze"
    return "sigstop"


class Quarantine:
    """A fresh freezer cgroup (v1 freezer or v2 cgroup.freeze) that the tree is moved into."""

    def __init__(self, method: str, cgroup_root: str) -> None:
        self.v1 = method == "freezer-v1"
        base = (
            f"{cgroup_root}/freezer"
            if self.v1
            else (
                f"{cgroup_root}/unified"
                if os.path.exists(f"{cgroup_root}/unified/cgroup.controllers")
                else cgroup_root
            )
        )
        self.base = base
        self.dir = f"{base}/pruned_quarantine_{os.getpid()}_{secrets.token_hex(4)}"
        os.mkdir(self.dir, 0o700)
        self.label = f"{method}:{self.dir}"

    def procs(self) -> set[int]:
        """Pids inside the quarantine now (empty once it is gone)."""
        return set(read_procs(f"{self.dir}/cgroup.procs"))

    def move(self, pid: int, into: bool = True) -> bool:
        """Move pid into the quarantine (or back out to its parent); False if it is gone."""
        try:
            write_text(f"{self.dir if into else self.base}/cgroup.procs", str(pid))
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EINVAL, errno.ENOENT):
                return False
            raise
        return True

    def freeze(self, frozen: bool, deadline: float) -> bool:
        """Freeze (or thaw) and wait until the kernel reports it, or `deadline` passes."""
        if self.v1:
            write_text(f"{self.dir}/freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            write_text(f"{self.dir}/cgroup.freeze", "1" if frozen else "0")
        while time.monotonic() < deadline:
            if self.v1:
                done = read_text(f"{self.dir}/freezer.state").strip() == (
                    "FROZEN" if frozen else "THAWED"
                )
            else:
                done = f"frozen {int(frozen)}" in read_text(f"{self.dir}/cgroup.events")
            if done:
                return True
            time.sleep(0.005)
        return False

    def kill_all(self) -> bool:
        """v2 only: cgroup.kill (5.14+) also kills children still in the middle of fork.
        False when there is no cgroup.kill (v1, or an older kernel): nothing was sent."""
        if not self.v1 and os.path.exists(f"{self.dir}/cgroup.kill"):
            write_text(f"{self.dir}/cgroup.kill", "1")
            return True
        return False

    def remove(self, deadline: float) -> bool:
        """rmdir the quarantine, retrying while it still holds exiting tasks, until `deadline`."""
        while True:
            try:
                os.rmdir(self.dir)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
