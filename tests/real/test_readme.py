"""Every command README.md shows is run by a test: here, or by the lane named for it.

README's ```sh blocks are read from the file itself, so a command added to README without a
runner fails `test_every_readme_command_has_a_runner`, and a runner that stops running its
command (the text is gone from the file named for it) fails too.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO

README = REPO / "README.md"
VENV_PRUNED = REPO / ".venv" / "bin" / "pruned"

# Runners outside this file: a command is "run" by a file that holds its text (the package
# lane, the VM lane, CI itself). The value is a distinctive part of the command that the file
# must contain, so renaming the command in one place and not the other fails.
ELSEWHERE: dict[str, tuple[str, str]] = {
    "bash scripts/setup.sh": ("scripts/test.sh", "bash scripts/setup.sh"),
    "bash scripts/test.sh": (".ci/run", "scripts/test.sh"),
    "bash scripts/build-deb.sh": ("tests/pkg/run.sh", "scripts/build-deb.sh"),
    "apt-get install ./pruned_*_all.deb": ("tests/pkg/run.sh", "apt-get install"),
    "pruned check-config": ("tests/pkg/run.sh", "pruned check-config"),
    "pruned scan --class stray": ("tests/pkg/run.sh", "pruned scan --class stray"),
    "systemctl enable --now pruned": ("tests/vm", "systemctl enable --now pruned"),
    "install -d /etc/slurm/epilog.d": ("tests/real/test_readme.py", "test_readme_epilog_glob"),
    "ln -s /usr/sbin/pruned-epilog /etc/slurm/epilog.d/90-pruned": (
        "tests/real/test_readme.py",
        "test_readme_epilog_glob",
    ),
}
# Run in this file.
HERE_SCAN = ".venv/bin/pruned scan --policy policies/default.yaml"
HERE_JOURNAL = "journalctl "
CLUSTER_BLOCK_FIRST = "bash tests/cluster/cluster.sh install"


def sh_blocks(text: str) -> list[list[str]]:
    """The command lines of every ```sh block, trailing `# comments` dropped."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)
    out = []
    for block in blocks:
        lines = []
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
        out.append(lines)
    return out


def commands(lines: list[str]) -> list[str]:
    return [part.strip() for line in lines for part in line.split("&&")]


def _cluster_block(blocks: list[list[str]]) -> list[str]:
    found = [b for b in blocks if b and b[0].startswith(CLUSTER_BLOCK_FIRST)]
    assert len(found) == 1, "README lost its 'Trying it against the test cluster' block"
    return found[0]


def _text_of(path: Path) -> str:
    """A file's text, or that of every file under a directory (a lane)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return "\n".join(p.read_text(errors="replace") for p in files if p.suffix != ".pyc")


def test_every_readme_command_has_a_runner() -> None:
    blocks = sh_blocks(README.read_text())
    assert len(blocks) >= 5, blocks
    cluster = _cluster_block(blocks)
    unrun = []
    for block in blocks:
        if block is cluster:
            continue  # test_readme_cluster_block runs it line by line
        for cmd in commands(block):
            if cmd == HERE_SCAN or cmd.startswith(HERE_JOURNAL):
                continue
            if cmd not in ELSEWHERE:
                unrun.append(cmd)
                continue
            path, needle = ELSEWHERE[cmd]
            assert needle in _text_of(REPO / path), f"{path} no longer runs {cmd!r}"
    assert not unrun, f"README commands no test runs: {unrun}"


@pytest.mark.root
def test_readme_scan_command() -> None:
    """The first command of README (after setup.sh, which CI runs): a read-only scan."""
    assert HERE_SCAN in README.read_text()
    exe = VENV_PRUNED if VENV_PRUNED.exists() else None
    argv = [str(exe)] if exe else [sys.executable, "-m", "pruned.cli"]
    r = subprocess.run(
        [*argv, *HERE_SCAN.split()[1:]], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"\bsystem\b", r.stdout) and "Traceback" not in r.stderr


@pytest.mark.root
def test_readme_journal_queries(journald) -> None:
    """Each journalctl query of the audit section runs and finds a record pruned wrote."""
    queries = [
        c for b in sh_blocks(README.read_text()) for c in commands(b) if c.startswith(HERE_JOURNAL)
    ]
    assert len(queries) >= 5, queries
    tag = uuid.uuid4().hex
    code = (
        "import sys\n"
        "from pruned.act.audit import JournalSink, JsonlSink, event_record\n"
        "sink = JournalSink(fallback=JsonlSink('/dev/null'))\n"
        "sink.emit(event_record('sweep_summary', 'readme test ' + sys.argv[1],"
        " uid=1234, job_id=17, test_tag=sys.argv[1]))\n"
    )
    w = subprocess.run([sys.executable, "-c", code, tag], cwd=REPO, capture_output=True, text=True)
    if w.returncode != 0:
        pytest.fail(f"could not write a test record: {w.stderr}")
    for q in queries:
        # Same query, narrowed to this test's record where the query allows extra matches.
        r = subprocess.run(
            ["bash", "-c", f"{q} --no-pager"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, (q, r.stderr)
        if "-o json" in q:
            for line in r.stdout.splitlines():
                json.loads(line)


@pytest.mark.root
def test_readme_epilog_glob(tmp_path: Path) -> None:
    """README's epilog.d lines, under a scratch root: the link is a program slurmd can run."""
    text = README.read_text()
    block = next(b for b in sh_blocks(text) if b and b[0].startswith("install -d /etc/slurm"))
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    target = root / "usr/sbin/pruned-epilog"
    target.write_text("#!/bin/sh\necho epilog-ran\n")
    target.chmod(0o755)
    for cmd in block:
        r = subprocess.run(
            ["bash", "-c", cmd.replace(" /", f" {root}/")], capture_output=True, text=True
        )
        assert r.returncode == 0, (cmd, r.stderr)
    # The link README makes: the last word of its `ln -s` line.
    made = next(c for c in block if c.startswith("ln -s ")).split()[-1]
    link = root / made.lstrip("/")
    assert link.is_symlink()
    # The glob of README's slurm.conf line matches it, and it runs.
    glob = re.search(r"^Epilog=(\S+)", text, flags=re.M)
    assert glob, "README lost its Epilog= line"
    matches = sorted(Path("/").glob(f"{root}{glob.group(1)}".lstrip("/")))
    assert link in matches
    assert subprocess.run([str(link)], capture_output=True, text=True).stdout == "epilog-ran\n"


@pytest.mark.root
@pytest.mark.cluster
def test_readme_cluster_block(exclusive_cluster, jobs, make_user, tmp_path: Path) -> None:
    """README's cluster walk-through, line by line, with its `alice` a fresh test user.

    `useradd` is the fixture's (it also removes the user); `cluster.sh up`/`down` are the
    session fixture's own (a `down` here would stop the cluster under later tests). pruned's
    state goes to a tmpfs in a private mount namespace, never this machine's /var/lib/pruned.
    """
    block = commands(_cluster_block(sh_blocks(README.read_text())))
    user = make_user("prme")
    home = pwd.getpwnam(user.name).pw_dir

    def sub(cmd: str) -> str:
        return re.sub(r"\balice\b", user.name, cmd.replace("/home/alice", home))

    ran: list[str] = []
    outputs: list[str] = []
    run_proc: subprocess.Popen[str] | None = None
    private = tmp_path / "run.sh"
    try:
        for cmd in block:
            if cmd.startswith("useradd ") or cmd.endswith(("cluster.sh up", "cluster.sh down")):
                ran.append(cmd)  # the fixtures do these
                continue
            cmd = sub(cmd)
            if " run " in cmd:
                # `pruned run` in the foreground until Ctrl-C: started, stopped with SIGINT below.
                # The mount is private to the namespace; with no /var/lib/pruned on the host,
                # /var/lib itself is covered there (so nothing is created on the host).
                private.write_text(
                    "set -e\nif [ -d /var/lib/pruned ]; then\n"
                    "  mount -t tmpfs pruned-state /var/lib/pruned\nelse\n"
                    "  mount -t tmpfs pruned-state /var/lib\nfi\n"
                    f"exec {cmd}\n"
                )
                run_proc = subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "bash", str(private)],
                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    start_new_session=True,
                )
                time.sleep(5)
                assert run_proc.poll() is None, run_proc.communicate()
                ran.append(cmd)
                continue
            r = _run_to_files(cmd, tmp_path / f"out{len(ran)}")
            assert r.returncode == 0, (cmd, r.stdout, r.stderr)
            outputs.append(f"$ {cmd}\n{r.stdout}{r.stderr}")
            if "sbatch" in cmd:
                job = int(r.stdout.split()[-1])
                jobs.append(job)
                exclusive_cluster.wait_running(job)
            if "setsid -f sleep" in cmd:
                assert run_proc is not None and run_proc.poll() is None, run_proc.communicate()
                stray = _wait_stray(user.uid, "sleep 300", run_proc, outputs)
                _wait_adopted(stray, job)
            if cmd.startswith("journalctl"):
                recs = [json.loads(line) for line in r.stdout.splitlines()]
                assert any(
                    x.get("PRUNED_EVENT") == "process_adopted" and x.get("PRUNED_PID") == str(stray)
                    for x in recs
                ), recs[-5:]
            ran.append(cmd)
    finally:
        if run_proc is not None and run_proc.poll() is None:
            os.killpg(run_proc.pid, signal.SIGINT)  # the Ctrl-C the README speaks of
            try:
                run_proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(run_proc.pid, signal.SIGKILL)
                run_proc.wait(10)
    assert len(ran) == len(block)
    assert run_proc is not None and run_proc.returncode == 0, run_proc.communicate()


def _run_to_files(cmd: str, base: Path) -> subprocess.CompletedProcess[str]:
    """Run cmd with its output in files: a command that leaves a daemon behind (`setsid -f`)
    keeps a pipe open for as long as the daemon lives, a file does not hold anyone up."""
    out, err = base.with_suffix(".out"), base.with_suffix(".err")
    with out.open("w") as o, err.open("w") as e:
        rc = subprocess.run(["bash", "-c", cmd], cwd=REPO, stdout=o, stderr=e, timeout=300)
    return subprocess.CompletedProcess(cmd, rc.returncode, out.read_text(), err.read_text())


def _wait_stray(
    uid: int, cmdline: str, daemon: subprocess.Popen[str], outputs: list[str], timeout: float = 20
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                argv = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if argv == cmdline.encode():
                return int(name)
        time.sleep(0.2)
    os.killpg(daemon.pid, signal.SIGINT)
    daemon.communicate(timeout=30)
    raise AssertionError(f"no process {cmdline!r} of uid {uid} (killed?):\n" + "\n".join(outputs))


def _wait_adopted(pid: int, job: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cg = Path(f"/proc/{pid}/cgroup").read_text()
        if f"job_{job}/" in cg:
            return
        time.sleep(0.2)
    raise AssertionError(f"pid {pid} not adopted into job {job}: {cg}")
