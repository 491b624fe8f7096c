"""The scene every classification scenario looks at: one node with, at the same time,

- alice's job: a batch script, an srun step, a double-forked daemon inside the job, and an ssh
  login adopted by pam_slurm_adopt that starts a daemon of its own;
- bob's process started outside Slurm (a stray);
- carol's ssh session (the admin pam_access lets in without a job; whitelisted by the policy);
- dave's job whose slurmstepds were killed with SIGKILL before scancel: what it leaves behind;
- the systemd escape routes of a real node: bob's `systemd --user` manager (linger enabled) and
  a `systemd-run --user` unit of his; frank's ssh login that pam_access let past
  pam_slurm_adopt (it stays in ssh.service) and a daemon it double-forked;
- the node's own daemons (slurmd, the slurmstepd scope's keeper, slurmctld, sshd).

Built once per session (`conftest.scene`); every process gets a role, and ROLES says what
pruned must call it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from vmlib import (
    LONG,
    RESULTS,
    Proc,
    alive,
    as_user,
    by_argv0,
    in_job_dir,
    job_dir_of,
    job_state,
    procs,
    sbatch,
    sh,
    ssh_popen,
    wait_for,
    wait_procs,
    wait_running,
)


@dataclass(frozen=True)
class Role:
    cls: str  # the class pruned must give every process of this role
    required: bool  # the scene is broken if no process has this role
    what: str


ROLES: dict[str, Role] = {
    "batch_script": Role("batch", True, "alice's batch script (slurm_script)"),
    "batch_srun": Role("batch", False, "srun started by the batch script (in the batch step)"),
    "batch_sleep": Role("batch", True, "a child of the batch script"),
    "job_daemon": Role("batch", True, "a setsid -f daemon of the script (ppid 1, in the job)"),
    "srun_task": Role("batch", True, "the task of the srun step (step_0)"),
    "stepd": Role("system", True, "a root slurmstepd of one of alice's steps"),
    "extern_task": Role("system", False, "the extern step's root sleep (22.05, 24.11)"),
    "scope_keeper": Role("system", True, "the root slurmstepd in slurmstepd.scope/system"),
    "job_other": Role("system", False, "any other root process in alice's job"),
    "ssh_priv": Role("system", True, "root sshd [priv] of alice's adopted login"),
    "ssh_session": Role("adopted", True, "alice's sshd session process (adopted)"),
    "ssh_command": Role("adopted", True, "the command of alice's adopted login"),
    "ssh_daemon": Role("adopted", True, "a setsid -f daemon started from the adopted login"),
    "sshd_listener": Role("system", True, "the root sshd listener (ssh.service)"),
    "slurmd": Role("system", True, "slurmd (slurmd.service)"),
    "slurmctld": Role("system", True, "slurmctld (uid slurm)"),
    "stray_outside": Role("stray", True, "bob's setsid -f process started outside Slurm"),
    "admin_priv": Role("system", True, "root sshd [priv] of carol's, frank's logins"),
    "admin_session": Role("whitelisted", True, "carol's sshd session process"),
    "admin_command": Role("whitelisted", True, "the command of carol's ssh session"),
    "crash_left": Role("stray", True, "dave's processes left in his job after the stepds died"),
    "crash_root_left": Role("system", False, "root processes left in dave's job"),
    # pruned's documented default: a user's systemd --user outside any job is a stray until
    # the site whitelists the account (README, "Before enforcing").
    "linger_manager": Role("stray", True, "bob's systemd --user (linger) and its services"),
    "linger_unit": Role("stray", True, "a systemd-run --user unit of bob's"),
    "bypass_session": Role("whitelisted", True, "frank's sshd session in ssh.service"),
    "bypass_command": Role("whitelisted", True, "the command of frank's ssh session"),
    "bypass_daemon": Role("stray", True, "a setsid -f daemon of frank's session (ppid 1)"),
}

ALICE_SCRIPT = f"""#!/bin/bash
srun -n1 bash -c 'exec -a vm_srun_task sleep {LONG}' &
setsid -f bash -c 'exec -a vm_job_daemon sleep {LONG}' </dev/null >/dev/null 2>&1
bash -c 'exec -a vm_batch_sleep sleep {LONG}' &
wait
"""

DAVE_SCRIPT = f"""#!/bin/bash
setsid -f bash -c 'exec -a vm_crash_daemon sleep {LONG}' </dev/null >/dev/null 2>&1
exec -a vm_crash_sleep sleep {LONG}
"""

ALICE_SSH = (f"setsid -f bash -c 'exec -a vm_ssh_daemon sleep {LONG}' </dev/null >/dev/null 2>&1;"
             f" exec -a vm_ssh_sleep sleep {LONG}")
FRANK_SSH = (f"setsid -f bash -c 'exec -a vm_bypass_daemon sleep {LONG}' </dev/null >/dev/null"
             f" 2>&1; exec -a vm_bypass_sleep sleep {LONG}")


@dataclass
class Scene:
    alice_job: str = ""
    alice_dir: str = ""  # alice's job cgroup directory (job_J, or a SLUID on 26.05)
    dave_job: str = ""
    dave_dir: str = ""
    dave_killed: list[Proc] = field(default_factory=list)  # dave's slurmstepds, SIGKILLed
    dave_state: str = ""  # squeue's state of dave's job after scancel ("" = gone)
    roles: dict[str, list[Proc]] = field(default_factory=dict)

    def all(self) -> list[tuple[str, Proc]]:
        return [(role, p) for role in ROLES for p in self.roles.get(role, [])]


def parent(p: Proc, table: dict[int, Proc]) -> Proc | None:
    return table.get(p.ppid)


def build() -> Scene:
    s = Scene()
    wait_for("slurmd idle", lambda: sh("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
             == "idle", timeout=180)

    s.alice_job = sbatch("alice", ALICE_SCRIPT)
    wait_running(s.alice_job)
    for name in ("vm_srun_task", "vm_job_daemon", "vm_batch_sleep"):
        wait_procs(name)
    s.alice_dir = job_dir_of(by_argv0("vm_batch_sleep")[0])

    ssh_popen("alice", ALICE_SSH, RESULTS / "ssh-alice.log")
    ssh_popen("carol", f"exec -a vm_admin_sleep sleep {LONG}", RESULTS / "ssh-carol.log")
    ssh_popen("frank", FRANK_SSH, RESULTS / "ssh-frank.log")
    sh("runuser", "-u", "bob", "--", "setsid", "-f", "bash", "-c",
       f"exec -a vm_stray sleep {LONG} </dev/null >/dev/null 2>&1")
    start_linger_unit("bob")
    for name in ("vm_ssh_sleep", "vm_ssh_daemon", "vm_admin_sleep", "vm_stray",
                 "vm_bypass_sleep", "vm_bypass_daemon", "vm_linger_unit"):
        wait_procs(name)

    # A crashed step: SIGKILL every slurmstepd of dave's job, then scancel (harness.md
    # section 1, "Strays that exist even under proctrack/cgroup", 3).
    s.dave_job = sbatch("dave", DAVE_SCRIPT)
    wait_running(s.dave_job)
    wait_procs("vm_crash_sleep")
    wait_procs("vm_crash_daemon")
    s.dave_dir = job_dir_of(by_argv0("vm_crash_sleep")[0])
    s.dave_killed = [p for p in procs()
                     if p.comm == "slurmstepd" and p.uid == 0 and in_job_dir(p, s.dave_dir)]
    for p in s.dave_killed:
        os.kill(p.pid, signal.SIGKILL)
    wait_for("dave's slurmstepds gone", lambda: not any(alive(p) for p in s.dave_killed), 30)
    sh("scancel", s.dave_job)
    # The job leaves RUNNING (CANCELLED/COMPLETING, or the queue) even though nobody is left
    # to kill its processes.
    wait_for(f"job {s.dave_job} no longer RUNNING",
             lambda: job_state(s.dave_job) != "RUNNING", timeout=120)
    s.dave_state = job_state(s.dave_job)

    s.roles = assign_roles(s, procs())
    # Right away, while exactly alice's and dave's jobs exist: later scenarios add and end
    # jobs of their own, and the fixture must not depend on which ran first.
    write_cgroup_paths(s, RESULTS / "cgroup_paths.txt")
    return s


def start_linger_unit(user: str) -> None:
    """Enable linger for user (logind starts user@UID.service, a systemd --user outside any
    login) and start a transient unit there, as any user can."""
    uid = sh("id", "-u", user).stdout.strip()
    sh("loginctl", "enable-linger", user)
    wait_for(f"user@{uid}.service active", lambda: sh(
        "systemctl", "is-active", f"user@{uid}.service", check=False).stdout.strip() == "active",
        timeout=120)
    sh(*as_user(user, "env", f"XDG_RUNTIME_DIR=/run/user/{uid}",
                f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{uid}/bus",
                "systemd-run", "--user", "--unit=vm-linger", "bash", "-c",
                f"exec -a vm_linger_unit sleep {LONG}"))


def assign_roles(s: Scene, table_list: list[Proc]) -> dict[str, list[Proc]]:
    table = {p.pid: p for p in table_list}
    roles: dict[str, list[Proc]] = {r: [] for r in ROLES}
    taken: set[int] = set()

    def put(role: str, p: Proc | None) -> None:
        if p is not None and p.pid not in taken:
            roles[role].append(p)
            taken.add(p.pid)

    markers = {"vm_job_daemon": "job_daemon", "vm_batch_sleep": "batch_sleep",
               "vm_srun_task": "srun_task", "vm_ssh_sleep": "ssh_command",
               "vm_ssh_daemon": "ssh_daemon", "vm_stray": "stray_outside",
               "vm_admin_sleep": "admin_command", "vm_bypass_sleep": "bypass_command",
               "vm_bypass_daemon": "bypass_daemon", "vm_linger_unit": "linger_unit"}
    for p in table_list:
        if p.argv0 in markers:
            put(markers[p.argv0], p)
    # The ssh chains, from each login's command up: session process, [priv], listener.
    for command_role, session, priv in (("ssh_command", "ssh_session", "ssh_priv"),
                                        ("admin_command", "admin_session", "admin_priv"),
                                        ("bypass_command", "bypass_session", "admin_priv")):
        for cmd in list(roles[command_role]):
            sess = parent(cmd, table)
            put(session, sess)
            pr = parent(sess, table) if sess else None
            put(priv, pr)
            listener = parent(pr, table) if pr else None
            if listener is not None and listener.uid == 0:
                put("sshd_listener", listener)
    for p in table_list:
        cg = p.cgroup_path
        if p.user == "bob" and "/user@" in cg:
            put("linger_manager", p)
        elif p.comm == "slurmd" and p.uid == 0:
            put("slurmd", p)
        elif p.comm == "slurmctld":
            put("slurmctld", p)
        elif p.comm == "slurmstepd" and p.uid == 0 and cg.endswith("slurmstepd.scope/system"):
            put("scope_keeper", p)
        elif in_job_dir(p, s.alice_dir):
            if p.comm == "slurmstepd" and p.uid == 0:
                put("stepd", p)
            elif p.user == "alice" and "slurm_script" in " ".join(p.argv):
                put("batch_script", p)
            elif p.user == "alice" and p.comm == "srun":
                put("batch_srun", p)
            elif p.uid == 0 and "/step_extern/" in cg + "/" and p.comm == "sleep":
                put("extern_task", p)
            elif p.uid == 0:
                put("job_other", p)
        elif in_job_dir(p, s.dave_dir):
            put("crash_left" if p.user == "dave" else "crash_root_left", p)
    return roles


def job_dirs_listing() -> list[str]:
    """Every cgroup directory of Slurm's scope and slurmd's unit, relative to /sys/fs/cgroup."""
    out = []
    base = "/sys/fs/cgroup"
    for top in sorted(os.listdir(f"{base}/system.slice")):
        if top.endswith("slurmstepd.scope") or top == "slurmd.service":
            for dirpath, dirnames, _files in os.walk(f"{base}/system.slice/{top}"):
                dirnames.sort()
                out.append(dirpath[len(base):])
    return out


def prolog_flags() -> str:
    """PrologFlags= of this boot's slurm.conf (guest/setup.sh: per release)."""
    for line in Path("/etc/slurm/slurm.conf").read_text().splitlines():
        if line.startswith("PrologFlags="):
            return line.split("=", 1)[1].strip()
    return "?"


def write_cgroup_paths(s: Scene, path: os.PathLike[str] | str) -> str:
    """The fixture for the path grammar: every process of the scene with its real cgroup lines,
    and the directories Slurm made. Returns the text written."""
    info = dict(line.split("=", 1) for line in
                (RESULTS / "info.txt").read_text().splitlines() if "=" in line)
    lines = [
        "# Real /proc/PID/cgroup lines of a Slurm node, captured by tests/vm (issue 10).",
        f"# Debian {info.get('debian', '?')} ({info.get('codename', '?')}), "
        f"Slurm {info.get('slurm', '?')}, systemd {info.get('systemd', '?')}, "
        f"kernel {info.get('kernel', '?')}, cgroup {info.get('cgroup', '?')}",
        "# slurm.conf: ProctrackType=proctrack/cgroup TaskPlugin=task/cgroup "
        f"PrologFlags={prolog_flags()}; cgroup.conf: CgroupPlugin=cgroup/v2",
        f"# node {os.uname().nodename}; alice's job {s.alice_job} in cgroup dir {s.alice_dir}; "
        f"dave's job {s.dave_job} in cgroup dir {s.dave_dir}, its slurmstepds SIGKILLed, then "
        f"scancel (state now {s.dave_state or 'gone'})",
        "# columns: role<TAB>user<TAB>comm<TAB>line of /proc/PID/cgroup"
        " (roles: tests/vm/scenarios/scene.py)",
    ]
    for role, p in s.all():
        for line in p.cgroup:
            lines.append(f"{role}\t{p.user}\t{p.comm}\t{line}")
    lines.append("# cgroup directories (relative to /sys/fs/cgroup) while both jobs' cgroups exist")
    lines.extend(f"dir\t{d}" for d in job_dirs_listing())
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text
