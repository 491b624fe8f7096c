"""Which jobs run on this node and which pids sit in which job cgroup: node-local only.

Two sources, merged by `read_jobs`:
- `SlurmCgroupSource` reads Slurm's cgroup tree (v1 `<ctrl>/slurm*/uid_U/job_J/step_S[/task_N]`,
  v2 `system.slice/[<node>_]slurmstepd.scope/job_J/step_S/{slurm,user[/task_N]}`), membership
  from the `cgroup.procs` files (far cheaper than /proc/PID/cgroup for every process).
- `StateDirSource` reads the per-job records `pruned prolog` / `pruned epilog` write into a
  root-only directory (Torque/PBS, HTCondor, gLExec pool accounts).

A view with `problems` makes the sweep report-only: when in doubt, pruned reports and waits.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pruned.jobs.history import parse_record
from pruned.linux.atomic import ensure_private_dir, write_json_atomic
from pruned.model import Job, JobView, Membership

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_STEPD_PATHS = ("/usr/sbin/slurmstepd",)
DEFAULT_SLURMD_PATHS = ("/usr/sbin/slurmd",)
DEFAULT_SLURMD_PIDFILES = ("/run/slurmd.pid", "/var/run/slurmd.pid")
DEFAULT_STATE_DIR = "/var/lib/pruned"
JOBS_SUBDIR = "jobs"

_V1_RE = re.compile(
    r"(?:^|/)(?P<root>slurm[^/]*)/uid_(?P<uid>\d+)/job_(?P<job>\d+)"
    r"(?:/step_(?P<step>[^/]+)(?:/task_(?P<task>\d+))?)?/?$"
)
_V2_RE = re.compile(
    r"(?:^|/)(?P<root>system\.slice/(?:[^/]+_)?slurmstepd\.scope)/job_(?P<job>\d+)"
    r"(?:/step_(?P<step>[^/]+)(?:/(?P<slot>slurm|user)(?:/task_(?P<task>\d+))?)?)?/?$"
)
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_GONE = (FileNotFoundError, ProcessLookupError)
_DEAD = ("Z", "X", "x")
_UID_SAMPLE = 64  # member processes looked at to infer a v2 job's uid


class JobSource(Protocol):
    """Anything that can tell which jobs this node has."""

    name: str

    def read(self) -> JobView: ...


# ------------------------------------------------------------------ pure path parsing


@dataclass(frozen=True, slots=True)
class SlurmPath:
    """What a Slurm job cgroup path says."""

    version: int  # 1 or 2
    root: str  # "slurm_vm" (v1) or "system.slice/vm_slurmstepd.scope" (v2)
    job_id: str
    uid: int | None  # only v1 paths carry it
    step: str | None  # "batch", "extern", "0", ...; None at job level
    task: str | None = None
    stepd: bool = False  # v2 ".../step_S/slurm": the slot of the step's slurmstepd


def parse_slurm_cgroup_path(path: str) -> SlurmPath | None:
    """Parse a job cgroup path (`/slurm_vm/uid_1/job_2/step_0`, a /proc/PID/cgroup line, or an
    absolute path under a cgroup mount); None when it is not inside a Slurm job."""
    colon = path.find(":/")
    if colon >= 0 and not path.startswith("/"):
        path = path[colon + 1 :]  # "6:freezer:/slurm..." or "0::/system.slice/..."
    if m := _V1_RE.search(path):
        return SlurmPath(1, m["root"], m["job"], int(m["uid"]), m["step"], m["task"])
    if m := _V2_RE.search(path):
        if m["task"] is not None and m["slot"] != "user":
            return None
        return SlurmPath(2, m["root"], m["job"], None, m["step"], m["task"], m["slot"] == "slurm")
    return None


# ------------------------------------------------------------------ small readers


def _read_pids(path: str) -> list[int]:
    """Pids in a cgroup.procs file; [] when the cgroup vanished meanwhile."""
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno == errno.ENODEV:  # cgroup removed between open and read
            return []
        raise


def _subdirs(path: str, prefix: str) -> list[tuple[str, str]]:
    """(suffix after `prefix`, full path) of the subdirectories of `path` named prefix*."""
    out = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                    out.append((entry.name[len(prefix) :], entry.path))
    except FileNotFoundError:
        return []
    return sorted(out)


def _proc_status(proc_root: str, pid: int) -> tuple[str, int] | None:
    """(state letter, real uid) of a pid from /proc/PID/status; None when it is gone."""
    try:
        with open(f"{proc_root}/{pid}/status") as f:
            text = f.read()
    except _GONE:
        return None
    state, ruid = "", -1
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("Uid:"):
            ruid = int(line.split()[1])
            break  # Uid comes after State
    if not state or ruid < 0:
        return None
    return state, ruid


def _proc_age(proc_root: str, pid: int) -> float | None:
    """Seconds since pid started (stat field 22 against btime); None when unknown."""
    try:
        with open(f"{proc_root}/{pid}/stat") as f:
            starttime = int(f.read().rsplit(")", 1)[1].split()[19])  # comm may hold ')'
        with open(f"{proc_root}/stat") as f:
            btime = next(int(x.split()[1]) for x in f if x.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return time.time() - (btime + starttime / os.sysconf("SC_CLK_TCK"))


def _exe(proc_root: str, pid: int) -> str | None:
    """readlink /proc/PID/exe without the " (deleted)" a package upgrade adds; None if gone."""
    try:
        return os.readlink(f"{proc_root}/{pid}/exe").removesuffix(" (deleted)")
    except _GONE:  # also zombies and kernel threads
        return None


# ------------------------------------------------------------------ the Slurm cgroup source


@dataclass
class _JobAcc:
    """What one read gathered about one job, across controllers."""

    job_id: str
    uid: int | None = None
    job_dirs: list[str] = field(default_factory=list)
    extern_dirs: list[str] = field(default_factory=list)
    pids: dict[int, None] = field(default_factory=dict)  # ordered set: job level first
    # pid -> step, for uid inference on v2 (stepd slots excluded)
    user_pids: dict[int, str | None] = field(default_factory=dict)


class SlurmCgroupSource:
    """Jobs and their pids from Slurm's cgroup tree (cgroup v1, hybrid or pure v2).

    Running: a job is running iff a live process whose /proc/PID/exe is one of
    `stepd_paths` and whose *real* uid (from /proc/PID/status) is 0 is a member of the
    job's cgroups. A job cgroup that holds processes but no such slurmstepd is a crashed
    step: not running, and its processes are strays. Empty job cgroups are not running and
    are no problem.

    Problems ("looks wrong" rules; any of them makes the sweep report-only):
    - the cgroup root is missing or unreadable, or holds no cgroup hierarchy at all;
    - a `slurm*` tree (v1) or slurmstepd scope (v2) exists but cannot be read, or a member's
      /proc/PID/exe cannot be read (pruned not root): running jobs cannot be told apart;
    - job cgroups hold processes but no live root slurmd (`slurmd_paths`) runs on the node:
      with slurmd down nothing can say whether a job still exists ("slurmd is not running:
      job state unknown"). A crashed step while slurmd is alive is a stale job, not a problem;
    - a live root slurmstepd sits in no job cgroup (and not in a v2 scope's `system` slot):
      the tree is not where we look (proctrack/linuxproc, another cgroup root, or a step
      still being set up: stepds younger than `stepd_grace` seconds are let be). Its job's
      processes would look like strays, so hold off. This costs one readlink per process
      (~10 µs); `find_outside_stepds=False` skips it.
    Pids that vanish during the read are skipped silently: races are normal.
    """

    name = "slurm"

    def __init__(
        self,
        cgroup_root: str = DEFAULT_CGROUP_ROOT,
        stepd_paths: Sequence[str] = DEFAULT_STEPD_PATHS,
        proc_root: str = "/proc",
        slurmd_paths: Sequence[str] = DEFAULT_SLURMD_PATHS,
        slurmd_pidfiles: Sequence[str] = DEFAULT_SLURMD_PIDFILES,
        v2_scopes: Sequence[str] = (),
        search_v2: bool = True,
        find_outside_stepds: bool = True,
        stepd_grace: float = 10.0,
    ) -> None:
        self.cgroup_root = cgroup_root.rstrip("/") or "/"
        self.stepd_paths = frozenset(stepd_paths)
        self.proc_root = proc_root
        self.slurmd_paths = frozenset(slurmd_paths)
        self.slurmd_pidfiles = tuple(slurmd_pidfiles)
        self.v2_scopes = tuple(s.rstrip("/") for s in v2_scopes)
        self.search_v2 = search_v2
        self.find_outside_stepds = find_outside_stepds
        self.stepd_grace = stepd_grace

    def read(self) -> JobView:
        """One read of the tree and the member processes."""
        return _SlurmRead(self).run()


def root_exe_matches(exe: str | None, paths: frozenset[str]) -> bool:
    """Whether a *real-root* process's exe is one of the daemon `paths`.

    Also true for the same binary name anywhere and for a binary replaced on disk
    (`... (deleted)`): a package upgrade or a versioned install (/opt/slurm/<v>/sbin, a moved
    `current` link) must not make every running job look ended while its slurmstepd runs
    on. Only the caller's real-uid-0 check makes this safe: users cannot make root processes.
    """
    if not exe:
        return False
    exe = exe.removesuffix(" (deleted)")
    return exe in paths or os.path.basename(exe) in {os.path.basename(p) for p in paths}


def exe_paths(paths: Iterable[str]) -> frozenset[str]:
    """The paths plus where their symlinks lead: /proc/PID/exe shows the resolved binary.

    Debian's /usr/sbin/slurmstepd is an alternatives link to /usr/sbin/slurmstepd-wlm.
    """
    return frozenset(paths) | {os.path.realpath(p) for p in paths}


class _SlurmRead:
    """The state of one SlurmCgroupSource.read(): accumulators and per-pid caches."""

    def __init__(self, src: SlurmCgroupSource) -> None:
        self.src = src
        # Resolved per read: an alternatives switch must not need a restart.
        self.stepd_paths = exe_paths(src.stepd_paths)
        self.slurmd_paths = exe_paths(src.slurmd_paths)
        self.jobs: dict[str, _JobAcc] = {}
        self.members: dict[int, tuple[int, Membership]] = {}  # pid -> (depth, membership)
        self.infra_pids: set[int] = set()  # v2 slurmstepd.scope/system
        self.problems: list[str] = []
        self._status: dict[int, tuple[str, int] | None] = {}
        self._stepd: dict[int, bool] = {}
        self._exe_denied = False

    # -------------------------------------------------------- top level

    def run(self) -> JobView:
        root = self.src.cgroup_root
        try:
            top = os.listdir(root)
        except OSError as e:
            return self._view_with(f"cgroup root {root}: {e.strerror or e}")
        v2_roots: list[str] = []
        if "cgroup.controllers" in top:  # pure v2: the root itself is cgroup2
            v2_roots.append(root)
        else:
            v1_count = self._read_v1_all(root, top)
            unified = os.path.join(root, "unified")
            if os.path.exists(os.path.join(unified, "cgroup.controllers")):
                v2_roots.append(unified)
            elif v1_count == 0:
                self.problems.append(f"cgroup root {root}: no cgroup hierarchy mounted")
        scopes: list[tuple[str, str]] = []  # (scope dir, v2 mount root for labels)
        if self.src.search_v2:
            for v2root in v2_roots:
                scopes += [(p, v2root) for p in self._find_scopes(v2root)]
        for scope in self.src.v2_scopes:
            label_root = next((r for r in v2_roots if scope.startswith(r + "/")), "")
            if (scope, label_root) not in scopes:
                scopes.append((scope, label_root))
        for scope, label_root in scopes:
            self._guard(scope, self._read_v2_scope, scope, label_root)
        return self._finish()

    def _view_with(self, problem: str) -> JobView:
        return JobView(jobs={}, membership={}, problems=(problem,), sources=(self.src.name,))

    def _guard(self, where: str, fn: Callable[..., None], *args: object) -> None:
        """Run one tree reader; an unreadable tree becomes a problem line, not a traceback."""
        try:
            fn(*args)
        except OSError as e:
            self.problems.append(f"cannot read {e.filename or where}: {e.strerror or e}")
        except ValueError as e:  # garbage in a cgroup.procs file
            self.problems.append(f"cannot parse {where}: {e}")

    # -------------------------------------------------------- v1

    def _read_v1_all(self, root: str, top: list[str]) -> int:
        """Read every v1 hierarchy's slurm* trees; return how many hierarchies there are."""
        seen: set[tuple[int, int]] = set()
        count = 0
        # freezer first: it is proctrack/cgroup's own hierarchy, so it wins ties.
        for ctrl in sorted(top, key=lambda c: (c != "freezer", c)):
            path = os.path.join(root, ctrl)
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                    continue  # "cpu" -> "cpu,cpuacct" symlinks: read each hierarchy once
                seen.add((st.st_dev, st.st_ino))
                entries = os.listdir(path)
            except OSError as e:
                if not isinstance(e, FileNotFoundError):
                    self.problems.append(f"cannot read {path}: {e.strerror or e}")
                continue
            if "cgroup.procs" not in entries or "cgroup.controllers" in entries:
                continue  # not a v1 hierarchy (the v2 "unified" mount, or not a cgroup at all)
            count += 1
            for name in sorted(entries):
                if name.startswith("slurm") and os.path.isdir(os.path.join(path, name)):
                    tree = os.path.join(path, name)
                    self._guard(tree, self._read_v1_tree, ctrl, path, tree)
        return count

    def _read_v1_tree(self, ctrl: str, mount: str, tree: str) -> None:
        label = "name=systemd" if ctrl == "systemd" else ctrl  # as /proc/PID/cgroup says it
        for uid_s, uid_dir in _subdirs(tree, "uid_"):
            if not uid_s.isdigit():
                continue
            for job_id, job_dir in _subdirs(uid_dir, "job_"):
                if not job_id.isdigit():
                    continue
                acc = self._job(job_id)
                if acc.uid is None:
                    acc.uid = int(uid_s)
                acc.job_dirs.append(job_dir)
                self._members(acc, label, mount, job_dir, 0, None)
                for step, step_dir in _subdirs(job_dir, "step_"):
                    if step == "extern":
                        acc.extern_dirs.append(step_dir)
                    self._members(acc, label, mount, step_dir, 1, step)
                    for _task, task_dir in _subdirs(step_dir, "task_"):
                        self._members(acc, label, mount, task_dir, 2, step)

    # -------------------------------------------------------- v2

    def _find_scopes(self, v2root: str) -> list[str]:
        """Every `*slurmstepd.scope` directly under <v2root>/system.slice."""
        return [
            path
            for name, path in _subdirs(os.path.join(v2root, "system.slice"), "")
            if name.endswith("slurmstepd.scope")
        ]

    def _read_v2_scope(self, scope: str, label_root: str) -> None:
        label = "0:"
        mount = label_root or os.path.dirname(scope)
        if not os.path.isdir(scope):
            self.problems.append(f"slurmstepd scope {scope} does not exist")
            return
        for pid in _read_pids(os.path.join(scope, "system", "cgroup.procs")):
            self.infra_pids.add(pid)
        for job_id, job_dir in _subdirs(scope, "job_"):
            if not job_id.isdigit():
                continue
            acc = self._job(job_id)
            acc.job_dirs.append(job_dir)
            self._members(acc, label, mount, job_dir, 0, None)
            for step, step_dir in _subdirs(job_dir, "step_"):
                if step == "extern":
                    acc.extern_dirs.append(step_dir)
                self._members(acc, label, mount, step_dir, 1, step)
                self._members(acc, label, mount, os.path.join(step_dir, "slurm"), 2, step, True)
                user_dir = os.path.join(step_dir, "user")
                self._members(acc, label, mount, user_dir, 2, step)
                for _task, task_dir in _subdirs(user_dir, "task_"):
                    self._members(acc, label, mount, task_dir, 3, step)

    # -------------------------------------------------------- shared

    def _job(self, job_id: str) -> _JobAcc:
        acc = self.jobs.get(job_id)
        if acc is None:
            acc = self.jobs[job_id] = _JobAcc(job_id)
        return acc

    def _members(
        self,
        acc: _JobAcc,
        label: str,
        mount: str,
        cg_dir: str,
        depth: int,
        step: str | None,
        stepd_slot: bool = False,
    ) -> None:
        pids = _read_pids(os.path.join(cg_dir, "cgroup.procs"))
        if not pids:
            return
        rel = "/" + os.path.relpath(cg_dir, mount) if mount else cg_dir
        m = Membership(acc.job_id, None if stepd_slot else step, f"{label}:{rel}", stepd_slot)
        for pid in pids:
            acc.pids.setdefault(pid)
            if not stepd_slot:
                acc.user_pids.setdefault(pid, step)
            old = self.members.get(pid)
            if old is None or depth > old[0]:
                self.members[pid] = (depth, m)

    def status(self, pid: int) -> tuple[str, int] | None:
        if pid not in self._status:
            self._status[pid] = _proc_status(self.src.proc_root, pid)
        return self._status[pid]

    def _alive(self, pid: int) -> bool:
        """Exists and is not a zombie (PID 1 may reap late)."""
        st = self.status(pid)
        return st is not None and st[0] not in _DEAD

    def _live_root_with_exe(self, pid: int, paths: frozenset[str], member: bool = False) -> bool:
        """pid is alive, runs one of `paths`, and its real uid is 0 (owner of /proc alone lies)."""
        try:
            exe = _exe(self.src.proc_root, pid)
        except PermissionError:
            # Some sandboxes' init hides its exe even from root; only a job member matters.
            self._exe_denied = self._exe_denied or member
            return False
        except OSError:
            return False
        if not root_exe_matches(exe, paths):
            return False
        st = self.status(pid)
        return st is not None and st[0] not in _DEAD and st[1] == 0

    def is_stepd(self, pid: int) -> bool:
        if pid not in self._stepd:
            self._stepd[pid] = self._live_root_with_exe(pid, self.stepd_paths, member=True)
        return self._stepd[pid]

    def _slurmd_alive(self) -> bool:
        """A live root slurmd: its pidfile first, else one pass over /proc."""
        for pidfile in self.src.slurmd_pidfiles:
            try:
                with open(pidfile) as f:
                    pid = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if self._live_root_with_exe(pid, self.slurmd_paths):
                return True
        return any(self._live_root_with_exe(pid, self.slurmd_paths) for pid in self._pids())

    def _pids(self) -> Iterable[int]:
        try:
            names = os.listdir(self.src.proc_root)
        except OSError:
            return []
        return (int(n) for n in names if n.isdigit())

    def _outside_stepds(self) -> list[int]:
        """Live root slurmstepds older than the grace in no job cgroup and no `system` slot."""
        out = []
        for pid in self._pids():
            if pid in self.members or pid in self.infra_pids:
                continue
            if self._live_root_with_exe(pid, self.stepd_paths):
                age = _proc_age(self.src.proc_root, pid)
                # A new stepd runs for a moment before it moves itself into its job cgroup.
                if age is None or age >= self.src.stepd_grace:
                    out.append(pid)
        return out

    def _infer_uid(self, acc: _JobAcc) -> int | None:
        """A v2 job's uid: the commonest real uid of its non-stepd members, non-root first.

        The extern step is looked at last: its `sleep` and adopted `sshd [priv]` run as root.
        """
        for want_extern in (False, True):
            uids: Counter[int] = Counter()
            for pid, step in acc.user_pids.items():
                if (step == "extern") != want_extern or self.is_stepd(pid):
                    continue
                if sum(uids.values()) >= _UID_SAMPLE:
                    break
                st = self.status(pid)
                if st is not None and st[0] not in _DEAD:
                    uids[st[1]] += 1
            nonroot = [(n, uid) for uid, n in uids.items() if uid != 0]
            if nonroot:
                return max(nonroot)[1]
            if uids and not want_extern:
                return 0  # a job of root itself: its batch/step processes are root
        return None

    def _start(self, acc: _JobAcc) -> float:
        """pam_slurm_adopt's rule: mtime of step_extern if present, else of the job dir."""
        for path in acc.extern_dirs + acc.job_dirs:
            try:
                return os.stat(path).st_mtime
            except OSError:
                continue
        return 0.0

    def _finish(self) -> JobView:
        jobs: dict[str, Job] = {}
        holding = False
        for job_id, acc in sorted(self.jobs.items()):
            # Short-circuits: the stepd sits at the job level (v1 freezer) or in the first
            # step's slurm slot (v2), which are read first, so a big job costs a readlink or two.
            running = any(self.is_stepd(p) for p in acc.pids)
            live = running or any(self._alive(p) for p in acc.pids)
            holding = holding or live
            if running:
                why = ""
            elif live:
                why = f"no live slurmstepd in job_{job_id}'s cgroups"
            else:
                why = f"job_{job_id}'s cgroups hold no processes"
            uid = acc.uid if acc.uid is not None else self._infer_uid(acc)
            jobs[job_id] = Job(
                job_id=job_id,
                uid=uid,
                start=self._start(acc),
                source=self.src.name,
                running=running,
                cgroup_dirs=tuple(acc.job_dirs),
                extern_dirs=tuple(acc.extern_dirs),
                why_not_running=why,
            )
        if holding and not self._slurmd_alive():
            paths = ", ".join(sorted(self.src.slurmd_paths))
            self.problems.append(
                f"slurmd is not running (no live root {paths}) while job cgroups hold "
                "processes: job state unknown"
            )
        if self.src.find_outside_stepds:
            outside = self._outside_stepds()
            if outside:
                shown = ", ".join(map(str, sorted(outside)[:5]))
                self.problems.append(
                    f"slurmstepd pid {shown} is in no job cgroup under {self.src.cgroup_root}: "
                    "its job cannot be seen (proctrack not cgroup, or a step still starting)"
                )
        if self._exe_denied:
            self.problems.append(
                f"cannot read {self.src.proc_root}/PID/exe of a job member (permission denied): "
                "cannot tell slurmstepd from other processes (pruned must run as root)"
            )
        membership = {pid: m for pid, (_d, m) in self.members.items()}
        return JobView(
            jobs=jobs,
            membership=membership,
            problems=tuple(self.problems),
            sources=(self.src.name,),
        )


# ------------------------------------------------------------------ the state-dir source


def _check_private(path: str, st: os.stat_result) -> str | None:
    """Why `path` cannot be trusted (writable by others, or not ours), or None."""
    if st.st_uid != os.geteuid():
        return f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}: not trusted"
    if st.st_mode & 0o022:
        return f"{path}: writable by group or others (mode {st.st_mode & 0o7777:o}): not trusted"
    return None


def job_record_path(state_dir: str, job_id: str) -> str:
    """`<state_dir>/jobs/<job_id>.json`; ValueError for a job id that is not a plain name."""
    if not _JOB_ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r}: expected letters, digits, '_', '.', '-'")
    return os.path.join(state_dir, JOBS_SUBDIR, f"{job_id}.json")


class StateDirSource:
    """Jobs recorded by `pruned prolog` (running: no end yet) and `pruned epilog` (ended).

    No membership: these batch systems give no cgroup to read. Problems: the directory or
    the jobs/ subdirectory is missing (the prolog never ran here, so every job process would
    look like a stray), not root-only, or a record is corrupt (named, and skipped).
    """

    name = "statedir"

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR) -> None:
        self.state_dir = state_dir

    def read(self) -> JobView:
        jobs_dir = os.path.join(self.state_dir, JOBS_SUBDIR)
        problems: list[str] = []
        jobs: dict[str, Job] = {}
        for path in (self.state_dir, jobs_dir):
            try:
                st = os.stat(path)
            except OSError as e:
                hint = " (has `pruned prolog` run on this node?)" if path == jobs_dir else ""
                problems.append(f"job records {path}: {e.strerror or e}{hint}")
                return self._view(jobs, problems)
            if why := _check_private(path, st):
                problems.append(why)
                return self._view(jobs, problems)
        try:
            names = sorted(os.listdir(jobs_dir))
        except OSError as e:
            problems.append(f"cannot read {jobs_dir}: {e.strerror or e}")
            return self._view(jobs, problems)
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue  # tmp files of a writer that crashed or is still writing
            path = os.path.join(jobs_dir, name)
            try:
                job = self._read_record(path, name.removesuffix(".json"))
            except FileNotFoundError:
                continue  # removed by a concurrent prune
            except (OSError, ValueError) as e:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                problems.append(f"{path}: corrupt job record: {msg.splitlines()[0]}")
                continue
            jobs[job.job_id] = job
        return self._view(jobs, problems)

    def _read_record(self, path: str, job_id: str) -> Job:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if why := _check_private(path, os.fstat(f.fileno())):
                raise ValueError(why.removeprefix(f"{path}: "))
            rec = parse_record(json.loads(f.read()), job_id)
        if rec.job_id != job_id:
            raise ValueError(f"job_id {rec.job_id!r} does not match the file name")
        return Job(
            job_id=rec.job_id,
            uid=rec.uid,
            start=rec.start,
            source=self.name,
            running=rec.end is None,
            why_not_running="" if rec.end is None else f"epilog recorded its end at {rec.end:.0f}",
            user=rec.user,
        )

    def _view(self, jobs: dict[str, Job], problems: list[str]) -> JobView:
        return JobView(jobs=jobs, membership={}, problems=tuple(problems), sources=(self.name,))


def write_job_record(
    state_dir: str, job_id: str, uid: int, start: float, user: str | None = None
) -> str:
    """Record a starting job (`pruned prolog`); returns the record's path."""
    path = job_record_path(state_dir, job_id)
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise ValueError(f"uid {uid!r}: expected an integer >= 0")
    ensure_private_dir(state_dir)
    ensure_private_dir(os.path.dirname(path))
    rec = {"job_id": job_id, "uid": uid, "start": float(start), "end": None, "user": user}
    write_json_atomic(path, {**rec, "source": "statedir"})
    return path


def end_job_record(state_dir: str, job_id: str, end: float, uid: int | None = None) -> bool:
    """Mark a job ended (`pruned epilog`). False when it has no record and no `uid` to make one.

    With `uid`, a missing record (the prolog did not run) is created already ended.
    """
    path = job_record_path(state_dir, job_id)
    try:
        with open(path, "rb") as f:
            rec = parse_record(json.loads(f.read()), job_id)
        obj = {
            "job_id": rec.job_id, "uid": rec.uid, "start": rec.start,
            "end": rec.end if rec.end is not None else float(end), "user": rec.user,
        }  # fmt: skip
    except (OSError, ValueError):
        if uid is None:
            return False
        obj = {"job_id": job_id, "uid": uid, "start": float(end), "end": float(end), "user": None}
    ensure_private_dir(state_dir)
    ensure_private_dir(os.path.dirname(path))
    write_json_atomic(path, {**obj, "source": "statedir"})
    return True


def prune_job_records(state_dir: str, older_than: float) -> int:
    """Delete records of jobs that ended before epoch `older_than`; return how many."""
    jobs_dir = os.path.join(state_dir, JOBS_SUBDIR)
    removed = 0
    try:
        names = os.listdir(jobs_dir)
    except OSError:
        return 0
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = os.path.join(jobs_dir, name)
        try:
            with open(path, "rb") as f:
                rec = parse_record(json.loads(f.read()), name.removesuffix(".json"))
        except (OSError, ValueError):
            continue  # corrupt ones stay, so the problem stays visible
        if rec.end is not None and rec.end < older_than:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed


# ------------------------------------------------------------------ merging


def read_jobs(sources: Sequence[JobSource]) -> JobView:
    """Read every source and merge; a source that raises or reports problems taints the view.

    Jobs are keyed by job id. The same id from two sources is one job when the uids agree
    (a running copy wins over a stale one, then the earlier source). When the uids differ
    (a gLExec pool account mapped to a pilot's job) both are kept, the later one under the
    key "<job_id>@<source>" with the same Job.job_id. Membership: the earlier source wins.
    """
    jobs: dict[str, Job] = {}
    membership: dict[int, Membership] = {}
    problems: list[str] = []
    names: list[str] = []
    for src in sources:
        name = getattr(src, "name", type(src).__name__)
        names.append(name)
        try:
            view = src.read()
        except Exception as e:  # one broken source must not hide the others' findings
            problems.append(f"{name}: job source failed: {type(e).__name__}: {e}")
            continue
        problems += [p if p.startswith(f"{name}: ") else f"{name}: {p}" for p in view.problems]
        for key, job in view.jobs.items():
            old = jobs.get(key)
            if old is None:
                jobs[key] = job
            elif old.uid == job.uid or old.uid is None or job.uid is None:
                if job.running and not old.running:
                    jobs[key] = job
            else:
                jobs[f"{key}@{name}"] = job
        for pid, m in view.membership.items():
            membership.setdefault(pid, m)
    return JobView(jobs=jobs, membership=membership, problems=tuple(problems), sources=tuple(names))
