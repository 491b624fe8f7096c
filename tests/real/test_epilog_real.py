"""`pruned-epilog` fails safe, on real processes of users the fixture made.

Slurm drains a node whose Epilog exits non-zero. Here the real console script runs as Slurm
runs it (no arguments but --policy, the job in SLURM_JOB_ID/SLURM_JOB_UID) against real strays:
- a broken policy with a last good one: exit 0, `policy_fallback`, the stray killed by the
  last good policy;
- a broken policy without one: exit 0, `policy_fallback` "nothing done", the stray untouched;
- an internal error recording the end (its state dir is a file): exit 0, `internal_error`;
- the mass-kill brake counts the job's uid once: with `kill.brake.max_uids: 1` every stray of
  the uid dies (the epilog's targets are one uid by construction, so it never trips; that a
  tripped brake exits 0 is test_epilog_exit's);
- a prolog with a broken policy records the job start with the last good one.
Each runs in a private mount namespace whose /run is an empty tmpfs, so the audit records go to
the policy's JSON-lines fallback file, where the test reads them.

A process that survives SIGKILL cannot be made on demand (D state needs a hung device or
filesystem), so the survivor case runs the epilog in-process with the real kill of a real
process and replaces only the verdict: the kill outcome is turned into FAILED, as
pruned.act.kill reports a survivor. That proves the exit code follows
epilog.drain_on_survivor from the real outcome on (and that kill_failed is recorded); that a
real survivor is reported as FAILED is pruned.act.kill's own test subject.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pruned import epilog
from pruned.act.audit import ListSink
from pruned.model import Action, Result
from tests.fixtures.paths import REPO
from tests.fixtures.users import alive, daemon_as, wait_dead

pytestmark = pytest.mark.root

EPILOG = REPO / ".venv" / "bin" / "pruned-epilog"
PROLOG = REPO / ".venv" / "bin" / "pruned-prolog"


@pytest.fixture(autouse=True)
def _needs_root_and_unshare():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not EPILOG.exists():
        pytest.skip(f"{EPILOG} missing (run scripts/setup.sh)")


def write_policy(tmp: Path, name: str = "policy.yaml", **extra: str) -> Path:
    state = tmp / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700, exist_ok=True)
    body = {
        "mode": "enforce",
        "min_age": "0s",
        "events": "false",
        "kill": "{grace: 1s}",
        "jobs": f"{{sources: [statedir], state_dir: {extra.pop('state_dir', state)}}}",
        "audit": f"{{fallback_file: {tmp / 'audit.jsonl'}}}",
        "cleanup": "{enabled: false}",
        **extra,
    }
    path = tmp / name
    path.write_text("version: 1\n" + "".join(f"{k}: {v}\n" for k, v in body.items()))
    return path


def run_hook(script: Path, policy: Path, job: str, user) -> subprocess.CompletedProcess:
    """The hook as slurmd runs it, in a mount namespace without a journal socket."""
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_UID": str(user.uid),
           "SLURM_JOB_USER": user.name}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs pruned-test /run && exec "$0" "$@"', str(script),
            "--policy", str(policy)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/")


def records(path: Path, job: str) -> list[dict[str, str]]:
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if r.get("PRUNED_JOB_ID") == job or job in r.get("MESSAGE", "")]


def job_id() -> str:
    return str(900000 + secrets.randbelow(99999))


def check_config(path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pruned.cli", "check-config", str(path)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and "kept as the last good policy" in r.stderr, r.stderr


def test_broken_policy_falls_back_to_the_last_good_one(tmp_path, make_user):
    user = make_user("pre")
    stray = daemon_as(user, "pre_fallback_stray")
    policy = write_policy(tmp_path)
    check_config(policy)  # validated once: kept as the last good policy of this path
    policy.write_text(policy.read_text() + "kill_typo: {grace: 5s}\n")  # CM pushes a bad one
    job = job_id()
    r = run_hook(EPILOG, policy, job, user)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_dead(stray, 10), r.stdout  # the last good policy did the job
    recs = records(tmp_path / "audit.jsonl", job)
    [fb] = [x for x in recs if x["PRUNED_EVENT"] == "policy_fallback"]
    assert fb["PRIORITY"] == "4" and fb["PRUNED_RESULT"] == "fallback"
    assert fb["PRUNED_REASON"].startswith(f"{policy}:9: kill_typo: unknown key")
    assert fb["PRUNED_FALLBACK_FILES"] == str(policy)
    assert os.path.isdir(fb["PRUNED_FALLBACK"])
    killed = [x for x in records(tmp_path / "audit.jsonl", "")
              if x.get("PRUNED_EVENT") == "process_killed" and x["PRUNED_PID"] == str(stray)]
    assert killed, recs


def test_broken_policy_without_a_last_good_one_does_nothing(tmp_path, make_user):
    user = make_user("pre")
    stray = daemon_as(user, "pre_nothing_stray")
    policy = tmp_path / "never-good.yaml"
    policy.write_text("version: 1\nmode: enforce\nmin_age: 0s\ngarbage: [\n")
    job = job_id()
    r = run_hook(EPILOG, policy, job, user)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no last good policy" in r.stdout and "doing nothing" in r.stdout
    assert alive(stray)
    # Without a policy the record goes to the default fallback file (logs/ of the checkout).
    [fb] = [x for x in records(REPO / "logs" / "audit.jsonl", job)
            if x["PRUNED_EVENT"] == "policy_fallback"]
    assert fb["PRUNED_RESULT"] == "nothing done" and fb["PRUNED_UID"] == str(user.uid)
    assert fb["PRUNED_REASON"].startswith(f"{policy}:5: YAML syntax error")


def test_internal_error_exits_0_with_a_record(tmp_path, make_user):
    user = make_user("pre")
    not_a_dir = tmp_path / "state-file"
    not_a_dir.write_text("a file where the state directory should be\n")
    policy = write_policy(tmp_path, state_dir=str(not_a_dir))
    job = job_id()
    r = run_hook(EPILOG, policy, job, user)
    assert r.returncode == 0, r.stdout + r.stderr
    # The error is isolated to the step it hit (recording the end): the epilog goes on, says
    # so on stderr and in a record, and still reports what it did.
    assert "recording the job ended failed" in r.stderr, r.stderr
    assert f"pruned epilog: job {job} uid {user.uid}" in r.stdout, r.stdout
    [err] = [x for x in records(tmp_path / "audit.jsonl", job)
             if x["PRUNED_EVENT"] == "internal_error"]
    assert "its directories are still removed" in err["MESSAGE"], err
    assert "NotADirectoryError" in err["PRUNED_REASON"] or "FileExistsError" in err["PRUNED_REASON"]


def test_the_brake_counts_the_jobs_uid_once(tmp_path, make_user):
    """Under the old per-process brake (max_per_sweep: 1) these two strays held each other;
    the brake counts uids now, and one job's leftovers are one uid."""
    user = make_user("pre")
    strays = [daemon_as(user, f"pre_brake_{i}") for i in range(3)]
    policy = write_policy(tmp_path, kill="{grace: 1s, brake: {max_uids: 1}}")
    job = job_id()
    r = run_hook(EPILOG, policy, job, user)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_dead(strays), r.stdout
    recs = records(tmp_path / "audit.jsonl", "")
    assert not [x for x in recs if x["PRUNED_EVENT"] == "brake_tripped"], recs
    killed = {int(x["PRUNED_PID"]) for x in recs if x["PRUNED_EVENT"] == "process_killed"}
    assert set(strays) <= killed, recs


def test_prolog_with_a_broken_policy_uses_the_last_good_one(tmp_path, make_user):
    user = make_user("pre")
    policy = write_policy(tmp_path)
    check_config(policy)
    policy.write_text(policy.read_text().replace("mode: enforce", "mode: enforcing"))
    job = job_id()
    r = run_hook(PROLOG, policy, job, user)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "state" / "jobs" / f"{job}.json").exists(), r.stdout
    [fb] = [x for x in records(tmp_path / "audit.jsonl", job)
            if x["PRUNED_EVENT"] == "policy_fallback"]
    assert fb["PRUNED_RESULT"] == "fallback"


# ------------------------------------------------------------------ survivors


@pytest.mark.parametrize(("drain", "code"), [(True, 1), (False, 0)])
def test_survivor_exit_code_follows_the_policy(tmp_path, make_user, monkeypatch, drain, code):
    user = make_user("pre")
    stray = daemon_as(user, f"pre_survivor_{int(drain)}")
    policy = write_policy(tmp_path, epilog=f"{{drain_on_survivor: {str(drain).lower()}}}")
    sink = ListSink()
    monkeypatch.setattr(epilog, "_sink_for", lambda _p: sink)
    real_execute = epilog.execute

    def survived(*args, **kw):
        """The real kill; then its verdict as if the process had survived SIGKILL."""
        outs = real_execute(*args, **kw)
        return [dataclasses.replace(o, result=Result.FAILED, detail="SURVIVED: (test)")
                if o.decision.action is Action.KILL and o.result is Result.DONE else o
                for o in outs]

    monkeypatch.setattr(epilog, "execute", survived)
    lines: list[str] = []
    got = epilog.epilog_command(str(policy), job_id(), user.uid, user.name, dry_run=False,
                                need_root=lambda _w: None, print_fn=lines.append)
    assert got == code, lines
    assert wait_dead(stray, 10), "the kill itself was real"
    failed = [r for r in sink.records if r.event == "kill_failed"]
    assert [r.fields["PRUNED_PID"] for r in failed] == [str(stray)]
    assert any("survived SIGKILL" in line for line in lines), lines
