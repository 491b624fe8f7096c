"""Bytes stay bytes, and no stage loses what it did (issue 12), on real processes and files.

A stray of a fixture user runs an executable whose directory and name are not UTF-8 and hold
an escape sequence (so its comm, exe link and argv do too), with such bytes in its
environment. It goes through `pruned scan` (table and JSON), `pruned explain`, a sweep, the
daemon and the epilog; a file and a directory with such names go through `pruned clean` and
the epilog. Each must come out escaped (\\xNN, never a raw ESC or a byte that is not UTF-8)
and with its audit record written. Then: one process (or directory) whose handling raises is
skipped with a record while the others are acted on; and a cmdline/environ read that blocks
in the kernel (here: open(2) of a FIFO, which sleeps like a read of a process that holds its
mmap lock in D state) times out instead of hanging the epilog, which then does not kill on
the evidence it could not read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pruned import epilog, filesweep, sweep
from pruned.act import remove
from pruned.act.audit import ListSink
from pruned.jobs.history import JobHistory
from pruned.jobs.statedir import write_job_record
from pruned.linux import procfs
from pruned.policy.facts import resolve_facts
from pruned.policy.load import load_path
from tests.fixtures.paths import REPO
from tests.fixtures.users import User, alive, daemon_as, wait_dead, wait_for_pid
from tests.real.test_daemon import start_daemon  # noqa: F401  (a fixture)
from tests.real.test_daemon import write_policy as daemon_policy

pytestmark = pytest.mark.root

BAD_DIR = b"d\xff\xfe\x1b[1m"  # not UTF-8, and an escape sequence for the admin's terminal
BAD_EXE = b"sl\xe9\x1bep"  # the comm is the executable's name: the same bytes
BAD_ARGV0 = b"argv\xff\x1b0"
BAD_ENV = {b"BAD\xff": b"v\xfe\x1b", b"PATH": b"/usr/bin:/bin"}
COMM = "sl\\xe9\\x1bep"  # how every output shows BAD_EXE
DIR = "d\\xff\\xfe\\x1b[1m"
RAW = (b"\x1b", b"\xff", b"\xfe", b"\xe9")  # none of these may reach an output raw


def assert_escaped(out: bytes) -> str:
    """out is valid UTF-8 and holds no raw escape: the text."""
    for raw in RAW:
        assert raw not in out, (raw, out[-2000:])
    return out.decode("utf-8")


@pytest.fixture
def bad_place() -> Iterator[bytes]:
    """/tmp/prbytes-XXXX/<BAD_DIR>/<BAD_EXE>: a copy of sleep users can run; its path."""
    base = tempfile.mkdtemp(prefix="prbytes-", dir="/tmp").encode()
    os.chmod(base, 0o755)
    d = os.path.join(base, BAD_DIR)
    os.mkdir(d, 0o755)
    exe = os.path.join(d, BAD_EXE)
    shutil.copy("/usr/bin/sleep", exe)
    os.chmod(exe, 0o755)
    try:
        yield exe
    finally:
        shutil.rmtree(base, ignore_errors=True)


# Root double-forks (setsid between the forks) and the grandchild becomes the user and
# execs the executable from its bad directory with a bad argv[0] and environment.
PLANT = """
import os, sys
uid, gid, user = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
exe, argv0 = bytes.fromhex(sys.argv[4]), bytes.fromhex(sys.argv[5])
env = dict(bytes.fromhex(kv).split(b"=", 1) for kv in sys.argv[6].split(","))
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1024)
        os.chdir(os.path.dirname(exe))
        os.initgroups(user, gid)
        os.setgid(gid)
        os.setuid(uid)
        os.execve(exe, [argv0, b"600"], env)
    os.write(w, str(pid).encode())
    os._exit(0)
os.close(w)
os.wait()
print(os.read(r, 32).decode())
"""


def plant_bad(user: User, exe: bytes, *, may_die: bool = False, **env: bytes) -> int:
    """A setsid stray of user running exe (argv[0] BAD_ARGV0, BAD_ENV + env); its pid, once
    it has exec'd -- or, with may_die (a daemon with events on kills it within milliseconds
    of its exec), once it is gone: the caller's audit record then says what it ran."""
    full = {**BAD_ENV, **{k.encode(): v for k, v in env.items()}}
    r = subprocess.run(
        [sys.executable, "-S", "-c", PLANT, str(user.uid), str(user.gid), user.name,
         exe.hex(), BAD_ARGV0.hex(), ",".join((k + b"=" + v).hex() for k, v in full.items())],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    pid = int(r.stdout)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe".encode()) == exe:
                return pid
        if may_die and not os.path.exists(f"/proc/{pid}"):
            return pid
        time.sleep(0.02)
    pytest.fail(f"stray {pid} never ran {exe!r}")


def starttime(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[19].decode()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pruned.cli", *args], capture_output=True,
                          timeout=120, cwd=REPO, env=env)  # fmt: skip


def sweep_policy(tmp: Path, body: str = "") -> Path:
    state = tmp / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700, exist_ok=True)
    state.chmod(0o700)
    p = tmp / "policy.yaml"
    p.write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        "kill:\n  grace: 1s\n  brake:\n    max_uids: 3\n"
        f"jobs:\n  sources: [statedir]\n  state_dir: {state}\n"
        f"audit:\n  fallback_file: {tmp}/audit.jsonl\n" + (body or "cleanup:\n  enabled: false\n")
    )
    return p


def fallback_records(tmp: Path) -> list[dict[str, str]]:
    path = tmp / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_audit(journald, tmp: Path, timeout: float = 10, **match: str) -> dict[str, str]:
    """A record equal to `match` in journald or, where the journal refused, the fallback."""
    deadline = time.monotonic() + timeout
    while True:
        recs = journald.records(**match) + [
            r for r in fallback_records(tmp) if all(r.get(k) == v for k, v in match.items())
        ]
        if recs:
            return recs[-1]
        if time.monotonic() > deadline:
            pytest.fail(f"no audit record {match}")
        time.sleep(0.1)


def check_process_record(rec: dict[str, str], exe: bytes) -> None:
    assert all(isinstance(v, str) for v in rec.values()), rec  # never a journald byte array
    assert rec["PRUNED_COMM"] == COMM, rec
    assert rec["PRUNED_EXE"].endswith(f"/{DIR}/{COMM}"), rec
    assert COMM in rec["MESSAGE"], rec
    assert os.fsdecode(exe).endswith(os.fsdecode(BAD_DIR + b"/" + BAD_EXE))  # the real path


# ------------------------------------------------------------------ processes


def test_bad_bytes_stray_through_scan_explain_and_a_sweep(tmp_path, make_user, journald,
                                                           bad_place):
    user = make_user("prby")
    policy = sweep_policy(tmp_path)
    pid = plant_bad(user, bad_place)
    start = starttime(pid)

    scan = cli("scan", "--policy", str(policy))
    assert scan.returncode == 0, scan.stderr
    table = assert_escaped(scan.stdout)
    [row] = [line for line in table.splitlines() if line.split()[:1] == [str(pid)]]
    assert COMM in row and "stray" in row, row

    js = cli("scan", "--json", "--policy", str(policy))
    assert js.returncode == 0, js.stderr
    rows = {r["pid"]: r for r in map(json.loads, assert_escaped(js.stdout).splitlines())}
    assert rows[pid]["comm"] == COMM and rows[pid]["exe"].endswith(f"/{DIR}/{COMM}")
    assert rows[pid]["class"] == "stray"

    ex = cli("explain", str(pid), "--policy", str(policy))
    assert ex.returncode == 0, ex.stderr
    text = assert_escaped(ex.stdout)
    assert f"process {pid} ({COMM})" in text and f"/{DIR}/{COMM}" in text, text

    r = cli("sweep", "--once", "--policy", str(policy), "--uid", str(user.uid))
    assert r.returncode == 0, r.stderr
    assert_escaped(r.stdout + r.stderr)
    assert wait_dead(pid, 15), "the stray survived the sweep"
    # in the journal itself (pid + starttime: this process and no other)
    [rec] = journald.wait_records(PRUNED_PID=str(pid), PRUNED_STARTTIME=start,
                                  PRUNED_EVENT="process_killed")  # fmt: skip
    assert rec["PRUNED_RESULT"] == "done" and rec["PRUNED_UID"] == str(user.uid)
    check_process_record(rec, bad_place)
    summary = wait_audit(journald, tmp_path, PRUNED_SWEEP_ID=rec["PRUNED_SWEEP_ID"],
                         PRUNED_EVENT="sweep_summary")  # fmt: skip
    assert summary["PRUNED_KILLED"] == "1"


def _cgroup2_mount() -> bytes | None:
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            if right.split()[:1] == [b"cgroup2"]:
                return left.split()[4]
    return None


def test_a_stray_in_a_cgroup_with_a_bad_name(tmp_path, make_user, journald, bad_place):
    """A cgroup name is a user's to choose where systemd delegates (user@.service): a stray
    in one whose name is not UTF-8 is explained with the path escaped, killed by a sweep,
    and its cgroup line read back is the real path (it can be opened)."""
    root = _cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup2 mount")
    user = make_user("prbq")
    base = os.path.join(root, f"prbytes-{secrets.token_hex(3)}".encode())
    cg = os.path.join(base, b"cg\xff\x1b[7m")
    os.makedirs(cg)
    try:
        pid = plant_bad(user, bad_place)
        with open(os.path.join(cg, b"cgroup.procs"), "w") as f:
            f.write(str(pid))
        lines = procfs.read_cgroup_lines(pid)
        [line] = [x for x in lines if x.startswith("0::")]
        assert os.path.isdir(os.path.join(root, os.fsencode(line[3:]).lstrip(b"/")))
        policy = sweep_policy(tmp_path)
        ex = cli("explain", str(pid), "--policy", str(policy))
        assert ex.returncode == 0, ex.stderr
        assert "cg\\xff\\x1b[7m" in assert_escaped(ex.stdout)
        r = cli("sweep", "--once", "--policy", str(policy), "--uid", str(user.uid))
        assert r.returncode == 0, r.stderr
        assert wait_dead(pid, 15)
        rec = wait_audit(journald, tmp_path, PRUNED_PID=str(pid), PRUNED_EVENT="process_killed")
        check_process_record(rec, bad_place)
    finally:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.rmdir(cg)
                os.rmdir(base)
                break
            time.sleep(0.1)


@pytest.mark.parametrize("events", [False, True])
def test_daemon_kills_a_bad_bytes_stray_and_records_it(tmp_path, make_user, start_daemon,  # noqa: F811
                                                       bad_place, events):
    user = make_user("prbd")
    d = start_daemon(daemon_policy(tmp_path, events=events,
                                   schedule={"sweep": "10m" if events else "2s"}), [user.uid])
    d.ready()
    pid = plant_bad(user, bad_place, may_die=True)
    assert wait_dead(pid, 15), "the daemon did not kill the stray"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    check_process_record(rec, bad_place)
    assert rec["PRUNED_SWEEP_ID"].startswith("event-") == events, rec
    assert d.proc.poll() is None, d.stderr()  # still running
    assert d.stop() == 0
    assert_escaped((tmp_path / "stderr").read_bytes())


# ------------------------------------------------------------------ files


BAD_FILE = b"f\xff\x1b[2J"
BAD_SUB = b"s\xfe"


def bad_tree(job_dir: Path, user: User) -> None:
    """job_dir owned by user, holding a file and a dir (with a file) with bad names."""
    job_dir.mkdir()
    sub = os.path.join(os.fsencode(job_dir), BAD_SUB)
    os.mkdir(sub)
    for p in (os.path.join(os.fsencode(job_dir), BAD_FILE), os.path.join(sub, BAD_FILE)):
        with open(p, "wb") as f:
            f.write(b"x" * 100)
    for p in (job_dir, sub, *(os.path.join(x, BAD_FILE) for x in (os.fsencode(job_dir), sub))):
        os.chown(p, user.uid, user.gid)


def clean_policy(tmp: Path, root: Path, **more: str) -> Path:
    return sweep_policy(tmp, f"cleanup:\n  roots: [{root}]\n  job_dirs: ['{root}/job-{{job_id}}']"
                        f"\n  min_age: 1h\n  job_container_base: null\n" + "".join(
                            f"{k}: {v}\n" for k, v in more.items()))  # fmt: skip


def test_clean_removes_bad_names_of_an_ended_job(tmp_path, make_user, journald, tmpfs):
    user = make_user("prbc")
    job = str(800000 + secrets.randbelow(99999))
    policy = clean_policy(tmp_path, tmpfs)
    hist = JobHistory.load(str(tmp_path / "state"))
    hist.mark_ended(job, user.uid, time.time() - 7200, start=time.time() - 9000)
    hist.save()
    job_dir = tmpfs / f"job-{job}"
    bad_tree(job_dir, user)

    r = cli("clean", "--once", "--policy", str(policy))
    assert r.returncode == 0, r.stderr
    out = assert_escaped(r.stdout)
    assert f"done    job {job} dir {job_dir}" in out, out
    assert not job_dir.exists()
    rec = wait_audit(journald, tmp_path, PRUNED_JOB_ID=job, PRUNED_EVENT="files_removed")
    assert rec["PRUNED_FILES"] == "4" and rec["PRUNED_PATH"] == str(job_dir), rec
    assert "f\\xff\\x1b[2J" in rec["PRUNED_NAMES"] and "s\\xfe" in rec["PRUNED_NAMES"], rec
    summary = wait_audit(journald, tmp_path, PRUNED_SWEEP_ID=rec["PRUNED_SWEEP_ID"],
                         PRUNED_EVENT="sweep_summary")  # fmt: skip
    assert summary["PRUNED_KIND"] == "files" and summary["PRUNED_FILES"] == "4", summary


def test_clean_keeps_a_live_socket_with_a_bad_name(tmp_path, make_user, tmpfs):
    """A bound unix socket in an ended job's directory stays while it is live. Its name in
    /proc/net/unix must match the walker's name for it byte for byte: decoded lossily it
    matched nothing, and the live socket was removed."""
    import socket as _socket

    user = make_user("prbs")
    job = str(800000 + secrets.randbelow(99999))
    policy = clean_policy(tmp_path, tmpfs)
    hist = JobHistory.load(str(tmp_path / "state"))
    hist.mark_ended(job, user.uid, time.time() - 7200, start=time.time() - 9000)
    hist.save()
    job_dir = tmpfs / f"job-{job}"
    bad_tree(job_dir, user)
    path = os.path.join(os.fsencode(job_dir), b"sock\xff\x1b")
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen()
        r = cli("clean", "--once", "--policy", str(policy))
        assert r.returncode == 0, r.stderr
        out = assert_escaped(r.stdout)
        assert os.path.exists(path), out  # the live socket stays
        assert not os.path.exists(os.path.join(os.fsencode(job_dir), BAD_FILE)), out
        assert "sock\\xff\\x1b" in out and "kept 1" in out, out


def test_clean_detaches_a_mount_at_a_bad_path_then_removes(tmp_path, make_user, journald,
                                                           tmpfs):
    """A job_container directory with a mount whose path is not UTF-8: the path read from
    mountinfo must name the real mount point (a lossy decode named another, and the job's
    directory was never removed)."""
    user = make_user("prbm")
    job = str(800000 + secrets.randbelow(99999))
    base = tmpfs / "jc"
    base.mkdir(mode=0o700)
    policy = sweep_policy(tmp_path, f"cleanup:\n  roots: [{tmpfs}]\n  job_dirs: []\n"
                          f"  min_age: 1h\n  job_container_base: {base}\n")  # fmt: skip
    hist = JobHistory.load(str(tmp_path / "state"))
    hist.mark_ended(job, user.uid, time.time() - 7200, start=time.time() - 9000)
    hist.save()
    jdir = base / job
    jdir.mkdir(mode=0o700)
    shm = os.path.join(os.fsencode(jdir), b"shm\xff\x1b")
    os.mkdir(shm)
    r = subprocess.run([b"mount", b"-t", b"tmpfs", b"prbm", shm], capture_output=True)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(shm, BAD_FILE), "wb") as f:
        f.write(b"s")
    r = cli("clean", "--once", "--policy", str(policy))
    assert r.returncode == 0, r.stderr
    out = assert_escaped(r.stdout)
    assert not jdir.exists(), out
    with open("/proc/self/mountinfo", "rb") as f:
        assert os.fsencode(jdir) not in f.read()
    rec = wait_audit(journald, tmp_path, PRUNED_JOB_ID=job, PRUNED_EVENT="files_removed")
    assert "detached 1 mounts" in rec["MESSAGE"] and "shm\\xff\\x1b" in rec["MESSAGE"], rec


def run_epilog_hook(policy: Path, job: str, user: User) -> subprocess.CompletedProcess[bytes]:
    """`pruned epilog` as slurmd runs it, in a mount namespace without a journal socket (its
    records go to the policy's fallback file)."""
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.uid),
           "SLURM_JOB_USER": user.name, "PYTHONPATH": str(REPO)}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs pruned-test /run && exec "$0" "$@"', sys.executable, "-m",
            "pruned.cli", "epilog", "--policy", str(policy)]
    return subprocess.run(argv, capture_output=True, timeout=120, env=env, cwd=REPO)


def test_epilog_kills_and_removes_bad_bytes_with_records(tmp_path, make_user, tmpfs, bad_place):
    """The uid's last job: its bad-bytes stray dies and its bad-named job dir goes."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare")
    user = make_user("prbe")
    job = str(800000 + secrets.randbelow(99999))
    policy = clean_policy(tmp_path, tmpfs)
    job_dir = tmpfs / f"job-{job}"
    bad_tree(job_dir, user)
    pid = plant_bad(user, bad_place, SLURM_JOB_ID=job.encode())
    r = run_epilog_hook(policy, job, user)
    assert r.returncode == 0, r.stdout + r.stderr
    out = assert_escaped(r.stdout + r.stderr)
    assert COMM in out, out
    assert wait_dead(pid, 10) and not job_dir.exists()
    recs = fallback_records(tmp_path)
    [kill] = [x for x in recs if x.get("PRUNED_PID") == str(pid)]
    assert kill["PRUNED_EVENT"] == "process_killed", kill
    check_process_record(kill, bad_place)
    [files] = [x for x in recs if x.get("PRUNED_EVENT") == "files_removed"]
    assert files["PRUNED_JOB_ID"] == job and "f\\xff\\x1b[2J" in files["PRUNED_NAMES"], files


def test_epilog_reads_bad_environments_of_a_uid_with_another_job(tmp_path, make_user,
                                                                  bad_place):
    """The uid still runs another job: only strays whose environment names the ended job
    die. Environments full of bytes that are not UTF-8 are read, and a job id that is not
    UTF-8 names no job."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare")
    user = make_user("prbf")
    job, other = (str(800000 + secrets.randbelow(99999)) for _ in range(2))
    policy = sweep_policy(tmp_path)
    write_job_record(str(tmp_path / "state"), other, user.uid, time.time(), user.name)
    named = plant_bad(user, bad_place, SLURM_JOB_ID=job.encode())
    garbled = plant_bad(user, bad_place, SLURM_JOB_ID=job.encode() + b"\xff")
    try:
        r = run_epilog_hook(policy, job, user)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_escaped(r.stdout + r.stderr)
        assert wait_dead(named, 10), "the stray whose environment names the job survived"
        assert alive(garbled), "a garbled job id named the job"
        [kill] = [x for x in fallback_records(tmp_path) if x.get("PRUNED_PID") == str(named)]
        check_process_record(kill, bad_place)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(garbled, 9)


# ------------------------------------------------------------------ one failure, not the stage


def test_one_process_that_fails_is_skipped_the_others_are_killed(tmp_path, make_user,
                                                                 monkeypatch):
    """In-process sweep on real strays: the kill of one tree raises (an injected bug); that
    tree is skipped with a kill_failed record naming the error, the other tree dies."""
    user = make_user("prbg")
    victim, other = daemon_as(user, "prbg_victim"), daemon_as(user, "prbg_other")
    real = sweep.kill_many

    def buggy(trees, **kw):
        if any(root.pid == victim for root, _ in trees):
            raise RuntimeError("injected bug for pid \udcff")
        return real(trees, **kw)

    monkeypatch.setattr(sweep, "kill_many", buggy)
    policy = load_path(str(sweep_policy(tmp_path))).policy
    sink = ListSink()
    try:
        report = sweep.run_sweep(policy, resolve_facts(policy), sink, dry_run=False,
                                 uids=[user.uid])  # fmt: skip
        assert wait_dead(other, 10) and alive(victim)
        by_pid = {r.fields.get("PRUNED_PID"): r for r in sink.records}
        assert by_pid[str(other)].event == "process_killed"
        bad = by_pid[str(victim)]
        assert bad.event == "kill_failed", bad
        assert "RuntimeError: injected bug for pid \\xff" in bad.fields["PRUNED_INTERNAL_ERROR"]
        assert "internal error" in bad.fields["PRUNED_DETAIL"] and "skipped" in bad.message
        assert sink.records[-1].event == "sweep_summary"
        assert sink.records[-1].fields["PRUNED_KILLED"] == "1"
        assert len(report.failed) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, 9)


def test_event_batch_skips_the_one_process_that_fails(tmp_path, make_user, monkeypatch):
    """The event path's batch, in-process on real strays: the same injected bug skips one
    process with its record, and the other is killed in the same batch."""
    import threading as _threading

    from pruned.jobs.source import read_jobs
    from pruned.reactor import Reactor

    user = make_user("prbr")
    victim, other = daemon_as(user, "prbr_victim"), daemon_as(user, "prbr_other")
    real = sweep.kill_many

    def buggy(trees, **kw):
        if any(root.pid == victim for root, _ in trees):
            raise RuntimeError("injected bug")
        return real(trees, **kw)

    monkeypatch.setattr(sweep, "kill_many", buggy)
    policy = load_path(str(sweep_policy(tmp_path))).policy
    facts, sink = resolve_facts(policy), ListSink()
    reactor = Reactor(lambda: (policy, facts, sink),
                      lambda _fresh: read_jobs(sweep.make_sources(policy)),
                      _threading.Lock(), uids=[user.uid])  # fmt: skip
    try:
        report = reactor.handle({victim, other})
        assert report is not None and wait_dead(other, 10) and alive(victim)
        by_pid = {r.fields.get("PRUNED_PID"): r for r in sink.records}
        assert by_pid[str(other)].event == "process_killed"
        assert by_pid[str(victim)].event == "kill_failed"
        assert "RuntimeError: injected bug" in by_pid[str(victim)].fields["PRUNED_DETAIL"]
        assert by_pid[str(victim)].fields["PRUNED_SWEEP_ID"].startswith("event-")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, 9)


def test_one_directory_that_fails_is_skipped_the_others_are_removed(tmp_path, make_user,
                                                                    monkeypatch, tmpfs):
    user = make_user("prbh")
    jobs = [str(800000 + secrets.randbelow(99999) * 2 + i) for i in range(2)]
    policy = load_path(str(clean_policy(tmp_path, tmpfs))).policy
    hist = JobHistory.load(policy.state_dir)
    for j in jobs:
        hist.mark_ended(j, user.uid, time.time() - 7200, start=time.time() - 9000)
        bad_tree(tmpfs / f"job-{j}", user)
    hist.save()
    real = remove.remove_tree

    def buggy(parent, name, **kw):
        if name == f"job-{jobs[0]}":
            raise RuntimeError(f"injected bug in {name}")
        return real(parent, name, **kw)

    monkeypatch.setattr(remove, "remove_tree", buggy)
    sink = ListSink()
    report = filesweep.run_clean(policy, resolve_facts(policy), sink, dry_run=False)
    assert (tmpfs / f"job-{jobs[0]}").exists() and not (tmpfs / f"job-{jobs[1]}").exists()
    by_job = {r.fields.get("PRUNED_JOB_ID"): r for r in sink.records}
    assert by_job[jobs[1]].event == "files_removed"
    assert by_job[jobs[0]].event == "remove_failed"
    assert "internal error: RuntimeError: injected bug" in by_job[jobs[0]].message
    assert sink.records[-1].event == "sweep_summary" and len(report.failed) == 1


# ------------------------------------------------------------------ reads that block


@pytest.fixture
def blocking_proc(tmp_path: Path) -> Iterator[Path]:
    """A fake proc root whose 4242/cmdline and 4242/environ are FIFOs: open(2) sleeps in the
    kernel until a writer comes, as a read of a process holding its mmap lock does. The
    writers come at the end, so the abandoned reader threads finish."""
    d = tmp_path / "proc" / "4242"
    d.mkdir(parents=True)
    for name in ("cmdline", "environ"):
        os.mkfifo(d / name)
    try:
        yield tmp_path / "proc"
    finally:
        for name in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                os.close(os.open(d / name, os.O_WRONLY | os.O_NONBLOCK))
        deadline = time.monotonic() + 5
        while procfs._stuck and time.monotonic() < deadline:
            time.sleep(0.01)


def test_a_blocking_read_times_out(blocking_proc: Path) -> None:
    before, t0 = procfs._stuck, time.monotonic()
    with pytest.raises(procfs.ReadTimedOut, match="timed out"):
        procfs.read_mm_file(4242, "environ", str(blocking_proc), limit=1024, timeout=0.2)
    assert procfs.read_cmdline(4242, str(blocking_proc), timeout=0.2) == b""
    assert time.monotonic() - t0 < 5  # bounded: not a timing assertion, a hang guard
    assert procfs._stuck == before + 2
    # more blocked reads than MAX_STUCK_READS would pile up threads: the rest fail at once
    procfs._stuck, saved = procfs.MAX_STUCK_READS, procfs._stuck
    try:
        with pytest.raises(procfs.ReadTimedOut, match="earlier reads still blocked"):
            procfs.read_mm_file(4242, "environ", str(blocking_proc), limit=1024, timeout=60)
    finally:
        procfs._stuck = saved


def test_reads_are_capped_and_whole(tmp_path: Path) -> None:
    """A real process's cmdline is read whole up to the cap, and never past it."""
    # 3 x 100 kB: one argv string may be at most 128 KiB (MAX_ARG_STRLEN)
    argv = [b"/bin/sh", b"-c", b"read x", *(b"x" * 100_000 for _ in range(3))]  # waits on stdin
    p = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        want = b"\0".join(argv) + b"\0"
        deadline = time.monotonic() + 10
        while procfs.read_mm_file(p.pid, "cmdline", limit=1 << 20) != want:
            assert time.monotonic() < deadline, "the shell never showed its argv"
            time.sleep(0.02)
        got = procfs.read_cmdline(p.pid)
        assert got == want[: procfs.CMDLINE_READ]
        assert procfs.read_mm_file(p.pid, "cmdline", limit=10) == want[:10]
    finally:
        p.kill()
        p.wait()


def test_snapshot_never_opens_cmdline_or_environ(blocking_proc: Path) -> None:
    """A sweep's snapshot reads stat, status and exe only: with every cmdline and environ a
    FIFO that blocks, it still completes."""
    from tests.unit.test_procfs import stat_text

    root = blocking_proc
    (root / "stat").write_text("cpu  1 2 3\nbtime 1700000000\n")
    (root / "4242" / "stat").write_text(stat_text())
    os.chown(root / "4242" / "stat", 31234, -1)  # a user's process: stat is all it needs
    got: list = []
    t = threading.Thread(target=lambda: got.append(procfs.snapshot(str(root))), daemon=True)
    t.start()
    t.join(20)
    assert got and 4242 in got[0].procs


def test_epilog_does_not_kill_on_an_environment_it_could_not_read(tmp_path, make_user,
                                                                  monkeypatch, blocking_proc):
    """The uid runs another job, so the environment decides. One stray's environ read blocks:
    it times out, the stray lives (the missing fact could have spared it), the epilog says
    so; the other stray's environment names the job and it dies."""
    user = make_user("prbi")
    job, other = (str(800000 + secrets.randbelow(99999)) for _ in range(2))
    policy_path = sweep_policy(tmp_path)
    write_job_record(str(tmp_path / "state"), other, user.uid, time.time(), user.name)
    blocked = daemon_as(user, "prbi_blocked")
    subprocess.run(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "setsid",
         "-f", "bash", "-c", "exec -a prbi_named sleep 600"],
        env={**os.environ, "SLURM_JOB_ID": job}, check=True, cwd="/",
    )  # fmt: skip
    named_pid = wait_for_pid(user.uid, "prbi_named")
    real = procfs.read_mm_file

    def redirect(pid, name, proc_root="/proc", **kw):
        if pid == blocked and name == "environ":
            return real(4242, name, str(blocking_proc), **{**kw, "timeout": 0.2})
        return real(pid, name, proc_root, **kw)

    monkeypatch.setattr(procfs, "read_mm_file", redirect)
    sink = ListSink()
    monkeypatch.setattr(epilog, "_sink_for", lambda _p: sink)
    lines: list[str] = []
    try:
        code = epilog.epilog_command(str(policy_path), job, user.uid, user.name, dry_run=False,
                                     need_root=lambda _w: None, print_fn=lines.append)
        assert code == 0, lines
        assert wait_dead(named_pid, 10), lines
        assert alive(blocked), "killed on an environment nobody read"
        assert any(f"environ of pid {blocked} unreadable: timed out" in x for x in lines), lines
        killed = [r.fields["PRUNED_PID"] for r in sink.records if r.event == "process_killed"]
        assert killed == [str(named_pid)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(blocked, 9)
