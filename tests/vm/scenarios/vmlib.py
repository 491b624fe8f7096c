"""Helpers for the scenarios that run inside a VM lane guest (tests/vm/run.sh): commands, the
process table, Slurm jobs, ssh logins, `pruned scan`. Standard library only, so the guest's
Debian python3 (3.11 on bookworm to 3.14 on forky) runs them as they are."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

RESULTS = Path(os.environ.get("PRUNED_VM_RESULTS", "/run/pruned-vm/results"))
NODE = os.uname().nodename.split(".")[0]
SSH_KEY = "/root/.ssh/vm_key"
# Test logins to this node's own sshd on loopback; the host keys are throw-away.
SSH_OPTS = ("-i", SSH_KEY, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=60")
LONG = "900"  # seconds every scenario process sleeps: it outlives the whole suite


def sh(*argv: str, check: bool = True, timeout: float = 120,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv, capture its output as text; raise with the output when it fails."""
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                        check=False)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {cp.returncode}\n"
                             f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
    return cp


def as_user(user: str, *argv: str) -> tuple[str, ...]:
    return ("runuser", "-u", user, "--", *argv)


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 90,
             interval: float = 0.5, fail: bool = True) -> T:
    """Poll fn until it returns something truthy; that value (with fail=False, the last
    falsy one once the time is up). Under TCG every step is slow, so callers give generous
    timeouts."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            if not fail:
                return value  # type: ignore[return-value]
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    uid: int
    user: str
    comm: str
    argv: tuple[str, ...]
    cgroup: tuple[str, ...]  # the lines of /proc/PID/cgroup (pure v2: one, "0::/...")
    starttime: int
    state: str

    @property
    def argv0(self) -> str:
        return self.argv[0] if self.argv else ""

    @property
    def cgroup_path(self) -> str:
        """The v2 path ("0::" line), or "" if there is none."""
        for line in self.cgroup:
            if line.startswith("0::"):
                return line[3:]
        return ""

    def label(self) -> str:
        return f"pid {self.pid} {self.user} {self.comm!r} argv0={self.argv0!r} {self.cgroup_path}"


_users: dict[int, str] = {}


def user_name(uid: int) -> str:
    if uid not in _users:
        import pwd

        try:
            _users[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _users[uid] = str(uid)
    return _users[uid]


def read_proc(pid: int) -> Proc | None:
    """One process, or None if it is gone (or a kernel thread)."""
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat") as f:
            stat = f.read()
        with open(f"{base}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
        with open(f"{base}/cgroup") as f:
            cgroup = tuple(f.read().splitlines())
        with open(f"{base}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None
    rpar = stat.rindex(")")  # comm may contain spaces and ')'
    comm = stat[stat.index("(") + 1 : rpar]
    fields = stat[rpar + 2 :].split()
    if not argv:  # kernel threads and zombies have no argv
        return None
    return Proc(pid, int(fields[1]), uid, user_name(uid), comm, argv, cgroup, int(fields[19]),
                fields[0])


def procs() -> list[Proc]:
    """Every live user-space process (zombies and kernel threads left out)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p is not None and p.state not in ("Z", "X"):
                out.append(p)
    return out


def by_argv0(name: str, table: Iterable[Proc] | None = None) -> list[Proc]:
    return [p for p in (procs() if table is None else table) if p.argv0 == name]


def wait_procs(name: str, n: int = 1, timeout: float = 90) -> list[Proc]:
    """Wait until at least n processes with argv[0] == name run."""
    return wait_for(f"{n} process(es) {name!r}",
                    lambda: (ps := by_argv0(name)) and len(ps) >= n and ps, timeout)


def alive(p: Proc) -> bool:
    now = read_proc(p.pid)
    return now is not None and now.starttime == p.starttime and now.state not in ("Z", "X")


def job_dir_of(p: Proc) -> str:
    """The cgroup directory of the job p is in (the component right under slurmstepd.scope:
    job_J, or a SLUID on 26.05), or ""."""
    parts = p.cgroup_path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part.endswith("slurmstepd.scope"):
            return parts[i + 1]
    return ""


def in_job_dir(p: Proc, job_dir: str) -> bool:
    return bool(job_dir) and f"slurmstepd.scope/{job_dir}/" in p.cgroup_path + "/"


# ---------------------------------------------------------------- Slurm


def sbatch(user: str, script: str) -> str:
    """Submit script as user; the job id."""
    out = sh(*as_user(user, "sbatch", "--parsable", "-D", f"/home/{user}", "-o", "/dev/null",
                      "-J", f"vm-{user}"), input=script).stdout
    return out.strip().split(";")[0]


def job_state(job: str) -> str:
    """squeue's state of job ("" once it left the queue)."""
    return sh("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()


def wait_running(job: str, timeout: float = 120) -> None:
    wait_for(f"job {job} RUNNING", lambda: job_state(job) == "RUNNING", timeout)


# ---------------------------------------------------------------- ssh


def ssh_popen(user: str, command: str, log: Path) -> subprocess.Popen[bytes]:
    """An ssh login of user to this node (loopback) running command; its output goes to log."""
    with open(log, "ab") as out:
        return subprocess.Popen(["ssh", *SSH_OPTS, f"{user}@127.0.0.1", command],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)


# ---------------------------------------------------------------- pruned


@dataclass(frozen=True)
class Scan:
    records: dict[int, dict]  # pid -> one `pruned scan --json` object
    stderr: str

    def of(self, p: Proc) -> dict:
        rec = self.records.get(p.pid)
        if rec is None or rec["starttime"] != p.starttime:
            raise AssertionError(f"pruned scan did not list {p.label()}")
        return rec


def pruned_scan() -> Scan:
    """`pruned scan --json` with the node's installed policy (/etc/pruned/policy.d)."""
    cp = sh("pruned", "scan", "--json", timeout=300)
    records = {}
    for line in cp.stdout.splitlines():
        rec = json.loads(line)
        records[rec["pid"]] = rec
    return Scan(records, cp.stderr)


def journal(*args: str) -> list[dict]:
    """journalctl -o json entries matching args."""
    out = sh("journalctl", "--no-pager", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def journal_after(cursor: str, **match: str) -> list[dict]:
    """Entries after cursor whose fields equal match. Filtered here, not by journalctl:
    systemd 252's journalctl --after-cursor with a match skips the first matching entry."""
    return [e for e in journal("--after-cursor", cursor)
            if all(e.get(k) == v for k, v in match.items())]


def journal_cursor() -> str:
    """The cursor of the journal's newest entry (read records after it with --after-cursor)."""
    entries = journal("-n", "1")
    if not entries:
        raise AssertionError("the journal is empty")
    return entries[-1]["__CURSOR"]


def slurm_version() -> tuple[int, int]:
    """(major, minor) of this node's Slurm, from `sinfo -V` ("slurm 24.11.5")."""
    word = sh("sinfo", "-V").stdout.split()[-1]
    major, minor = word.split(".")[:2]
    return int(major), int(minor)


def slurmd_start_time() -> str:
    """slurmd's start time as slurmctld knows it (changes when slurmd registers anew)."""
    out = sh("scontrol", "show", "node", NODE, check=False).stdout
    return out.split("SlurmdStartTime=", 1)[-1].split()[0] if "SlurmdStartTime=" in out else ""


def node_state() -> str:
    return sh("scontrol", "show", "node", NODE).stdout.split("State=", 1)[1].split()[0]


def set_slurm_conf(**values: str | None) -> None:
    """Set (or, with None, remove) keys of /etc/slurm/slurm.conf and restart slurmctld and
    slurmd: plugins and PrologFlags take effect only on restart (slurm.conf(5)). Returns once
    slurmd registered again (a new SlurmdStartTime) and the node takes jobs."""
    conf = Path("/etc/slurm/slurm.conf")
    lines = [ln for ln in conf.read_text().splitlines()
             if ln.split("=", 1)[0] not in values]
    # Node and partition lines stay last, as slurm.conf(5)'s examples order them.
    head = [ln for ln in lines if not ln.startswith(("NodeName=", "PartitionName="))]
    tail = [ln for ln in lines if ln.startswith(("NodeName=", "PartitionName="))]
    head += [f"{k}={v}" for k, v in values.items() if v is not None]
    conf.write_text("\n".join(head + tail) + "\n")
    before = slurmd_start_time()
    sh("systemctl", "restart", "slurmctld.service", timeout=180)
    sh("systemctl", "restart", "slurmd.service", timeout=180)

    def ready() -> bool:
        state = node_state()
        return (slurmd_start_time() not in ("", before)
                and state.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED")
                and not any(w in state for w in ("DRAIN", "DOWN", "NOT_RESPONDING")))
    wait_for("slurmd registered again and the node up", ready, timeout=180, interval=1)
