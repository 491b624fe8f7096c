"""pruned cleans files, on the real single-node Slurm cluster.

User A's job writes into its per-job dirs (one in a "tmp" root, one in a "shm" root) and
leaves a loose file; user B's job does the same and keeps running. `pruned clean --once`
learns both jobs while they run; once A's job has ended, the next clean removes A's per-job
dirs (and, min_age after that, A's loose file) and keeps all of B's files and A's young file.
`pruned clean --dry-run` removes nothing and says what it would do.

Safety: the cleanup roots are two fresh 1777 dirs under /var/tmp/prtest-<random>, never the
real /tmp or /dev/shm (jobs get a private /tmp and /dev/shm from job_container/tmpfs anyway).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.cluster import Cluster
from tests.fixtures.paths import REPO
from tests.fixtures.tmpfs import mount, umount_below
from tests.fixtures.users import User, alive, pids_of_uid, run_as, wait_for_pid

pytestmark = [pytest.mark.root, pytest.mark.cluster]

MIN_AGE = 3.0  # cleanup.min_age: loose files wait this long after the owner's last job


@dataclass(frozen=True)
class Setup:
    policy: Path
    tmp: Path
    shm: Path


@pytest.fixture
def clean_setup(tmp_path: Path) -> Iterator[Setup]:
    """Two cleanup roots (1777) under a fresh /var/tmp/prtest-<rand>, and a policy for them."""
    if not Path("/var/tmp").is_dir():
        pytest.skip("no /var/tmp")
    base = Path(f"/var/tmp/prtest-{secrets.token_hex(4)}")
    base.mkdir()
    # A tmpfs of our own: pruned counts the bytes a removal freed on the filesystem, which is
    # exact only where nobody else writes. Mounted before any job starts, so jobs see it.
    mount("-t", "tmpfs", "-o", "size=64m,mode=755", "prtest", str(base))
    tmp, shm = base / "tmp", base / "shm"
    for d in (tmp, shm):
        d.mkdir(parents=True)
        d.chmod(0o1777)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        f"jobs:\n  sources: [slurm]\n  state_dir: {tmp_path}/state\n"
        f"audit:\n  fallback_file: {tmp_path}/audit.jsonl\n"
        "cleanup:\n"
        f"  roots: [{tmp}, {shm}]\n"
        f"  job_dirs: ['{tmp}/slurm-{{job_id}}', '{shm}/slurm-{{job_id}}']\n"
        f"  min_age: {MIN_AGE:g}s\n"
        "  job_container_base: null\n"
    )
    try:
        yield Setup(policy, tmp, shm)
    finally:
        umount_below(base)
        base.rmdir()


def clean(policy: Path, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m pruned.cli clean --once [--dry-run] --policy P`."""
    argv = [sys.executable, "-m", "pruned.cli", "clean", "--once", "--policy", str(policy)]
    if dry_run:
        argv.append("--dry-run")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "REPORT-ONLY" not in r.stdout, r.stdout
    return r


def job_writing(c: Cluster, s: Setup, user: User, name: str) -> int:
    """A running job of user that filled its per-job dirs and left a loose file; its id."""
    script = (
        f"t={s.tmp}/slurm-$SLURM_JOB_ID; m={s.shm}/slurm-$SLURM_JOB_ID\n"
        "mkdir -p $t/sub $m\n"
        "head -c 1000 /dev/zero > $t/out\n"
        "head -c 24 /dev/zero > $t/sub/part\n"
        "head -c 500 /dev/zero > $m/seg\n"
        f"echo {name} > {s.tmp}/loose-{name}\n"
        f"exec -a {name} sleep 900\n"
    )
    job = c.sbatch(user, script)
    c.wait_running(job)
    wait_for_pid(user.uid, name, timeout=60)  # the files are written before the exec
    return job


def test_ended_jobs_files_removed_running_jobs_kept(
    exclusive_cluster, jobs, journald, make_user, clean_setup
):
    c, s = exclusive_cluster, clean_setup
    alice, bob = make_user("prcla"), make_user("prclb")
    job_a = job_writing(c, s, alice, "alice_files")
    jobs.append(job_a)
    job_b = job_writing(c, s, bob, "bob_files")
    jobs.append(job_b)
    a_dirs = [s.tmp / f"slurm-{job_a}", s.shm / f"slurm-{job_a}"]
    b_dirs = [s.tmp / f"slurm-{job_b}", s.shm / f"slurm-{job_b}"]
    a_loose, b_loose = s.tmp / "loose-alice_files", s.tmp / "loose-bob_files"
    everything = [*a_dirs, *b_dirs, a_loose, b_loose, a_dirs[0] / "sub" / "part"]
    assert all(p.exists() for p in everything)
    assert a_dirs[0].stat().st_uid == alice.uid and a_loose.stat().st_uid == alice.uid

    # 1. both jobs run: nothing to remove, but pruned now knows them (saved job history)
    r = clean(s.policy)
    assert "0 job dirs, 0 uids with loose files, 0 IPC objects, 0 failed" in r.stdout, r.stdout
    assert all(p.exists() for p in everything)

    # 2. A's job ends. The next clean records the end, and holds its dirs: an end seen from
    #    outside waits min_age (a job between steps looks the same for a moment).
    c.scancel(job_a)
    c.wait_gone(job_a)
    t_end = time.monotonic()
    assert not [p for p in pids_of_uid(alice.uid) if alive(p)]
    r = clean(s.policy)
    assert f"held    job {job_a}: ended" in r.stdout and "its dirs wait" in r.stdout, r.stdout
    assert f"would   job {job_a} dir" not in r.stdout, r.stdout
    assert all(p.exists() for p in everything)

    # 3. after min_age a dry run says what it would remove and removes nothing
    time.sleep(max(0.0, MIN_AGE + 0.5 - (time.monotonic() - t_end)))
    r = clean(s.policy, dry_run=True)
    for d in a_dirs:
        assert f"would   job {job_a} dir {d}:" in r.stdout, r.stdout
    assert "(dry-run)" in r.stdout and f"job {job_b} " not in r.stdout, r.stdout
    assert all(p.exists() for p in everything)

    # 4. the real clean: A's per-job dirs and old loose file go, a file A made just now stays
    #    (younger than min_age), B keeps all
    young = s.tmp / "young-alice"
    assert run_as(alice, ["touch", str(young)]).wait(30) == 0
    r = clean(s.policy)
    lines = r.stdout.splitlines()
    # bytes: what the filesystem got back (one 4 KiB page per small file on tmpfs)
    assert f"done    job {job_a} dir {a_dirs[0]}: 2 files, 2 dirs, 8192 bytes" in lines, r.stdout
    assert f"done    job {job_a} dir {a_dirs[1]}: 1 files, 1 dirs, 4096 bytes" in lines, r.stdout
    assert not any(d.exists() for d in a_dirs)
    assert f"done    uid {alice.uid} files in {s.tmp}: 1 files" in r.stdout, r.stdout
    assert not a_loose.exists()
    assert young.exists(), r.stdout
    assert all(p.exists() for p in (*b_dirs, b_loose, b_dirs[0] / "sub" / "part"))

    # the audit trail: one files_removed record per removed dir, with counts and bytes
    for path, files, nbytes in ((a_dirs[0], "4", "8192"), (a_dirs[1], "2", "4096")):
        (rec,) = journald.wait_records(
            SYSLOG_IDENTIFIER="pruned", PRUNED_PATH=str(path), PRUNED_EVENT="files_removed"
        )
        want = {
            "PRUNED_FILES": files,
            "PRUNED_BYTES": nbytes,
            "PRUNED_JOB_ID": str(job_a),
            "PRUNED_UID": str(alice.uid),
            "PRUNED_USER": alice.name,
            "PRUNED_RULE": "cleanup.job_dir",
            "PRUNED_RESULT": "done",
            "PRUNED_DRY_RUN": "no",
        }
        assert {k: rec.get(k) for k in want} == want, rec
        assert f"removed {files} file(s), {nbytes} bytes under {path}" in rec["MESSAGE"], rec
    (would,) = journald.wait_records(PRUNED_PATH=str(a_dirs[0]), PRUNED_EVENT="would_remove_files")
    assert would["PRUNED_DRY_RUN"] == "yes", would
    (loose,) = journald.wait_records(
        PRUNED_PATH=str(s.tmp), PRUNED_UID=str(alice.uid), PRUNED_EVENT="files_removed"
    )
    assert (loose["PRUNED_RULE"], loose["PRUNED_FILES"]) == ("cleanup.loose_files", "1"), loose
    assert not journald.records(PRUNED_PATH=str(b_dirs[0]))
