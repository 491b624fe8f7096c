"""pruned's own state: job records and the job history. Garbage in the files is a named
problem, never an exception; what the writers write reads back the same."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from pruned.jobs.history import HISTORY_FILE, JobHistory, JobRecord, parse_record
from pruned.jobs.statedir import (
    JOBS_SUBDIR,
    StateDirSource,
    end_job_record,
    job_id_of_record_name,
    prune_job_records,
    record_name,
    write_job_record,
)
from tests.fuzz._settings import fuzz
from tests.fuzz.test_job_ids import job_ids

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["job_id", "uid", "start", "end", "user", "source"]
record_like = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values | st.sampled_from([0, 1, -1, 2**70, 1.5, math.inf, -math.inf, True, "", "x", None]),
)

records = st.builds(
    JobRecord,
    job_id=job_ids,
    uid=st.integers(0, 2**32 - 2),
    start=st.floats(0, 2e9),
    end=st.none() | st.floats(0, 2e9),
    user=st.none() | st.text(max_size=20),
    source=st.sampled_from(["slurm", "statedir", "epilog"]) | st.text(max_size=8),
)


@fuzz(3)
@given(record_like | json_values, st.none() | st.text(max_size=8))
@example({"job_id": "1", "uid": 1, "start": math.nan}, None)
@example({"uid": True, "start": 1}, "1")
def test_parse_record_only_valueerror(obj, default) -> None:
    try:
        rec = parse_record(obj, default)
    except ValueError:
        return
    assert rec.job_id and rec.uid >= 0 and math.isfinite(rec.start)
    assert rec.end is None or math.isfinite(rec.end)


@fuzz(2)
@given(records)
def test_record_json_round_trip(rec: JobRecord) -> None:
    assert parse_record(json.loads(json.dumps(asdict(rec)))) == rec


garbage_file = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(["version", "jobs"]), json_values | st.just(1)).map(
        lambda d: json.dumps(d).encode()
    )
    | st.dictionaries(st.text(max_size=6), record_like, max_size=4).map(
        lambda jobs: json.dumps({"version": 1, "jobs": jobs}).encode()
    )
    | st.integers(1, 50_000).map(lambda n: b"[" * n)
    | st.integers(1, 50_000).map(lambda n: b'{"version": 1, "jobs": ' + b'{"a":' * n)
)


class _Tmp:
    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="pruned-fuzz-state-")
        os.chmod(self.path, 0o700)
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path)


@fuzz(1)
@given(garbage_file)
@example(b"[" * 100_000)  # json.loads recursed into RecursionError: the history load crashed
@example(b'{"version": 1, "jobs": {"7": {"uid": 1, "start": 1e999}}}')
def test_history_load_never_raises(raw: bytes) -> None:
    with _Tmp() as sd:
        with open(os.path.join(sd, HISTORY_FILE), "wb") as f:
            f.write(raw)
        hist = JobHistory.load(sd)
        for rec in hist.records():
            assert isinstance(rec, JobRecord)
        if hist.problems and "corrupt (" in hist.problems[0]:
            # the unreadable bytes are kept beside the file for a human
            kept = [n for n in os.listdir(sd) if n.startswith(HISTORY_FILE + ".corrupt-")]
            assert kept and Path(sd, kept[0]).read_bytes() == raw
        hist.save()  # and what was kept saves and loads again
        assert JobHistory.load(sd).records() == hist.records()


@fuzz(1)
@given(st.dictionaries(job_ids, records, max_size=6))
def test_history_save_load_round_trip(recs: dict[str, JobRecord]) -> None:
    with _Tmp() as sd:
        JobHistory(sd, recs).save()
        back = JobHistory.load(sd)
        assert back.problems == []
        assert {r.job_id: r for r in back.records()} == {r.job_id: r for r in recs.values()}


@fuzz(1)
@given(
    st.lists(st.tuples(job_ids, garbage_file), max_size=5),
    st.lists(st.text(max_size=12), max_size=3),
)
@example([("1", b"[" * 100_000)], [])  # RecursionError escaped StateDirSource.read
@example([], ["a b.json", "%zz.json", "x%2F.json", ".json", "%2E%2E.json", "123%5b4%5d.json"])
def test_statedir_read_never_raises(files: list[tuple[str, bytes]], names: list[str]) -> None:
    with _Tmp() as sd:
        jobs = os.path.join(sd, JOBS_SUBDIR)
        os.mkdir(jobs, 0o700)
        written = {}
        for job_id, raw in files:
            written[record_name(job_id)] = raw
        for n in names:  # names pruned never writes (and must not misread)
            if n and "/" not in n and "\0" not in n and n not in (".", ".."):
                written[n] = b'{"uid": 1, "start": 1}'
        for n, raw in written.items():
            path = os.path.join(jobs, n)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
        view = StateDirSource(sd).read()
        for job_id, job in view.jobs.items():
            assert job.job_id == job_id and record_name(job_id) in written
        readable = {n for n in written if not n.startswith(".") and n.endswith(".json")}
        assert len(view.jobs) + len(view.problems) == len(readable)
        prune_job_records(sd, older_than=math.inf)  # never raises either
        for n in written:  # a name that is not a record's is never pruned
            if job_id_of_record_name(n) is None:
                assert os.path.exists(os.path.join(jobs, n))


@fuzz(1)
@given(
    st.lists(st.tuples(job_ids, st.integers(0, 2**32 - 2), st.booleans()), min_size=1, max_size=6)
)
def test_statedir_writers_round_trip(jobs: list[tuple[str, int, bool]]) -> None:
    with _Tmp() as sd:
        want = {}
        for job_id, uid, ended in jobs:
            write_job_record(sd, job_id, uid, 100.0, user="u")
            if ended:
                assert end_job_record(sd, job_id, 200.0)
            want[job_id] = (uid, not ended)
        view = StateDirSource(sd).read()
        assert view.problems == ()
        assert {j: (job.uid, job.running) for j, job in view.jobs.items()} == want
        assert prune_job_records(sd, older_than=300.0) == sum(not r for _, r in want.values())
        assert set(StateDirSource(sd).read().jobs) == {j for j, (_, r) in want.items() if r}
