"""`pruned doctor` on real files: a clean node built in a tmp root passes (exit 0), and each
misconfiguration, made for real in a copy of it, is found with its fix. The real node's PAM
stack and linger dir are read too (read-only), and so is the NHC check file we ship."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("SLURM_CONF", None)


class Node:
    """A node's files under a tmp root, clean until a test breaks one thing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock: socket.socket | None = None

    def write(self, path: str, text: str) -> Path:
        p = self.root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def proc(self, pid: int, comm: str, exe: str) -> None:
        d = self.root / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "exe").symlink_to(exe)

    def cgroup(self, rel: str) -> None:
        d = self.root / "sys/fs/cgroup" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("")

    def policy(self, **extra: str) -> Path:
        body = {"version": "1", "cleanup": "{job_container_base: /var/jc}", **extra}
        return self.write("/policy.yaml", "".join(f"{k}: {v}\n" for k, v in body.items()))

    def doctor(self, *args: str, env: dict[str, str] | None = None,
               policy: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pruned.cli", "doctor", "--root", str(self.root),
             "--policy", str(policy or self.root / "policy.yaml"), *args],
            env={**ENV, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60)


SLURM_CONF = """\
# a clean compute node
ClusterName=c
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
PrologFlags=Alloc,Contain
JobContainerType=job_container/tmpfs
NodeName=n[1-4] CPUs=2 PrologFlags=ignored-here
"""


@pytest.fixture
def node() -> Iterator[Node]:
    # A short root: the journald socket's path must fit sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="prdoc-"))
    n = Node(root)
    n.write("/etc/pam.d/sshd", "@include common-auth\naccount required pam_nologin.so\n"
            "-account required pam_slurm_adopt.so\n@include common-session\n")
    n.write("/etc/pam.d/common-auth", "auth [success=1 default=ignore] pam_unix.so nullok\n")
    n.write("/etc/pam.d/common-session", "session required pam_unix.so\n"
            "# session optional pam_systemd.so\n")
    (root / "var/lib/systemd/linger").mkdir(parents=True)
    n.write("/etc/slurm/slurm.conf", SLURM_CONF)
    n.write("/etc/slurm/cgroup.conf", "CgroupPlugin=cgroup/v2\n")
    n.write("/etc/slurm/job_container.conf", "AutoBasePath=true\nBasePath=/var/jc/\n")
    n.write("/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n")
    n.write("/sys/fs/cgroup/cgroup.procs", "")
    n.cgroup("system.slice/slurmstepd.scope/system")
    n.cgroup("system.slice/slurmstepd.scope/job_5/step_batch/user/task_0")
    n.cgroup("system.slice/slurmstepd.scope/job_5/step_batch/slurm")
    for exe in ("/usr/sbin/slurmd", "/usr/sbin/slurmstepd"):
        n.write(exe, "#!/bin/false\n")
    n.proc(700, "slurmd", "/usr/sbin/slurmd")
    n.proc(701, "slurmstepd", "/usr/sbin/slurmstepd")
    n.proc(702, "bash", "/usr/bin/bash")
    (root / "run/systemd/journal").mkdir(parents=True)
    n.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.sock.bind(str(root / "run/systemd/journal/socket"))
    n.policy()
    yield n
    n.sock.close()
    shutil.rmtree(root)


def test_clean_node_passes(node: Node) -> None:
    r = node.doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"# doctor: 0 errors, 0 warnings (root {node.root}, policy {node.root}/policy.yaml)"]
    assert node.doctor("--quiet", "--strict").stdout == ""
    assert json.loads(node.doctor("--json").stdout) == {
        "ok": True, "root": str(node.root), "findings": []}


def _pam_systemd_shared(n: Node) -> None:
    n.write("/etc/pam.d/common-session",
            "session required pam_unix.so\nsession\toptional\tpam_systemd.so\n")


def _pam_systemd_substack(n: Node) -> None:
    n.write("/etc/pam.d/sshd", "session substack sshd-session\n")
    n.write("/etc/pam.d/sshd-session",
            "auth required pam_deny.so\n"
            "-session optional /lib/x86_64-linux-gnu/security/pam_systemd.so\n")


def _linger(n: Node) -> None:
    n.write("/var/lib/systemd/linger/alice", "")


def _no_contain(n: Node) -> None:
    n.write("/etc/slurm/slurm.conf", SLURM_CONF.replace("PrologFlags=Alloc,Contain\n", ""))


def _contain_in_missing_include(n: Node) -> None:
    n.write("/etc/slurm/slurm.conf", SLURM_CONF.replace("PrologFlags=Alloc,Contain\n",
                                                        "include site.d/*.conf\n"))


def _linuxproc(n: Node) -> None:
    n.write("/etc/slurm/slurm.conf", SLURM_CONF.replace("proctrack/cgroup", "proctrack/linuxproc"))


def _pgid_statedir(n: Node) -> None:
    n.write("/etc/slurm/slurm.conf", SLURM_CONF.replace("proctrack/cgroup", "proctrack/pgid"))
    (n.root / "var/state").mkdir(mode=0o700)
    n.policy(jobs=f"{{sources: [statedir], state_dir: {n.root}/var/state}}")


def _basepath(n: Node) -> None:
    n.write("/etc/slurm/job_container.conf", "NodeName=n1 BasePath=/scratch/jc\n")


def _basepath_unset_in_policy(n: Node) -> None:
    n.write("/policy.yaml", "version: 1\n")


def _namespace_tmpfs(n: Node) -> None:
    # Slurm 25.11+ spells the plugin NamespaceType=namespace/tmpfs, same job_container.conf.
    n.write("/etc/slurm/slurm.conf", SLURM_CONF.replace("JobContainerType=job_container/tmpfs",
                                                        "NamespaceType=namespace/tmpfs"))
    n.write("/etc/slurm/job_container.conf", "BasePath=/scratch/jc\n")


def _whitelist_exe_ptrace(n: Node) -> None:
    n.policy(whitelist="{exe: [/usr/bin/tmux]}")
    n.write("/proc/sys/kernel/yama/ptrace_scope", "1\n")


def _stepd_elsewhere(n: Node) -> None:
    n.proc(800, "slurmstepd", "/opt/slurm/sbin/slurmstepd")


def _slurmd_elsewhere(n: Node) -> None:
    n.proc(801, "slurmd", "/opt/slurm/sbin/slurmd")


def _stepd_not_installed(n: Node) -> None:
    (n.root / "usr/sbin/slurmstepd").unlink()


def _no_journald(n: Node) -> None:
    (n.root / "run/systemd/journal/socket").unlink()


def _unknown_cgroup(n: Node) -> None:
    n.cgroup("system.slice/slurmstepd.scope/job_5/step_batch/odd_dir")


def _v1_plugin_on_v2(n: Node) -> None:
    n.write("/etc/slurm/cgroup.conf", "CgroupMountpoint=/sys/fs/cgroup\nCgroupPlugin=cgroup/v1\n")


def _v2_plugin_on_hybrid(n: Node) -> None:
    shutil.rmtree(n.root / "sys/fs/cgroup")
    n.cgroup("freezer")
    n.cgroup("memory")
    n.write("/sys/fs/cgroup/unified/cgroup.controllers", "")


def _no_cgroups(n: Node) -> None:
    shutil.rmtree(n.root / "sys/fs/cgroup")
    (n.root / "sys/fs/cgroup").mkdir()


# (break it, check, level, text in what, text in fix)
CASES: list[tuple[Callable[[Node], None], str, str, str, str]] = [
    (_pam_systemd_shared, "pam-systemd", "WARNING",
     "(/etc/pam.d/common-session:2, included at /etc/pam.d/sshd:4)",
     "in /etc/pam.d/sshd, replace the include at line 4 by /etc/pam.d/common-session's lines "
     "without pam_systemd.so"),
    (_pam_systemd_substack, "pam-systemd", "WARNING", "/etc/pam.d/sshd-session:2",
     "replace the include at line 1"),
    (_linger, "linger", "WARNING", "user alice has linger enabled",
     "loginctl disable-linger alice"),
    (_no_contain, "prolog-contain", "WARNING", "no PrologFlags=Contain",
     "PrologFlags=Contain in /etc/slurm/slurm.conf"),
    (_contain_in_missing_include, "slurm-conf", "WARNING", "Include site.d/*.conf: no such file",
     "fix the Include"),
    (_linuxproc, "proctrack", "ERROR", "every sweep is report-only",
     "ProctrackType=proctrack/cgroup with TaskPlugin=task/cgroup"),
    (_pgid_statedir, "proctrack", "WARNING",
     "ProctrackType=proctrack/pgid (/etc/slurm/slurm.conf:3)",
     "ProctrackType=proctrack/cgroup"),
    (_basepath, "job-container", "WARNING", "BasePath=/scratch/jc",
     "cleanup.job_container_base: /scratch/jc in the policy"),
    (_basepath_unset_in_policy, "job-container", "WARNING", "cleanup.job_container_base is unset",
     "cleanup.job_container_base: /var/jc"),
    (_namespace_tmpfs, "job-container", "WARNING", "BasePath=/scratch/jc",
     "cleanup.job_container_base: /scratch/jc in the policy"),
    (_whitelist_exe_ptrace, "ptrace", "WARNING", "kernel.yama.ptrace_scope is 1",
     "kernel.yama.ptrace_scope=2"),
    (_stepd_elsewhere, "daemon-paths", "ERROR",
     "slurmstepd pid 800 runs /opt/slurm/sbin/slurmstepd",
     "add /opt/slurm/sbin/slurmstepd to jobs.slurm.stepd"),
    (_slurmd_elsewhere, "daemon-paths", "ERROR", "slurmd pid 801 runs /opt/slurm/sbin/slurmd",
     "make /usr/sbin/slurmd the slurmd binary"),
    (_stepd_not_installed, "daemon-paths", "ERROR", "none of jobs.slurm.stepd",
     "set jobs.slurm.stepd to where slurmstepd is installed"),
    (_no_journald, "journald", "WARNING", "no journald socket at /run/systemd/journal/socket",
     "run systemd-journald"),
    (_unknown_cgroup, "cgroup-layout", "ERROR", "job_5/step_batch/odd_dir is in Slurm's tree",
     "pruned explain PID"),
    (_v1_plugin_on_v2, "cgroup-layout", "ERROR",
     "CgroupPlugin=cgroup/v1 (/etc/slurm/cgroup.conf:2)",
     "CgroupPlugin=cgroup/v2"),
    (_v2_plugin_on_hybrid, "cgroup-layout", "WARNING", "on a hybrid cgroup node",
     "systemd.unified_cgroup_hierarchy=1"),
    (_no_cgroups, "cgroup-layout", "ERROR", "no cgroup hierarchy", "mount cgroup2"),
]


@pytest.mark.parametrize(("breaks", "check", "level", "what", "fix"), CASES,
                         ids=[c[0].__name__.lstrip("_") for c in CASES])
def test_each_misconfiguration_is_found_with_its_fix(
    node: Node, breaks: Callable[[Node], None], check: str, level: str, what: str, fix: str
) -> None:
    breaks(node)
    r = node.doctor()
    assert r.stderr == ""
    mine = [ln for ln in r.stdout.splitlines() if ln.startswith(f"{level} {check}: ")]
    assert any(what in ln.split(" — fix: ")[0] and fix in ln.split(" — fix: ")[1]
               for ln in mine), r.stdout
    assert r.returncode == (1 if level == "ERROR" else 0), r.stdout
    strict = node.doctor("--strict", "--quiet")
    assert strict.returncode == 1 and strict.stdout.strip(), strict.stdout
    assert "# doctor" not in strict.stdout
    data = json.loads(node.doctor("--json").stdout)
    assert data["ok"] is (level != "ERROR")
    assert {"level": level.lower(), "check": check} in [
        {"level": f["level"], "check": f["check"]} for f in data["findings"]]


def test_x11_implies_contain_and_includes_are_followed(node: Node) -> None:
    node.write("/etc/slurm/slurm.conf", SLURM_CONF.replace("PrologFlags=Alloc,Contain\n",
                                                           "Include site.d/*.conf\n"))
    node.write("/etc/slurm/site.d/10-flags.conf", "PrologFlags=X11\n")
    r = node.doctor()
    assert r.returncode == 0 and "WARNING" not in r.stdout, r.stdout


def test_slurm_conf_from_env_and_option(node: Node) -> None:
    conf = node.root / "etc/slurm/slurm.conf"
    alt = node.root / "etc/slurm-alt"
    alt.mkdir()
    for name in ("slurm.conf", "cgroup.conf", "job_container.conf"):
        shutil.move(conf.parent / name, alt / name)
    assert "no slurm.conf at /etc/slurm/slurm.conf" in node.doctor().stdout
    alt_conf = alt / "slurm.conf"
    alt_conf.write_text(alt_conf.read_text().replace("PrologFlags=Alloc,Contain\n", ""))
    for r in (node.doctor(env={"SLURM_CONF": "/etc/slurm-alt/slurm.conf"}),
              node.doctor("--slurm-conf", "/etc/slurm-alt/slurm.conf")):
        assert "WARNING prolog-contain: " in r.stdout and "slurm-conf" not in r.stdout, r.stdout


def test_bad_usage_and_bad_policy(node: Node, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pruned.cli", "doctor", "--root",
                        str(tmp_path / "nope")], env=ENV, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not a directory" in r.stderr
    node.write("/policy.yaml", "version: 1\nmetrics: {textfile: /x.txt}\n")
    r = node.doctor()
    assert r.returncode == 78 and "metrics.textfile: must end in .prom" in r.stderr


# ------------------------------------------------------------------ this machine, read-only


def _pam_systemd_on_this_node() -> bool:
    """An independent reading: pam_systemd on a session line of sshd or a file it includes."""
    seen, todo = set(), ["sshd"]
    while todo:
        name = todo.pop()
        if name in seen or not os.path.exists(f"/etc/pam.d/{name}"):
            continue
        seen.add(name)
        for line in Path(f"/etc/pam.d/{name}").read_text().splitlines():
            words = line.split("#")[0].split()
            if words[:1] == ["@include"]:
                todo.append(words[1])
            elif len(words) > 2 and words[0].lstrip("-") == "session":
                if words[1] in ("include", "substack"):
                    todo.append(words[2])
                elif words[2].endswith("pam_systemd.so"):
                    return True
    return False


def test_this_node_pam_and_linger_read_only(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\njobs: {sources: [statedir], state_dir: /var/lib/pruned}\n")
    r = subprocess.run([sys.executable, "-m", "pruned.cli", "doctor", "--json", "--policy",
                        str(policy)], env=ENV, cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode in (0, 1), r.stderr
    findings = json.loads(r.stdout)["findings"]
    pam = [f for f in findings if f["check"] == "pam-systemd" and "loads pam_systemd" in f["what"]]
    assert bool(pam) == _pam_systemd_on_this_node(), pam
    linger_dir = Path("/var/lib/systemd/linger")
    lingering = sorted(os.listdir(linger_dir)) if linger_dir.is_dir() else []
    assert [f["fix"] for f in findings if f["check"] == "linger"] == [
        f"loginctl disable-linger {u}" for u in lingering]


def test_copy_of_this_nodes_pam_stack(node: Node) -> None:
    """The real /etc/pam.d, copied under the root: doctor's verdict there follows the file."""
    if not os.path.exists("/etc/pam.d/sshd"):
        pytest.skip("no sshd PAM service on this machine")
    shutil.rmtree(node.root / "etc/pam.d")
    shutil.copytree("/etc/pam.d", node.root / "etc/pam.d", symlinks=True)
    found = "WARNING pam-systemd: " in node.doctor().stdout
    assert found == _pam_systemd_on_this_node()
    for f in (node.root / "etc/pam.d").iterdir():
        if f.is_file() and not f.is_symlink():
            f.write_text("\n".join(ln for ln in f.read_text().splitlines()
                                   if "pam_systemd.so" not in ln) + "\n")
    assert "pam-systemd" not in node.doctor().stdout


# ------------------------------------------------------------------ the NHC check we ship


NHC = REPO / "contrib/nhc/pruned.nhc"


def _nhc(node: Node, tmp_path: Path) -> subprocess.CompletedProcess:
    """Source the shipped file in bash with NHC's die() stubbed, and run check_pruned."""
    wrapper = tmp_path / "pruned"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m pruned.cli \"$@\"\n")
    wrapper.chmod(0o755)
    script = (f'die() {{ echo "DIE $1 $2"; return 1; }}\n. {NHC}\n'
              f'check_pruned --root {node.root} --policy {node.root}/policy.yaml; echo "rc=$?"\n')
    return subprocess.run(["bash", "-c", script], env={**ENV, "PRUNED": str(wrapper)},
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_nhc_check_pruned(node: Node, tmp_path: Path) -> None:
    r = _nhc(node, tmp_path)
    assert r.stdout == "rc=0\n", r.stdout + r.stderr
    _linuxproc(node)
    r = _nhc(node, tmp_path)
    lines = r.stdout.splitlines()
    assert lines[-1] == "rc=1", r.stdout + r.stderr
    assert lines[0].startswith("DIE 1 check_pruned: ERROR proctrack: "), r.stdout
