"""job_container/tmpfs leftovers after a crashed step, on a real node.

Slurm's tmpfs plugin (`JobContainerType=job_container/tmpfs`; from 25.11
`NamespaceType=namespace/tmpfs`, the same job_container.conf) gives every job a private /tmp
and /dev/shm: a directory BasePath/<job> (26.05: BasePath/<node>/<job>) holding `.ns` (a bind
mount of the job's mount namespace) and `.<job>/_tmp`, which the plugin unmounts and removes
when the job ends -- from the slurmstepd and slurmd of that job. When its slurmstepds are
SIGKILLed, nothing of Slurm is left to do it: the directory and its mounts stay on the node.
The daemon (enforcing, cleanup.job_container_base set to the BasePath) kills what the crashed
job left, sees the job end once its cgroup has been idle for jobs.idle_grace, and after
cleanup.min_age detaches the mounts and removes the directory, with a files_removed record
naming the job. The container of a job that still runs is not touched.

Slurm is reconfigured for this phase and set back after it (set_slurm_conf)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from agree import three_paths_disagree
from conftest import POLICY_D, Daemon
from vmlib import (
    LONG,
    NODE,
    RESULTS,
    alive,
    in_job_dir,
    job_dir_of,
    job_state,
    journal_after,
    journal_cursor,
    node_state,
    procs,
    sbatch,
    set_slurm_conf,
    sh,
    slurm_version,
    wait_for,
    wait_procs,
    wait_running,
)

BASE = Path("/var/lib/slurm/jc")
JC_CONF = Path("/etc/slurm/job_container.conf")
FRAGMENT = POLICY_D / "65-vm-job-container.yaml"
FRAGMENT_TEXT = f"""version: 1
# test_job_container: the node's BasePath, and a crashed job's idle cgroup ends it in 5 s.
cleanup:
  job_container_base: {BASE}
jobs:
  idle_grace: 5s
"""


def script(tag: str) -> str:
    return f"""#!/bin/bash
echo data > /tmp/vm-jc-{tag}
exec -a vm_jc_sleep_{tag} sleep {LONG}
"""


def container_key() -> str:
    # 25.11 renamed the plugin type (namespace/tmpfs); 26.05 no longer reads the old key.
    return "NamespaceType" if slurm_version() >= (25, 11) else "JobContainerType"


def container_dir(job: str) -> Path | None:
    """The job's directory under BasePath: BasePath/<job> (22.05, 24.11) or, on 26.05,
    BasePath/<node>/<job> (pruned's cleanup looks in both)."""
    for path in (BASE / job, BASE / NODE / job):
        if path.is_dir():
            return path
    return None


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path in this (the host's) mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point == str(path) or point.startswith(f"{path}/"):
                out.append(point)
    return out


@pytest.fixture(scope="module")
def tmpfs_node(enforcing: Daemon) -> Iterator[list[dict]]:
    """Slurm with the tmpfs plugin, the daemon told its BasePath; set back afterwards. Yields
    `pruned doctor`'s findings from before the policy was told."""
    key = container_key()
    JC_CONF.write_text(f"AutoBasePath=true\nBasePath={BASE}\n")
    set_slurm_conf(**{key: "job_container/tmpfs" if key == "JobContainerType"
                      else "namespace/tmpfs"})
    before = doctor_findings()
    FRAGMENT.write_text(FRAGMENT_TEXT)
    cursor = journal_cursor()
    sh("systemctl", "reload", "pruned.service")
    wait_for("the daemon's config_loaded", lambda: journal_after(
        cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="config_loaded"), timeout=60)
    try:
        yield before
    finally:
        FRAGMENT.unlink(missing_ok=True)
        sh("systemctl", "reload", "pruned.service", check=False)
        set_slurm_conf(**{key: None})
        JC_CONF.unlink(missing_ok=True)


# What the job source shows now (pruned's own reader, as the daemon's refresh calls it).
JOB_VIEW = """
import sys
from pruned.jobs.source import read_jobs
from pruned.policy.load import load_policy
from pruned.sweep import make_sources
view = read_jobs(make_sources(load_policy(sys.argv[1])))
print("aliases", dict(view.aliases), "problems", list(view.problems))
for j in view.jobs.values():
    print(j.job_id, j.uid, "running" if j.running else j.why_not_running, j.cgroup_dirs)
"""


def why_not_removed(cursor: str, job: str, path: Path) -> str:
    """What a failure needs to be understood without the VM: whether the directory is still
    there, the daemon's messages since `cursor`, Slurm's about the job, and what a dry-run
    clean would plan now (its held reasons). Also kept in results/job-container-fail.txt."""
    lines = [f"no files_removed record of {path} in 180 s; it "
             + ("is still there" if path.exists() else "is gone (Slurm removed it?)")]
    for e in journal_after(cursor):
        ident, msg = e.get("SYSLOG_IDENTIFIER", ""), e.get("MESSAGE", "")
        if not isinstance(msg, str):
            continue
        quiet = " processes, " in msg or msg.endswith(" 0 entries removed")  # every 5 s
        if (ident == "pruned" and not quiet) or f"JobId={job}" in msg:
            lines.append(f"{ident}: {msg[:300]}")
    dry = sh("pruned", "clean", "--once", "--dry-run", "--policy", str(POLICY_D),
             check=False)
    lines += [f"dry-run clean: {ln[:300]}" for ln in (dry.stdout + dry.stderr).splitlines()
              if str(path) in ln or f"job {job}" in ln or ln.startswith("clean ")]
    view = sh("python3", "-c", JOB_VIEW, str(POLICY_D), check=False)
    lines += [f"job view: {ln}" for ln in (view.stdout + view.stderr).splitlines()]
    state = Path("/var/lib/pruned")
    for name in ("history.json", "history.journal"):
        with suppress(OSError):
            lines.append(f"{name}: {(state / name).read_text()[-3000:]}")
    text = "\n".join(lines[-90:])
    (RESULTS / "job-container-fail.txt").write_text(text + "\n")
    return text


def doctor_findings() -> list[dict]:
    return json.loads(sh("pruned", "doctor", "--json", check=False).stdout)["findings"]


def test_doctor_finds_the_basepath_the_policy_lacks(tmpfs_node: list[dict]) -> None:
    before = [f for f in tmpfs_node if f["check"] == "job-container"]
    assert before and f"cleanup.job_container_base: {BASE}" in before[0]["fix"], tmpfs_node
    assert not [f for f in doctor_findings() if f["check"] == "job-container"]


def test_crashed_jobs_container_is_detached_and_removed(tmpfs_node: list[dict]) -> None:
    cursor = journal_cursor()
    kept = sbatch("alice", script("alice"))
    crashed = sbatch("henry", script("henry"))
    try:
        for job in (kept, crashed):
            wait_running(job)
        sleepers = {tag: wait_procs(f"vm_jc_sleep_{tag}")[0] for tag in ("alice", "henry")}
        # Each job wrote into a /tmp of its own: seen through the job's own mount namespace
        # (/proc/PID/root), not in the node's /tmp.
        for tag, p in sleepers.items():
            wait_for(f"{tag}'s file in her job's /tmp",
                     lambda p=p, t=tag: Path(f"/proc/{p.pid}/root/tmp/vm-jc-{t}").exists(), 60)
            assert not Path(f"/tmp/vm-jc-{tag}").exists()
        crashed_dir = wait_for(f"job {crashed}'s container", lambda: container_dir(crashed), 60)
        kept_dir = container_dir(kept)
        (RESULTS / "job-container.txt").write_text(
            sh("find", str(BASE), "-maxdepth", "4", "-ls", check=False).stdout
            + "".join(f"mount {m}\n" for m in mounts_under(BASE)))
        assert kept_dir and mounts_under(crashed_dir) and mounts_under(kept_dir), \
            f"no container mounts at {crashed_dir}, {kept_dir}: the plugin did not run"
        # Processes in a job's own mount namespace: the three paths still judge them alike.
        dirs = {tag: job_dir_of(p) for tag, p in sleepers.items()}
        in_jobs = [(f"{tag}'s job", p) for p in procs() for tag, d in dirs.items()
                   if in_job_dir(p, d)]
        compared, wrong = three_paths_disagree(in_jobs)
        assert compared >= 4 and not wrong, (compared, wrong)

        # The crash: SIGKILL every slurmstepd of henry's job; its sleep is left behind.
        sleeper = sleepers["henry"]
        stepds = [p for p in procs()
                  if p.comm == "slurmstepd" and p.uid == 0 and in_job_dir(p, dirs["henry"])]
        assert stepds, f"no slurmstepd in {dirs['henry']}"
        for p in stepds:
            os.kill(p.pid, signal.SIGKILL)
        wait_for("henry's slurmstepds gone", lambda: not any(alive(p) for p in stepds), 30)

        # The daemon kills the leftover, sees the job end, and takes its container.
        wait_for(f"{sleeper.label()} killed", lambda: not alive(sleeper), timeout=120)
        recs = wait_for("a files_removed record of the container", lambda: [
            r for r in journal_after(cursor, SYSLOG_IDENTIFIER="pruned",
                                     PRUNED_EVENT="files_removed")
            if r.get("PRUNED_PATH") == str(crashed_dir)], timeout=180, fail=False)
        assert recs, why_not_removed(cursor, crashed, crashed_dir)
        assert recs[0]["PRUNED_JOB_ID"] == crashed and recs[0]["PRUNED_DRY_RUN"] == "no", recs[0]
        assert "detached" in recs[0].get("PRUNED_REASON", ""), recs[0]

        # alice's job runs: her container, its mount and her file stayed.
        assert mounts_under(kept_dir)
        assert Path(f"/proc/{sleepers['alice'].pid}/root/tmp/vm-jc-alice").exists()
        for job in (kept, crashed):
            sh("scancel", job)
        for job in (kept, crashed):
            wait_for(f"job {job} gone", lambda j=job: job_state(j) == "", timeout=180)
        # Slurm's own end of job tears down the container it still knew about; finding henry's
        # gone already drains nothing.
        wait_for(f"{kept_dir} removed by Slurm", lambda: not kept_dir.exists(), timeout=60)
        state = node_state()
        assert "DRAIN" not in state and "FAIL" not in state, state
        # Last, as it is known to fail on 22.05: the container's mounts are gone from the host's
        # mount namespace too, and the emptied directory with them. pruned.service has a mount
        # namespace of its own (ProtectSystem=full) and detaches its copies there; on trixie and
        # forky the host's went with the directory, on bookworm they stay and the rmdir gets
        # EBUSY (why there only is not known yet).
        gone = wait_for(f"{crashed_dir} removed", lambda: not crashed_dir.exists(), timeout=60,
                        fail=False)
        left = mounts_under(crashed_dir)  # in the host's mount namespace
        if (left or not gone) and slurm_version() < (23, 0):
            pytest.xfail(f"Slurm 22.05 (kernel 6.1): the host namespace keeps {left} and "
                         f"{crashed_dir} stays, emptied, after pruned detached its own copies")
        assert not left, left
        assert gone, f"{crashed_dir} still there: {sorted(os.listdir(crashed_dir))}"
    finally:
        for job in (kept, crashed):  # a failed assertion leaves no job behind
            sh("scancel", job, check=False)
