"""A hung filesystem under a cleanup root, for real: a FUSE mount whose daemon answers INIT
and then nothing (tests/fixtures/hungfuse.py), in a tmpfs the test made.

- The daemon: the file sweep blocks in the kernel on the mount; process sweeps go on (their
  summaries keep coming, a new stray still dies), WATCHDOG=1 keeps coming, one
  `file_sweep_stuck` record names the path, and `file_sweep_returned` follows the abort.
- A process of a test user blocked on the mount survives SIGKILL (D state): the first
  sweep reports it (`kill_failed` + `process_survived`), later sweeps leave it alone.
- The epilog with its job dir on the hung mount exits 0 within its budget, with an
  `epilog_timeout` record, and does not hold its output pipe open.
Every wait ends with an abort of the FUSE connection; nothing outside the test's users is
ever signalled (the daemon is scoped with --uid).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pruned.jobs.history import JobHistory
from tests.fixtures.hungfuse import hung_fuse
from tests.fixtures.paths import REPO
from tests.fixtures.tmpfs import make_file
from tests.fixtures.users import alive, setsid_as, wait_for_pid
from tests.real.test_daemon import plant_stray, start_daemon, wait_dead, write_policy  # noqa: F401

pytestmark = pytest.mark.root
WATCHDOG_S = 6.0  # the sweep interval is half of it: 3 s


def summaries(d, kind: str | None = None) -> list[dict[str, str]]:
    return [r for r in d.audit() if r.get("PRUNED_EVENT") == "sweep_summary"
            and r.get("PRUNED_KIND") == kind]


def events(d, name: str) -> list[dict[str, str]]:
    return [r for r in d.audit() if r.get("PRUNED_EVENT") == name]


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def test_hung_fuse_under_a_cleanup_root_stalls_only_the_file_sweep(
    tmp_path, tmpfs, make_user, start_daemon  # noqa: F811
):
    gone = make_user("prg")  # no process, a job that ended: its loose files get walked for
    active = make_user("prq")
    make_file(tmpfs / "left.dat", gone.uid, gone.gid, mtime=time.time() - 3600)
    state = tmp_path / "state"
    hist = JobHistory.load(str(state))
    hist.mark_ended("hung1", gone.uid, time.time() - 600, start=time.time() - 700)
    hist.save()
    with hung_fuse(tmpfs / "hung") as fs:
        policy = write_policy(
            tmp_path,
            cleanup={"enabled": True, "roots": [str(tmpfs)], "job_dirs": [], "min_age": "0s"},
            schedule={"sweep": "3s", "clean": "2s", "jobs": "2s"},
        )
        d = start_daemon(policy, [gone.uid, active.uid],
                         env={"WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))})
        d.ready()
        wait_for(lambda: fs.requests, 30, "the file sweep to reach the hung mount")
        rec = d.wait_audit(timeout=90, PRUNED_EVENT="file_sweep_stuck")
        assert rec["PRUNED_PATH"] == str(tmpfs / "hung"), rec
        assert rec["PRUNED_WCHAN"] == "request_wait_answer", rec
        assert rec["PRUNED_SYSCALL"] in ("newfstatat", "statx"), rec
        assert rec["PRIORITY"] == "4"

        # While it is stuck: process sweeps go on, still act, and feed the watchdog.
        stray = plant_stray(active, "prq_while_hung")  # its pid from the fork: no race
        assert wait_dead(stray, 30) is not None, "a process sweep killed the stray"
        t = time.monotonic()
        n = len(summaries(d))
        time.sleep(3 * WATCHDOG_S)
        dogs = [at for at, s in d.notify.lines() if at > t and s == "WATCHDOG=1"]
        gaps = [b - a for a, b in itertools.pairwise(dogs)]
        assert len(dogs) >= 3, d.notify.lines()[-10:]
        assert max(gaps) < WATCHDOG_S, f"WATCHDOG_USEC is {WATCHDOG_S}s; gaps {gaps}"
        assert len(summaries(d)) >= n + 2
        notes = [s for at, s in d.notify.lines() if at > t and s.startswith("STATUS=")]
        assert any("file sweep stuck" in s for s in notes), notes[-3:]
        assert len(events(d, "file_sweep_stuck")) == 1, "reported once, not every sweep"
        assert not summaries(d, "files"), "no file sweep completed while the first was stuck"
        assert d.proc.poll() is None

        fs.abort()  # what an admin does: every waiter gets ENOTCONN
        d.wait_audit(timeout=30, PRUNED_EVENT="file_sweep_returned")
    wait_for(lambda: summaries(d, "files"), 30, "a file sweep after the abort")
    assert d.stop() == 0


STAT_ON = "import os, sys; os.stat(sys.argv[1])"


def test_survivor_in_d_state_is_reported_once_and_left_alone(
    tmp_path, make_user, start_daemon  # noqa: F811
):
    user = make_user("prv")
    other = make_user("prw")
    with hung_fuse(Path(user.home) / "hung") as fs:  # where the user can reach it
        name = "prv_stuck_on_fuse"
        setsid_as(user, f"exec -a {name} {sys.executable} -S -c '{STAT_ON}' {user.home}/hung")
        pid = wait_for_pid(user.uid, name)
        wait_for(lambda: fs.requests, 10, "the user's stat to reach the hung mount")
        # A brake of one uid: the survivor's must not count once it is known.
        policy = write_policy(tmp_path, schedule={"sweep": "2s"},
                              kill={"grace": "1s", "brake": {"max_uids": 1}})
        d = start_daemon(policy, [user.uid, other.uid], env={"WATCHDOG_USEC": "6000000"})
        d.ready(timeout=60)
        rec = d.wait_audit(timeout=30, PRUNED_EVENT="process_survived")
        assert rec["PRUNED_PID"] == str(pid) and rec["PRUNED_STATE"] == "D", rec
        assert rec["PRUNED_WCHAN"] == "request_wait_answer", rec
        assert rec["PRUNED_REMINDER"] == "no"
        assert alive(pid), "SIGKILL is pending; the kernel holds it"
        n = len(summaries(d))
        t = time.monotonic()
        wait_for(lambda: len(summaries(d)) >= n + 4, 30, "four more sweeps")
        mine = [r for r in d.audit() if r.get("PRUNED_PID") == str(pid)]
        kinds = sorted(r["PRUNED_EVENT"] for r in mine)
        assert kinds == ["kill_failed", "process_survived"], kinds
        dogs = [s for at, s in d.notify.lines() if at > t and s == "WATCHDOG=1"]
        assert len(dogs) >= 4
        stray = plant_stray(other, "prw_next_stray")  # a second uid for the brake
        assert wait_dead(stray, 20) is not None, "the known survivor does not trip the brake"
        assert not events(d, "brake_tripped")
        kept = quarantines(d.pid)  # the survivor sits in the quarantine its kill made
        fs.abort()
        assert wait_dead(pid, 10) is not None, "the pending SIGKILL ends it after the abort"
    if kept:
        wait_for(lambda: not quarantines(d.pid), 20, f"the sweeps to remove {kept}")
    assert d.stop() == 0


def quarantines(pid: int) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/*/pruned_quarantine_{pid}_*") + glob.glob(
        f"/sys/fs/cgroup/pruned_quarantine_{pid}_*")


def test_epilog_with_its_job_dir_on_a_hung_mount_exits_0_in_time(tmp_path, tmpfs, make_user):
    user = make_user("pre")
    job = f"9{os.getpid()}"
    state = tmp_path / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700)
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({
        "version": 1, "mode": "enforce", "min_age": "0s", "events": False,
        "kill": {"grace": "1s"}, "jobs": {"sources": ["statedir"], "state_dir": str(state)},
        "audit": {"fallback_file": str(tmp_path / "audit.jsonl")},
        "cleanup": {"enabled": True, "roots": [str(tmpfs)],
                    "job_dirs": [f"{tmpfs}/slurm-{{job_id}}"]},
    }))
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.uid),
           "SLURM_JOB_USER": user.name, "PYTHONPATH": str(REPO)}
    with hung_fuse(tmpfs / f"slurm-{job}") as fs:
        t0 = time.monotonic()
        # As slurmd runs it (no journal socket: records go to the fallback file), and
        # capture_output reads to EOF: a worker left holding stdout would hang this run.
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs pruned-test /run && exec "$0" "$@"', sys.executable, "-m",
                "pruned.cli", "epilog", "--policy", str(policy)]
        r = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        took = time.monotonic() - t0
        assert fs.requests, "the epilog's job-dir removal reached the hung mount"
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert took < 1 + 30 + 10, f"budget kill.grace + 30s; took {took:.0f}s"
    assert "ran out of time" in r.stdout and "exiting 0" in r.stdout, r.stdout
    assert f"slurm-{job}" in r.stdout, "says where its worker was blocked"
    recs = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    [rec] = [x for x in recs if x.get("PRUNED_EVENT") == "epilog_timeout"]
    assert rec["PRUNED_JOB_ID"] == job and rec["PRIORITY"] == "4"
