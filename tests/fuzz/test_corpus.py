"""Replay the committed crash corpus (tests/fuzz/corpus/, see its README): each input that once
crashed a parser, or parsed wrongly, now gives only documented errors and the expected result."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).parent / "corpus"

# Crashers in code the fuzz tier does not own: xfail until fixed there (then drop the entry).
# (The policy loader's three, deep [[[ nesting, a 5000-digit uid and a 400-digit duration, are
# fixed: they are ordinary policy errors now.)
KNOWN: dict[str, str] = {}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _cgroup(data: bytes) -> Any:
    from pruned.linux.procfs import parse_cgroup

    return list(parse_cgroup(_text(data)))


def _mountinfo(data: bytes) -> Any:
    from pruned.linux.mounts import mount_points, mounts_below

    mounts_below("/tmp", _text(data))
    return mount_points(_text(data))


def _unix_sockets(data: bytes) -> Any:
    from pruned.linux.guards import parse_unix_sockets

    return sorted(parse_unix_sockets(_text(data)))


def _locks(data: bytes) -> Any:
    from pruned.linux.guards import parse_locks

    return sorted([list(x) for x in parse_locks(_text(data))])


def _in_state_dir(fn: Callable[[str], Any]) -> Any:
    d = tempfile.mkdtemp(prefix="pruned-corpus-")
    try:
        os.chmod(d, 0o700)
        return fn(d)
    finally:
        shutil.rmtree(d)


def _history(data: bytes) -> Any:
    from pruned.jobs.history import HISTORY_FILE, JobHistory

    def load(d: str) -> None:
        Path(d, HISTORY_FILE).write_bytes(data)
        hist = JobHistory.load(d)
        assert hist.problems and hist.records() == []

    return _in_state_dir(load)


def _statedir(data: bytes) -> Any:
    from pruned.jobs.statedir import JOBS_SUBDIR, StateDirSource

    def read(d: str) -> None:
        os.mkdir(os.path.join(d, JOBS_SUBDIR), 0o700)
        path = os.path.join(d, JOBS_SUBDIR, "1.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        view = StateDirSource(d).read()
        assert view.jobs == {} and len(view.problems) == 1 and "1.json" in view.problems[0]

    return _in_state_dir(read)


def _slurmpath(data: bytes) -> Any:
    from pruned.jobs.slurmpath import membership_of, not_understood, parse_slurm_cgroup_path

    text = _text(data)
    not_understood(text)
    membership_of([text])
    sp = parse_slurm_cgroup_path(text)
    return (
        None
        if sp is None
        else {
            "version": sp.version,
            "root": sp.root,
            "job_id": sp.job_id,
            "step": sp.step,
            "task": sp.task,
        }
    )


def _job_id(data: bytes) -> Any:
    from pruned.jobs.statedir import job_id_of_record_name, job_record_path

    job_id = _text(data)
    name = os.path.basename(job_record_path("/state", job_id))
    assert job_id_of_record_name(name) == job_id
    return name


def _policy(data: bytes) -> Any:
    from pruned.policy.load import PolicyError, load_policy

    def load(d: str) -> None:
        path = Path(d, "policy.yaml")
        path.write_bytes(data)
        try:
            policy = load_policy(path)
        except PolicyError:
            return
        durations = (
            policy.kill_grace,
            policy.min_age,
            policy.sweep_interval,
            policy.clean_interval,
            policy.jobs_interval,
        )
        assert all(math.isfinite(x) and x < 10**9 for x in durations), durations

    return _in_state_dir(load)


REPLAY: dict[str, Callable[[bytes], Any]] = {
    "cgroup": _cgroup,
    "mountinfo": _mountinfo,
    "unix_sockets": _unix_sockets,
    "locks": _locks,
    "history": _history,
    "statedir": _statedir,
    "slurmpath": _slurmpath,
    "job_id": _job_id,
    "policy": _policy,
}

CASES = sorted(
    p.relative_to(CORPUS).as_posix()
    for p in CORPUS.glob("*/*")
    if p.suffix in (".txt", ".bin") and not p.name.endswith(".expected.json")
)


def test_corpus_is_replayed_whole() -> None:
    assert CASES, "the corpus is empty"
    assert {c.split("/")[0] for c in CASES} <= set(REPLAY), "a corpus dir without a replay"
    assert set(KNOWN) <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_replay(case: str) -> None:
    path = CORPUS / case
    replay = REPLAY[case.split("/")[0]]
    if case in KNOWN:  # not ours to fix: reported, with the input; passes once it is fixed
        try:
            replay(path.read_bytes())
        except Exception as e:
            pytest.xfail(f"{KNOWN[case]} ({type(e).__name__})")
        return
    got = replay(path.read_bytes())
    expected = path.with_suffix(".expected.json")
    if expected.exists():
        assert got == json.loads(expected.read_text()), case
