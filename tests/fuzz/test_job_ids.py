"""Job ids as batch systems write them (Slurm "17" and SLUIDs, PBS "123.server" and array
"123[4].server", HTCondor "1234.0") become record file names that decode back to the id and
never leave the jobs/ directory; anything else is a ValueError. And the real CLI's prolog and
epilog take a PBS array id."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pruned.jobs.statedir import (
    CHANGES,
    JOBS_SUBDIR,
    StateDirSource,
    job_id_of_record_name,
    job_record_path,
    record_name,
)
from tests.fixtures.paths import REPO
from tests.fuzz._settings import fuzz

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
num = st.integers(0, 2**32 - 1).map(str)
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
server = st.lists(label, min_size=1, max_size=3).map(".".join)
slurm_ids = num | st.tuples(num, num).map("+".join)  # het job components: 17+1
sluids = st.text(CROCKFORD, min_size=13, max_size=13).map(lambda s: "s" + s)
pbs_ids = st.builds(lambda n, s: f"{n}.{s}", num, server) | st.builds(
    lambda n, i, s: f"{n}[{i}].{s}", num, num | st.just(""), server
)
condor_ids = st.builds(lambda c, p: f"{c}.{p}", num, st.integers(0, 99999))
job_ids = (slurm_ids | sluids | pbs_ids | condor_ids).filter(lambda j: len(j) <= 64)

STATE = "/var/lib/pruned-test-state"
JOBS = os.path.join(STATE, JOBS_SUBDIR)


def assert_safe(job_id: str, path: str) -> None:
    name = os.path.basename(path)
    assert os.path.dirname(path) == JOBS and os.path.normpath(path) == path
    assert name == record_name(job_id) and not name.startswith(".") and name.endswith(".json")
    assert job_id_of_record_name(name) == job_id


@fuzz(3)
@given(job_ids)
@example("123[4].server")
@example("123[].pbs.example.org")
@example("1234.0")
@example("s6T9M8T79NSN00")
@example("4294967294")
@example("a%5B")  # a '%' of the id itself is encoded too: no two ids share a name
def test_batch_system_ids_round_trip(job_id: str) -> None:
    assert_safe(job_id, job_record_path(STATE, job_id))


@fuzz(3)
@given(st.text(max_size=80) | st.text("./%[]\0\n x", max_size=6))
@example("")
@example(".")
@example("..")
@example(".hidden")
@example("../x")
@example("a/b")
@example("a\0b")
@example("123\n")
@example("9 1")
@example("x" * 65)
@example("é")
def test_any_text_is_a_safe_name_or_valueerror(job_id: str) -> None:
    try:
        path = job_record_path(STATE, job_id)
    except ValueError as e:
        assert "job id" in str(e)
        return
    assert_safe(job_id, path)
    assert job_id not in (".", "..") and not job_id.startswith(".")
    assert not any(c in job_id for c in "/\0") and job_id.isprintable() and job_id.isascii()
    assert not any(c.isspace() for c in job_id) and len(job_id) <= 64


@fuzz(3)
@given(
    st.text(max_size=40).map(lambda s: s + ".json") | st.text("%0123456789ABCDEFabz[.", max_size=12)
)
@example("123%5b4%5d.json")  # lower-case hex: not what pruned writes
@example("%2E%2E.json")
@example("a%2Fb.json")
@example("%00.json")
def test_any_file_name_decodes_to_its_one_id_or_none(name: str) -> None:
    job_id = job_id_of_record_name(name)
    assert job_id is None or record_name(job_id) == name


# ---------------------------------------------------------------- the real command line

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="prolog and epilog need root")


def _free_uid() -> int:
    """A uid no process runs as (the epilog kills every stray of the uid of a last job)."""
    used = set()
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            used.add(os.stat(f"/proc/{pid}").st_uid)
    return next(u for u in range(3_100_000, 3_200_000) if u not in used)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    return subprocess.run(
        [sys.executable, "-m", "pruned.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_cli_prolog_and_epilog_take_a_pbs_array_id(tmp_path: Path, mode: str) -> None:
    state = tmp_path / "state"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\nmode: {mode}\njobs:\n  sources: [statedir]\n  state_dir: {state}\n"
        f"cleanup:\n  job_dirs: ['{tmp_path}/scratch/{{job_id}}']\n  job_container_base: null\n"
        f"audit:\n  fallback_file: {tmp_path}/audit.jsonl\n"
    )
    uid, job = str(_free_uid()), "123[4].server"
    r = _cli("prolog", "--policy", str(policy), "--job", job, "--uid", uid)
    assert r.returncode == 0, r.stdout + r.stderr
    record = state / JOBS_SUBDIR / "123%5B4%5D.server.json"
    assert json.loads(record.read_text())["job_id"] == job
    view = StateDirSource(str(state)).read()
    assert view.problems == () and view.jobs[job].running and view.jobs[job].uid == int(uid)

    r = _cli("epilog", "--policy", str(policy), "--job", job, "--uid", uid)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in out and f"job {job} uid {uid}" in out
    ended = StateDirSource(str(state)).read().jobs[job]
    # mode report is a dry run: the epilog records nothing; enforce records the end
    assert ended.running is (mode == "report")

    for bad in ("../x", ".", "a/b"):  # still never a path
        r = _cli("prolog", "--policy", str(policy), "--job", bad, "--uid", uid)
        assert r.returncode != 0 and "job id" in r.stderr, r.stderr
    # the record, and the change log its writers keep (statedir.CHANGES): no file of a bad id
    assert sorted(os.listdir(state / JOBS_SUBDIR)) == sorted([CHANGES, "123%5B4%5D.server.json"])
