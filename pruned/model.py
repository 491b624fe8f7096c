"""Plain data shared by every layer: processes, jobs, verdicts, decisions, the policy.

Nothing here reads the world or changes it. Every record is frozen: a sweep works on one
immutable picture of the node, and anything that acts re-checks the world itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# The hard rail: uids below this are always `system`, whatever a policy says.
UID_RAIL = 99
# /proc/PID/stat states of a process that has exited: a zombie waiting to be reaped ("Z"),
# or dead ("X", and "x" on kernels 3.9-3.13). Never a target; counts as gone for every wait.
DEAD_STATES = frozenset("ZXx")
# A thread-group leader that ended with SYS_exit while its other threads run: the kernel shows
# it as Z, yet the process lives (and a user can make one at will, so Z alone would shield a
# stray from every kill). procfs reports it as "Zl", as ps does; it is not in DEAD_STATES.
LIVE_LEADER = "Zl"


class ProcClass(StrEnum):
    SYSTEM = "system"
    BATCH = "batch"
    ADOPTED = "adopted"
    WHITELISTED = "whitelisted"
    STRAY = "stray"


class Action(StrEnum):
    KILL = "kill"
    ADOPT = "adopt"
    IGNORE = "ignore"


class HeldBy(StrEnum):
    """Which guard held an action back (the decision keeps the action it would have taken)."""

    RAIL = "rail"  # a hard rail no policy lifts (pid 1, uid < 99, pruned itself, a daemon)
    YOUNG = "young"  # younger than min_age: judged later
    SCOPE = "scope"  # outside this run's --uid scope
    REPORT_ONLY = "report_only"  # the job source is in doubt, or the event path is held
    BRAKE = "brake"  # the mass-kill brake tripped: more uids would be killed than it allows


class Result(StrEnum):
    DONE = "done"  # the action happened (killed, adopted, removed)
    WOULD = "would"  # dry-run / report-only: the action would have happened
    GONE = "gone"  # the target vanished (or its pid was reused) before we acted
    FAILED = "failed"  # we tried and could not
    SKIPPED = "skipped"  # a rail, the brake or report-only mode held the action back


class CleanupKind(StrEnum):
    JOB_DIR = "job_dir"  # one ended job's directory (remove_tree)
    LOOSE = "loose"  # one uid's old files in one root (remove_owned_files)
    IPC = "ipc"  # one System V IPC object or POSIX message queue of such a uid


@dataclass(frozen=True, slots=True, order=True)
class ProcKey:
    """A process identity that survives PID reuse: pid plus start time in clock ticks."""

    pid: int
    starttime: int


@dataclass(frozen=True, slots=True)
class Proc:
    """One process as read from /proc in one pass.

    `uid` is the real uid. The fast path takes it from the owner of /proc/PID (the
    effective uid of a dumpable process) and reads /proc/PID/status whenever that owner is
    root, so a non-dumpable or setuid user process can never pass as root; `uid_exact` says
    whether status was read. Anything that acts re-reads status first.
    """

    pid: int
    starttime: int
    ppid: int
    uid: int
    comm: str
    state: str  # one letter from /proc/PID/stat: R S D Z T t X I ...
    kthread: bool = False
    euid: int | None = None  # set when status was read
    uid_exact: bool = False
    exe: str | None = None  # readlink of /proc/PID/exe, when read and readable
    cgroups: tuple[str, ...] = ()  # raw /proc/PID/cgroup lines, only in full reads
    pgid: int = 0
    sid: int = 0
    # Its executable is verified to be the host's file at `exe` (same device and inode):
    # set only for processes whose exe names a whitelisted path (pruned.linux.exeid).
    exe_host: bool = False

    @property
    def key(self) -> ProcKey:
        return ProcKey(self.pid, self.starttime)

    @property
    def zombie(self) -> bool:
        return self.state in DEAD_STATES


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole process table at one moment (as near as /proc allows)."""

    procs: Mapping[int, Proc]
    taken_at: float  # time.time() when the walk started
    boot_time: float  # epoch seconds of boot, to turn starttime ticks into dates
    clk_tck: int
    vanished: int = 0  # pids listed in /proc that were gone before we could read them
    unreadable: tuple[str, ...] = ()  # what could not be read (e.g. exe as non-root)

    def start_epoch(self, proc: Proc) -> float:
        return self.boot_time + proc.starttime / self.clk_tck

    def age(self, proc: Proc) -> float:
        return self.taken_at - self.start_epoch(proc)


@dataclass(frozen=True, slots=True)
class Job:
    """A job known on this node."""

    job_id: str
    uid: int | None  # v2 Slurm paths carry no uid; filled from the processes when known
    start: float  # epoch seconds: job start, or the mtime of its cgroup
    source: str  # "slurm" or "statedir"
    running: bool
    cgroup_dirs: tuple[str, ...] = ()  # job-level cgroup directories (absolute paths)
    extern_dirs: tuple[str, ...] = ()  # its step_extern directories, one per v1 controller
    why_not_running: str = ""  # e.g. "no live slurmstepd in its cgroup"
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Membership:
    """Where a pid sits in the job cgroup tree."""

    job_id: str
    step: str | None  # "batch", "extern", "0", ...; None at job level or in the stepd's own
    cgroup: str  # e.g. "freezer:/slurm_vm/uid_1007/job_9/step_batch"
    stepd: bool = False  # the cgroup is the step's slurmstepd slot (v2 ".../slurm")
    # False: in Slurm's tree, but in a cgroup the path grammar does not know. Such a process
    # is never judged a stray (classify: batch.unknown_cgroup) and its view has a problem.
    understood: bool = True


@dataclass(frozen=True, slots=True)
class JobView:
    """What the node knows about jobs at one moment.

    `problems` non-empty means the source could not be read or looks wrong; a sweep that
    sees problems is report-only.
    """

    jobs: Mapping[str, Job]
    membership: Mapping[int, Membership]
    problems: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    # cgroup name -> job id: Slurm 26.05 names job cgroups by SLUID, everything else
    # (SLURM_JOB_ID, the history, job_dirs patterns) by the numeric id.
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def canonical(self, job_id: str) -> str:
        """The job id a cgroup name stands for (a SLUID's numeric id, when known)."""
        return self.aliases.get(job_id, job_id)

    def job(self, job_id: str) -> Job | None:
        """The job a cgroup names, by its id or by the SLUID of its 26.05 cgroup."""
        return self.jobs.get(self.aliases.get(job_id, job_id))

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.running]

    def running_for(self, uid: int) -> list[Job]:
        return [j for j in self.jobs.values() if j.running and j.uid == uid]

    def newest_for(self, uid: int) -> Job | None:
        """The uid's newest running job: latest start, then highest numeric job id."""
        jobs = self.running_for(uid)
        if not jobs:
            return None
        return max(jobs, key=lambda j: (j.start, _job_sort_key(j.job_id)))


def _job_sort_key(job_id: str) -> tuple[int, str]:
    head = job_id.split("_")[0].split(".")[0]
    return (int(head), job_id) if head.isdigit() else (-1, job_id)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One process's class and the evidence that decided it."""

    cls: ProcClass
    rule: str  # a stable dotted name, e.g. "batch.job_cgroup", "stray.ended_job"
    reason: str  # one human sentence
    job_id: str | None = None
    decider: int | None = None  # pid of the ancestor that decided (daemon, sshd, ...)
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IpcObject:
    """A System V IPC object or a POSIX message queue, as listed by pruned.linux.ipc."""

    kind: str  # "shm", "sem", "msg" (System V) or "mqueue" (POSIX)
    ident: str  # the System V id, or the queue's name
    key: int
    uid: int  # the owner
    nattch: int  # shm: processes attached (never removed while > 0)
    size: int  # shm: bytes; msg: bytes queued; mqueue: the file's size
    ctime: int  # last change: with key and owner, tells a reused id apart

    @property
    def label(self) -> str:
        """How records and tables name it: "sysv-shm:32769", "mqueue:/name"."""
        if self.kind == "mqueue":
            return f"mqueue:/{self.ident}"
        return f"sysv-{self.kind}:{self.ident}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy says to do with one classified process."""

    proc: Proc
    verdict: Verdict
    action: Action
    reason: str
    target_job: str | None = None  # the job to adopt into
    held: str | None = None  # why the action is held back, as a sentence
    held_by: HeldBy | None = None  # which guard held it
    # A young stray judged by the lineage of its session or process group: (kind
    # "session"/"pgroup", id, epoch since when it is stray). Acting follows the group's
    # current members of the same uid, so a re-forker's next generation cannot slip by.
    lineage_group: tuple[str, int, float] | None = None


@dataclass(frozen=True, slots=True)
class SweepPlan:
    decisions: tuple[Decision, ...]  # one per process of the snapshot, pid order
    report_only: tuple[str, ...] = ()  # why nothing may act this sweep (job source problems)
    brake: str | None = None  # set when the mass-kill brake tripped
    brake_uids: tuple[int, ...] = ()  # the uids the tripped brake would have killed
    brake_jobs: tuple[str, ...] = ()  # the jobs those kills name, if any

    def actionable(self) -> list[Decision]:
        """Decisions that act (or would, in dry-run): not ignore, not held."""
        return [d for d in self.decisions if d.action is not Action.IGNORE and d.held is None]

    def reported(self) -> list[Decision]:
        """Decisions worth an audit record: those that act, would act, or that the brake or
        report-only mode stopped. Rails, youth and --uid scope hold quietly every sweep."""
        return [
            d
            for d in self.decisions
            if d.action is not Action.IGNORE
            and d.held_by in (None, HeldBy.REPORT_ONLY, HeldBy.BRAKE)
        ]


@dataclass(frozen=True, slots=True)
class KnownExes:
    """The executables trust rests on, as /proc/PID/exe shows them.

    The configured paths plus, when the caller resolved them, their symlink targets (Debian's
    /usr/sbin/slurmstepd links to slurmstepd-wlm). Resolving is I/O, so rules never do it:
    `of(policy)` alone gives the paths as configured.
    """

    daemons: frozenset[str] = frozenset()  # batch daemons and slurmstepd
    sshd: frozenset[str] = frozenset()
    whitelist: frozenset[str] = frozenset()
    whitelist_ids: frozenset[tuple[int, int]] = frozenset()  # their (st_dev, st_ino) on the host

    @classmethod
    def of(
        cls,
        policy: Policy,
        resolve: Callable[[Iterable[str]], frozenset[str]] = frozenset,
        ids: Callable[[tuple[str, ...]], frozenset[tuple[int, int]]] = lambda _p: frozenset(),
    ) -> KnownExes:
        return cls(
            resolve((*policy.batch_daemons, *policy.slurm.stepd)),
            resolve(policy.sshd_paths),
            resolve(policy.whitelist.exe),
            ids(policy.whitelist.exe),
        )


@dataclass(frozen=True, slots=True)
class Observation:
    """What one look at the node saw and decided, before anything acted."""

    snap: Snapshot
    jobs: JobView
    verdicts: dict[int, Verdict]
    plan: SweepPlan
    exes: KnownExes = field(default_factory=KnownExes)


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    result: Result
    detail: str = ""
    signalled: tuple[ProcKey, ...] = ()  # every process the action touched
    fields: tuple[tuple[str, str], ...] = ()  # extra PRUNED_* audit fields from the action


# ---------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class SystemPolicy:
    login_defs: bool = True  # SYS_UID_MIN..SYS_UID_MAX of /etc/login.defs
    login_defs_path: str = "/etc/login.defs"
    uid_ranges: tuple[tuple[int, int], ...] = ((60000, 64999), (65534, 65534))
    users: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WhitelistPolicy:
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    exe: tuple[str, ...] = ()
    sshd: bool = True  # sshd sessions under a root-owned listener


@dataclass(frozen=True, slots=True)
class SlurmSource:
    cgroup_root: str = "/sys/fs/cgroup"
    stepd: tuple[str, ...] = ("/usr/sbin/slurmstepd",)


@dataclass(frozen=True, slots=True)
class CleanupPolicy:
    enabled: bool = True
    roots: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")
    job_dirs: tuple[str, ...] = ("/tmp/slurm-{job_id}", "/dev/shm/slurm-{job_id}")
    job_container_base: str | None = None  # Slurm job_container/tmpfs BasePath
    min_age: float = 3600.0  # seconds
    loose_files: bool = True
    max_listed: int = 20  # files named per audit record


@dataclass(frozen=True, slots=True)
class Policy:
    dry_run: bool = True
    stray_action: Action = Action.KILL
    adopt_fallback: Action = Action.KILL
    # Adoption was attempted and the kernel refused it (cgroup.procs EBUSY/ENOSPC/ENOENT...):
    # ignore (like pam_slurm_adopt's action_adopt_failure=allow) or kill; applied once.
    adopt_failure: Action = Action.IGNORE
    kill_grace: float = 10.0
    # The mass-kill brake: kills of more distinct uids than this in one sweep (and, for the
    # event path, since the last full sweep) mean none at all (pruned.rules.decide.apply_brake).
    brake_max_uids: int = 3
    # The epilog exits 1 (Slurm drains the node) when a process survived SIGKILL; false: 0.
    epilog_drain_on_survivor: bool = True
    min_age: float = 10.0
    job_sources: tuple[str, ...] = ("slurm",)
    slurm: SlurmSource = field(default_factory=SlurmSource)
    state_dir: str = "/var/lib/pruned"
    # A job's cgroup with no slurmstepd stays "running" this long (the pause between two steps
    # without PrologFlags=contain) before the history ends it.
    idle_grace: float = 600.0
    # Ended jobs are forgotten (history and state-dir records) this long after their end.
    keep_ended: float = 7 * 86400.0
    batch_daemons: tuple[str, ...] = (
        "/usr/sbin/slurmstepd",
        "/usr/sbin/pbs_mom",
        "/usr/sbin/condor_starter",
        "/usr/lib/gridengine/sge_shepherd",
    )
    sshd_paths: tuple[str, ...] = (
        "/usr/sbin/sshd",
        "/usr/lib/openssh/sshd-session",
        "/usr/libexec/openssh/sshd-session",
    )
    system: SystemPolicy = field(default_factory=SystemPolicy)
    whitelist: WhitelistPolicy = field(default_factory=WhitelistPolicy)
    cleanup: CleanupPolicy = field(default_factory=CleanupPolicy)
    sweep_interval: float = 60.0
    clean_interval: float = 600.0
    jobs_interval: float = 30.0
    # With events on, sweeps between full reads re-read only the processes that changed
    # (pruned.linux.proccache); every sweep reads all of /proc at least this often. 0: always.
    full_sweep_interval: float = 600.0
    events: bool = True
    audit_fallback: str | None = None  # None: decided by where pruned runs
    metrics_textfile: str | None = None
    sources: tuple[str, ...] = ()  # the files this policy was loaded from
