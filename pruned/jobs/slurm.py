"""Slurm's cgroup tree as a job source: which jobs run here and which pids are in them.

Reads v1 `<ctrl>/slurm*/uid_U/job_J/step_S[/task_N]` and v2
`system.slice/[<node>_]slurmstepd.scope/job_J/step_S/{slurm,user[/task_N]}` (the grammar of
those paths is pruned.jobs.slurmpath), membership from the `cgroup.procs` files (far cheaper
than /proc/PID/cgroup for every process). A view with `problems` makes the sweep
report-only: when in doubt, pruned reports and waits.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from pruned.jobs.slurmpath import (
    SlurmPath,
    job_of_stepd_argv,
    not_understood,
    parse_slurm_cgroup_path,
)
from pruned.linux import procfs
from pruned.linux.cgroupfs import read_procs, subdirs
from pruned.linux.procfs import StatusFields
from pruned.model import DEAD_STATES, Job, JobView, Membership
from pruned.rules.trust import is_root_daemon, root_exe_matches

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_STEPD_PATHS = ("/usr/sbin/slurmstepd",)
DEFAULT_SLURMD_PATHS = ("/usr/sbin/slurmd",)
DEFAULT_SLURMD_PIDFILES = ("/run/slurmd.pid", "/var/run/slurmd.pid")

_UID_SAMPLE = 64  # member processes looked at to infer a v2 job's uid
_SLICE_DEPTH = 3  # nested slices searched for a stepd scope (system.slice, a.slice/a-b.slice)
_MAX_DEPTH = 8  # cgroup levels walked below a tree's top: Slurm uses 4, the rest is doubt


@dataclass
class _JobAcc:
    """What one read gathered about one job, across controllers."""

    job_id: str
    uid: int | None = None
    job_dirs: list[str] = field(default_factory=list)
    extern_dirs: list[str] = field(default_factory=list)  # where adoption writes
    extern_step_dirs: list[str] = field(default_factory=list)  # step_extern itself (its mtime)
    sluid: bool = False  # the dir is named by the job's SLUID (26.05+)
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
        memo: tuple[Callable[[int], bool], dict] | None = None,
        pids: Callable[[], Collection[int] | None] | None = None,
    ) -> None:
        self.cgroup_root = cgroup_root.rstrip("/") or "/"
        self.stepd_paths = frozenset(stepd_paths)
        self.proc_root = proc_root
        self.slurmd_paths = frozenset(slurmd_paths)
        self.slurmd_pidfiles = tuple(slurmd_pidfiles)
        self.v2_scopes = tuple(s.rstrip("/") for s in v2_scopes)
        self.search_v2 = search_v2
        self.find_outside_stepds = find_outside_stepds
        # (unchanged, store) of the daemon's ProcCache (pruned.linux.proccache): the walks
        # for slurmd and for outside stepds skip what they cleared last time (_walk_for).
        # The store is emptied whenever the cache is not trusted.
        self.memo = memo
        # The pids of the snapshot this read goes with, instead of listing /proc again (a
        # process that started since gets no verdict this sweep either); None: list /proc.
        self.pids = pids
        self.stepd_grace = stepd_grace

    def read(self) -> JobView:
        """One read of the tree and the member processes."""
        return _SlurmRead(self).run()


class _SlurmRead:
    """The state of one SlurmCgroupSource.read(): accumulators and per-pid caches."""

    def __init__(self, src: SlurmCgroupSource) -> None:
        self.src = src
        # Resolved per read: an alternatives switch must not need a restart.
        self.stepd_paths = procfs.exe_link_targets(src.stepd_paths)
        self.slurmd_paths = procfs.exe_link_targets(src.slurmd_paths)
        self.jobs: dict[str, _JobAcc] = {}
        self.members: dict[int, tuple[int, Membership]] = {}  # pid -> (depth, membership)
        self.infra_pids: set[int] = set()  # v2 slurmstepd.scope/system
        self.problems: list[str] = []
        self._status: dict[int, StatusFields | None] = {}
        self._stepd: dict[int, bool] = {}
        self._exe_denied = False
        self._pid_list: list[int] | None = None

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
        self._walk(label, mount, tree)

    # -------------------------------------------------------- v2

    def _find_scopes(self, v2root: str) -> list[str]:
        """Every `*slurmstepd.scope` in a slice: system.slice, or the one CgroupSlice names
        (25.11+); slices nest, so they are searched a few levels deep."""
        out: list[str] = []
        slices = [path for name, path in subdirs(v2root, "") if name.endswith(".slice")]
        for _ in range(_SLICE_DEPTH):
            deeper = []
            for sl in slices:
                for name, path in subdirs(sl, ""):
                    if name.endswith("slurmstepd.scope"):
                        out.append(path)
                    elif name.endswith(".slice"):
                        deeper.append(path)
            slices = deeper
        return sorted(out)

    def _read_v2_scope(self, scope: str, label_root: str) -> None:
        if not os.path.isdir(scope):
            self.problems.append(f"slurmstepd scope {scope} does not exist")
            return
        self._walk("0:", label_root or os.path.dirname(scope), scope)

    # -------------------------------------------------------- shared

    def _walk(self, label: str, mount: str, top: str) -> None:
        """Every cgroup below `top` (a v1 slurm* tree or a v2 stepd scope), judged by the one
        path grammar (pruned.jobs.slurmpath): a job's cgroup gives its members; Slurm's own
        (the scope's `system` keeper, v1's uid_U level) holds no job; anything else is a
        layout pruned does not know: a problem naming it (the sweep is report-only), and its
        processes are members that are not understood, which nothing ever calls strays."""
        stack = [(top, 0)]
        while stack:
            d, depth = stack.pop()
            rel = "/" + os.path.relpath(d, mount) if mount else d
            line = f"{label}:{rel}"
            sp = parse_slurm_cgroup_path(line)
            if sp is not None:
                self._job_cgroup(sp, d, line)
            elif depth >= _MAX_DEPTH or not_understood(line):
                self.problems.append(
                    f"cgroup {rel} is in Slurm's tree but not a layout pruned knows: "
                    "its processes are left alone"
                )
                self._not_understood(d, line)
                continue  # what is below it is no better understood
            elif rel.endswith("/system"):
                self.infra_pids.update(read_procs(os.path.join(d, "cgroup.procs")))
            stack.extend((path, depth + 1) for _name, path in reversed(subdirs(d, "")))

    def _job_cgroup(self, sp: SlurmPath, cg_dir: str, line: str) -> None:
        acc = self._job(sp.job_id)
        if acc.uid is None and sp.uid is not None:
            acc.uid = sp.uid
        acc.sluid = acc.sluid or sp.sluid
        if sp.step is None:
            acc.job_dirs.append(cg_dir)
        elif sp.step == "extern":
            if cg_dir.endswith("/step_extern"):
                acc.extern_step_dirs.append(cg_dir)
                if sp.version == 1:
                    acc.extern_dirs.append(cg_dir)  # v1: the step cgroup of each hierarchy
                elif not os.path.isdir(f"{cg_dir}/user/task_special"):
                    # 26.05 makes the leaf only when it first adopts: adoption makes it too
                    # (pruned.linux.cgroupfs.ensure_task_special).
                    acc.extern_dirs.append(f"{cg_dir}/user/task_special")
            elif sp.task == "special":
                # v2 allows processes only in leaves: Slurm itself puts the extern step's
                # processes, and what pam_slurm_adopt adopts, in step_extern/user/task_special.
                acc.extern_dirs.append(cg_dir)
        pids = read_procs(os.path.join(cg_dir, "cgroup.procs"))
        if not pids:
            return
        depth = line.count("/")  # a task beats its step beats its job (v1: per hierarchy)
        m = Membership(acc.job_id, None if sp.stepd else sp.step, line, sp.stepd)
        for pid in pids:
            acc.pids.setdefault(pid)
            if not sp.stepd:
                acc.user_pids.setdefault(pid, sp.step)
            old = self.members.get(pid)
            if old is None or depth > old[0]:
                self.members[pid] = (depth, m)

    def _not_understood(self, cg_dir: str, line: str) -> None:
        m = Membership("", None, line, understood=False)
        stack = [cg_dir]
        while stack:
            d = stack.pop()
            for pid in read_procs(os.path.join(d, "cgroup.procs")):
                self.members[pid] = (1 << 16, m)  # doubt beats every understood membership
            stack.extend(path for _name, path in subdirs(d, ""))

    def _job(self, job_id: str) -> _JobAcc:
        acc = self.jobs.get(job_id)
        if acc is None:
            acc = self.jobs[job_id] = _JobAcc(job_id)
        return acc

    def status(self, pid: int) -> StatusFields | None:
        if pid not in self._status:
            self._status[pid] = procfs.read_status(pid, self.src.proc_root)
        return self._status[pid]

    def _alive(self, pid: int) -> bool:
        """Exists and is not a zombie (PID 1 may reap late)."""
        st = self.status(pid)
        return st is not None and st.state not in DEAD_STATES

    def _live_root_with_exe(self, pid: int, paths: frozenset[str], member: bool = False) -> bool:
        """pid is a genuine root process running one of `paths` (rules.trust)."""
        try:
            # The exe alone rules out almost every process; only candidates are read in full.
            exe = procfs.read_exe(pid, self.src.proc_root)
        except PermissionError:
            # Some sandboxes' init hides its exe even from root; only a job member matters.
            self._exe_denied = self._exe_denied or member
            return False
        except OSError:
            return False
        if not root_exe_matches(exe, paths):
            return False
        proc = procfs.read_proc(pid, self.src.proc_root, cgroups=False)
        return proc is not None and is_root_daemon(proc, paths)

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
        return bool(self._walk_for(self.slurmd_paths, "slurmd", first=True))

    def _pids(self) -> list[int]:
        """The pids in /proc, listed once per read (both walks of _finish use them)."""
        if self._pid_list is None:
            got = self.src.pids() if self.src.pids is not None else None
            self._pid_list = list(got) if got is not None else procfs.list_pids(self.src.proc_root)
        return self._pid_list

    def _walk_for(self, paths: frozenset[str], key: str, *, first: bool = False,
                  skip: Collection[int] = ()) -> list[int]:
        """The live genuine root processes running one of `paths`, by one readlink per pid
        not in `skip` (only the first one found when `first`).

        With the daemon's ProcCache (src.memo), a pid this walk cleared last time is not read
        again while the cache says nothing happened to it since: becoming such a process takes
        an exec or a uid change, and either marks it. What a `first` walk did not reach
        stays unknown, so only the pids it read are remembered.
        """
        unchanged, store = self.src.memo if self.src.memo is not None else (None, {})
        mine = store.get(key)
        before: set[int] = mine[1] if mine is not None and mine[0] == paths else set()
        cleared: set[int] = set()
        found: list[int] = []
        for pid in self._pids():
            if pid in skip:
                continue  # not judged, so never remembered: it may leave the cgroup
            if pid in before and unchanged is not None and unchanged(pid):
                cleared.add(pid)
            elif self._live_root_with_exe(pid, paths):
                found.append(pid)
                if first:
                    break
            else:
                cleared.add(pid)
        if self.src.memo is not None:
            store[key] = (paths, cleared)
        return found

    def _outside_stepds(self) -> list[int]:
        """Live root slurmstepds older than the grace in no job cgroup and no `system` slot."""
        out = []
        for pid in self._walk_for(self.stepd_paths, "stepd",
                                  skip=self.members.keys() | self.infra_pids):  # fmt: skip
            st = procfs.read_stat(pid, self.src.proc_root)
            age = None if st is None else procfs.age_of(st.starttime, self.src.proc_root)
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
                if st is not None and st.state not in DEAD_STATES:
                    uids[st.uid] += 1
            nonroot = [(n, uid) for uid, n in uids.items() if uid != 0]
            if nonroot:
                return max(nonroot)[1]
            if uids and not want_extern:
                return 0  # a job of root itself: its batch/step processes are root
        return None

    def _start(self, acc: _JobAcc) -> float:
        """pam_slurm_adopt's rule: mtime of step_extern if present, else of the job dir."""
        for path in acc.extern_step_dirs + acc.job_dirs:
            try:
                return os.stat(path).st_mtime
            except OSError:
                continue
        return 0.0

    def _finish(self) -> JobView:
        jobs: dict[str, Job] = {}
        aliases: dict[str, str] = {}
        holding = False
        for name, acc in sorted(self.jobs.items()):
            # Short-circuits: the stepd sits at the job level (v1 freezer) or in the first
            # step's slurm slot (v2), which are read first, so a big job costs a readlink or two.
            stepd = next((p for p in acc.pids if self.is_stepd(p)), None)
            running = stepd is not None
            live = running or any(self._alive(p) for p in acc.pids)
            holding = holding or live
            label = f"{name}" if acc.sluid else f"job_{name}"
            if running:
                why = ""
            elif live:
                why = f"no live slurmstepd in {label}'s cgroups"
            else:
                why = f"{label}'s cgroups hold no processes"
            job_id = name
            if acc.sluid and stepd is not None:
                # 26.05 names the cgroup by SLUID; SLURM_JOB_ID, the history and job_dirs
                # patterns use the number, which the (genuine root) stepd's argv states.
                number = job_of_stepd_argv(procfs.read_cmdline(stepd, self.src.proc_root))
                if number is not None and number not in self.jobs:
                    job_id = aliases[name] = number
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
        membership = {
            pid: replace(m, job_id=aliases[m.job_id]) if m.job_id in aliases else m
            for pid, (_d, m) in self.members.items()
        }
        return JobView(
            jobs=jobs,
            membership=membership,
            problems=tuple(self.problems),
            sources=(self.src.name,),
            aliases=aliases,
        )


